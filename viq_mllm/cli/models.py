"""The model commands: convert (HF <-> megatron), export (a VLM -> HF), generate, eval, import-viq."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from viq_mllm.console import existing


def _convert(args: argparse.Namespace) -> int:
    from megatron_ext.convert.hf import hf_to_mcore, mcore_to_hf

    if args.direction == "hf-to-mcore":
        meta = hf_to_mcore(args.input, args.output, tp=args.tp, pp=args.pp)
        print(f"wrote {args.output}: {meta.hf_config['architectures'][0]}, vocabulary {meta.vocab.text_size} "
              f"padded to {meta.vocab.padded_size} (loads at any TP/PP; checked for TP={args.tp} PP={args.pp})")
    else:
        mcore_to_hf(args.input, args.output)
        print(f"wrote {args.output} (config.json + model.safetensors, vocabulary padding stripped)")
    return 0


def _export(args: argparse.Namespace) -> int:
    from megatron_ext.jobs.export_hf import export_hf

    record = export_hf(args.checkpoint, args.out)
    kind = "a stock causal LM (input_ids)" if record["group"] == 1 else "a stock causal LM + viq_mllm.hf.inputs_embeds"
    print(f"wrote {args.out}: {kind}, the extended tokenizer, generation_config.json and the ViQ tokenizer (viq/)")
    return 0


def _generate(args: argparse.Namespace) -> int:
    if args.hf:
        from viq_mllm.hf import generate

        if not args.image:
            raise ValueError("--hf needs --image (an exported VLM folder)")
        ids, text = generate(args.hf, args.image, args.prompt, args.max_new_tokens)
    elif args.image:
        from megatron_ext.jobs.evaluate import generate_from_image

        ids, text = generate_from_image(args.checkpoint, args.image, args.prompt, args.max_new_tokens)
    else:
        from megatron_ext.jobs.evaluate import generate_text

        if not args.tokenizer:
            raise ValueError("a text model needs --tokenizer (HF folder, SentencePiece .model or bytes)")
        ids, text = generate_text(args.checkpoint, args.tokenizer, args.prompt, args.max_new_tokens)
    print(text)
    if args.output_ids:
        Path(args.output_ids).write_text(" ".join(map(str, ids)) + "\n")
    if not text.strip():
        print(f"viq-mllm generate: warning: {_why_nothing(args, ids)}", file=sys.stderr)
    return 0


def _why_nothing(args: argparse.Namespace, ids: list[int]) -> str:
    """Why greedy decoding gave no text: the model ended at once, or wrote only ids that decode to nothing; with
    the task the checkpoint's run trained on when its ``recipe.yaml`` is beside it."""
    what = ("the model ended the text at its first token" if not ids else
            f"the model wrote {len(ids)} ids that decode to blank text")
    task = None
    if args.checkpoint:
        recipe = Path(args.checkpoint).resolve().parent.parent / "recipe.yaml"
        if recipe.is_file():
            import yaml

            task = (yaml.safe_load(recipe.read_text()).get("data") or {}).get("task")
    if task == "pretrain" and args.prompt:
        return (f"{what}: it was trained with data.task=pretrain (a caption follows the image, no prompts), so a "
                "--prompt is a layout it never saw; run without --prompt for a caption, or train with task=sft")
    return f"{what}; nothing was generated (try another --prompt, or more training steps)"


def _eval(args: argparse.Namespace) -> int:
    import json

    report, table = _eval_captions(args) if args.task == "captions" else _eval_vqa(args)
    print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


def _eval_vqa(args: argparse.Namespace) -> tuple[dict, str]:
    from viq_mllm.evaluation import accuracy, easy_vqa_items, report_table

    items = easy_vqa_items(args.split, args.limit, with_images=not args.no_image)
    if args.hf:
        from viq_mllm.hf import answerer

        report = accuracy(answerer(args.hf), items)
    else:
        from megatron_ext.jobs.evaluate import vqa_accuracy

        report = vqa_accuracy(args.checkpoint, items)
    return report, report_table(report)


def _eval_captions(args: argparse.Namespace) -> tuple[dict, str]:
    from megatron_ext.jobs.evaluate import caption_scores
    from viq_mllm.evaluation import caption_table

    if args.hf or not args.shards:
        raise ValueError("--task captions needs --checkpoint and --shards (held-out code shards with captions)")
    report = caption_scores(args.checkpoint, args.shards, args.limit, args.k)
    return report, caption_table(report)


def _import_viq(args: argparse.Namespace) -> int:
    from viq_mllm.viq.weights import import_release

    tokenizer, reports = import_release(args.release, args.config, args.preset)
    tokenizer.save_pretrained(args.out)
    for name, report in reports.items():
        print(f"{name}: {report}")
    print(f"wrote {args.out}: ViQ {args.config} {args.preset} ({tokenizer.fingerprint}); the pixel decoder is not "
          "in the release: train it with the decoder stage (recipes/viq_*_decoder*.yaml)")
    return 0


def add_convert(sub) -> None:
    conv = sub.add_parser("convert", help="HF <-> megatron-core checkpoints (Llama, Qwen2)",
                          description="hf-to-mcore: an HF model folder -> a megatron checkpoint (model.json + "
                          "dist_checkpointing, any TP/PP). mcore-to-hf: back, from any text GPT checkpoint (converted, "
                          "or trained here: the HF config is then rebuilt from model.json, Qwen2 with qkv biases, "
                          "Llama without). Strict: every tensor must map.")
    conv.add_argument("direction", choices=["hf-to-mcore", "mcore-to-hf"])
    conv.add_argument("--input", required=True, type=existing)
    conv.add_argument("--output", required=True)
    conv.add_argument("--tp", type=int, default=1, help="tensor-parallel size to validate the shapes for")
    conv.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to validate the shapes for")
    conv.set_defaults(func=_convert)


def _model_source(parser: argparse.ArgumentParser, checkpoint_help: str) -> None:
    """``--checkpoint`` (megatron) or ``--hf`` (an exported folder, run with transformers): one of them."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=existing, help=checkpoint_help)
    source.add_argument("--hf", type=existing, help="a VLM folder written by `viq-mllm export hf` (run with "
                        "transformers, the same prompt layout)")


def add_generate(sub) -> None:
    gen = sub.add_parser("generate", help="greedy generation: a VLM on an image, or a text GPT on a prompt",
                         description="With --image: encodes it with the checkpoint's ViQ tokenizer and continues the "
                         "sequence greedily (a caption when --prompt is empty, an answer otherwise). Without: "
                         "continues --prompt with a text GPT checkpoint (trained here or converted from HF), "
                         "tokenized with --tokenizer.")
    _model_source(gen, "checkpoints/step_XXXXXXXX, or a converted checkpoint")
    gen.add_argument("--image", default=None, type=existing, help="image for a VLM checkpoint")
    gen.add_argument("--tokenizer", default=None, help="text models: HF tokenizer folder, SentencePiece .model, "
                     "or bytes (checked against the checkpoint's tokenizer fingerprint)")
    gen.add_argument("--prompt", default="", help="text to continue, or the question for chat VLMs")
    gen.add_argument("--max-new-tokens", type=int, default=24)
    gen.add_argument("--output-ids", default=None, help="also write the generated ids to this file")
    gen.set_defaults(func=_generate)


def add_export(sub) -> None:
    exp = sub.add_parser("export", help="a trained VLM -> a Hugging Face causal-LM folder (no vision tower)",
                         description="Writes config.json, model.safetensors (every extended row, padding stripped), "
                         "the extended tokenizer, generation_config.json (text-only generation), the ViQ tokenizer "
                         "(viq/) and viq_mllm.json. With model.visual.group 1 the folder is a stock Llama / Qwen2 model "
                         "fed input_ids; with 4 or 16, viq_mllm.hf.inputs_embeds computes its inputs_embeds. "
                         "Only embedding: table exports.")
    exp.add_argument("format", choices=["hf"])
    exp.add_argument("--checkpoint", required=True, type=existing, help="a VLM checkpoint (checkpoints/step_XXXXXXXX)")
    exp.add_argument("--out", required=True, help="output folder (AutoModelForCausalLM.from_pretrained loads it)")
    exp.set_defaults(func=_export)


def add_eval(sub) -> None:
    ev = sub.add_parser("eval", help="how well a VLM uses its images: easy-vqa accuracy, held-out caption metrics",
                        description="easy-vqa: greedy answers to the task's questions from a megatron checkpoint or "
                        "an exported HF folder (the same prompt layout), scored by exact match overall and per "
                        "question kind (yes/no, shape, colour); --no-image asks them without their images (the "
                        "language prior); needs the easy-vqa wheel (`pip install --no-deps easy-vqa`). captions: on "
                        "held-out code shards (--shards), a checkpoint's mean caption loss with the right image vs "
                        "another image, and caption retrieval among --k candidates (each scored by its loss after "
                        "the image minus its loss alone). Both work for discrete VLMs and the continuous baseline.")
    _model_source(ev, "a VLM checkpoint (checkpoints/step_XXXXXXXX)")
    ev.add_argument("--task", choices=["easy-vqa", "captions"], default="easy-vqa")
    ev.add_argument("--shards", type=existing, default=None, help="captions: held-out code shards (`tokenize`)")
    ev.add_argument("--k", type=int, default=10, help="captions: retrieval candidates per image (default 10)")
    ev.add_argument("--split", choices=["train", "test"], default="test", help="easy-vqa: the split")
    ev.add_argument("--limit", type=int, default=None, help="the first N questions (samples) only")
    ev.add_argument("--no-image", action="store_true", help="easy-vqa: ask without the images")
    ev.add_argument("--out", default=None, help="also write the report (and every prediction) as JSON")
    ev.set_defaults(func=_eval)


def add_import_viq(sub) -> None:
    imp = sub.add_parser("import-viq", help="the authors' released ViQ weights -> a tokenizer folder",
                         description="Strict import of model_viq_fsq.pth (encoder and head) and, if present, "
                         "embedder.pth from --release into a ViQ tokenizer saved to --out (every tensor must map; the "
                         "report lists what was loaded, resized and ignored).")
    imp.add_argument("--release", required=True, type=existing, help="folder with model_viq_fsq.pth [embedder.pth]")
    imp.add_argument("--out", required=True, help="output folder (ViQTokenizer.from_pretrained loads it)")
    imp.add_argument("--config", default="giant", choices=["tiny", "so400m", "giant"],
                     help="architecture of the release (default giant, the released one)")
    imp.add_argument("--preset", default="16k", help="FSQ preset of the release (default 16k)")
    imp.set_defaults(func=_import_viq)
