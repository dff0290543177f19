"""``viq-mllm``: train multimodal LLMs on discrete ViQ image codes with megatron-core. Extract codes offline
(tokenize), extend a text vocabulary with them (extend-vocab, resize-vocab), train any recipe (train), move
weights to and from Hugging Face (convert, export, import-viq), generate, and benchmark; each command has --help.

    viq-mllm train RECIPE.yaml [--nproc N] [key=value ...]
    viq-mllm demo [--out DIR]
    viq-mllm bench speedup|train|tokenize|encode|packing [...]

``--nproc N`` validates the recipe for a world of N processes, then re-launches this command under
``torchrun --standalone`` (gloo on CPU, NCCL on GPU). On a cluster, call
``torchrun ... -m viq_mllm train RECIPE ...`` yourself.
"""

from __future__ import annotations

import argparse
import functools
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

from viq_mllm.console import Parser, debugging, existing, fail, plain
from viq_mllm.recipe import load_recipe

#: what a user's input can cause (a missing file, a wrong field, a checkpoint of another vocabulary, a diverged
#: run): one line and exit status 2, the traceback only with --debug; anything else is a bug and keeps its traceback
EXPECTED_ERRORS = (OSError, ValueError, ArithmeticError)


def _relaunched(args: argparse.Namespace) -> int | None:
    """With ``--nproc N`` (and not already inside torchrun): this same command in N processes through
    ``torchrun --standalone``, returning its exit status; otherwise None (run here)."""
    if not args.nproc or "LOCAL_RANK" in os.environ:
        return None
    rest, skip = [], False
    for item in args.argv:
        if skip or item.startswith("--nproc="):
            skip = False
            continue
        skip = item == "--nproc"
        if not skip:
            rest.append(item)
    return subprocess.call([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            f"--nproc_per_node={args.nproc}", "-m", "viq_mllm", *rest])


def _on_every_rank(job: Callable[[argparse.Namespace, int, int], int]) -> Callable[[argparse.Namespace], int]:
    """A command whose ranks split the work: relaunched under torchrun with ``--nproc N``, otherwise run here as
    ``job(args, rank, world)`` with torchrun's (or a single process's) rank and world size."""

    @functools.wraps(job)
    def run(args: argparse.Namespace) -> int:
        relaunched = _relaunched(args)
        if relaunched is not None:
            return relaunched
        return job(args, int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))

    return run


def _train(args: argparse.Namespace) -> int:
    world = args.nproc if args.nproc else int(os.environ.get("WORLD_SIZE", "1"))
    recipe = load_recipe(args.recipe, args.overrides, world_size=world)
    relaunched = _relaunched(args)
    if relaunched is not None:
        return relaunched
    from megatron_ext.training.jobs import run_recipe

    run_recipe(recipe)
    return 0


@_on_every_rank
def _tokenize(args: argparse.Namespace, rank: int, world: int) -> int:
    from viq_mllm.data.extract import run_tokenize

    run_tokenize(args.viq, args.input, args.out, workers=args.workers, shard_size=args.shard_size,
                 max_tokens=args.max_tokens, max_source_pixels=args.max_source_pixels, rank=rank, world=world,
                 image_root=args.image_root)
    return 0


@_on_every_rank
def _prepare(args: argparse.Namespace, rank: int, world: int) -> int:
    from megatron_ext.data.prepared import prepare

    record = prepare(args.shards, args.vocab, args.out, args.task, args.seq_length, args.group, args.truncate,
                     not args.one_per_row, rank=rank, world=world)
    if rank == 0:
        print(f"wrote {args.out}: {record['documents']} documents in {record['rows']} rows of {args.seq_length} "
              f"(padding {record['padding_fraction']:.1%}; key {record['key']})")
    return 0


def _extend_vocab(args: argparse.Namespace) -> int:
    from viq_mllm.vocab.extend import extend_vocab

    vocab = extend_vocab(args.text_tokenizer, args.viq, args.out)
    print(f"wrote {args.out}: text {vocab.text_size} + special {len(vocab.special_tokens)} + codes "
          f"{vocab.codebook_size} = {vocab.size} ids, padded to {vocab.padded_size} ({vocab.fingerprint})")
    return 0


def _resize_vocab(args: argparse.Namespace) -> int:
    from megatron_ext.convert.vocab_resize import resize_checkpoint

    resize_checkpoint(args.checkpoint, args.vocab, args.out, init=args.init, seed=args.seed)
    return 0


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
    from megatron_ext.convert.vlm_hf import export_hf

    record = export_hf(args.checkpoint, args.out)
    kind = "a stock causal LM (input_ids)" if record["group"] == 1 else "a stock causal LM + viq_mllm.hf.inputs_embeds"
    print(f"wrote {args.out}: {kind}, the extended tokenizer, generation_config.json and the ViQ tokenizer (viq/)")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from megatron_ext.training.parallel import shutdown

    if args.hf:
        from viq_mllm.hf import generate

        if not args.image:
            raise ValueError("--hf needs --image (an exported VLM folder)")
        ids, text = generate(args.hf, args.image, args.prompt, args.max_new_tokens)
    else:
        try:
            ids, text = _generate_multimodal(args) if args.image else _generate_text(args)
        finally:
            shutdown()
    print(text)
    if args.output_ids:
        Path(args.output_ids).write_text(" ".join(map(str, ids)) + "\n")
    return 0


def _generate_multimodal(args: argparse.Namespace) -> tuple[list[int], str]:
    from megatron_ext.vlm.inference import greedy, load_for_inference
    from viq_mllm.data.layout import prompt_document
    from viq_mllm.viq import ViQTokenizer

    model, tokenizer, meta = load_for_inference(args.checkpoint)
    codes = ViQTokenizer.from_pretrained(meta.vocab.viq_dir).encode([args.image])[0]
    prompt = prompt_document(tokenizer.text, tokenizer.vocab, codes, args.prompt, meta.model.visual.group)
    ids = greedy(model, tokenizer, prompt, args.max_new_tokens)
    return ids, tokenizer.text.decode(ids)


def _generate_text(args: argparse.Namespace) -> tuple[list[int], str]:
    from megatron_ext.training.checkpoint import read_meta
    from megatron_ext.vlm.inference import greedy_text, load_text_model
    from viq_mllm.vocab.text_tokenizers import load_text_tokenizer

    if not args.tokenizer:
        raise ValueError("a text model needs --tokenizer (HF folder, SentencePiece .model or bytes)")
    path = Path(args.tokenizer)
    if args.tokenizer != "bytes" and not path.exists():
        raise FileNotFoundError(f"--tokenizer {path}: no such file or folder")
    spec = "bytes" if args.tokenizer == "bytes" else f"{'sentencepiece' if path.suffix == '.model' else 'hf'}:{path}"
    tokenizer = load_text_tokenizer(spec)
    trained_with = read_meta(args.checkpoint).vocab.text_fingerprint
    if trained_with is not None and tokenizer.fingerprint != trained_with:
        raise ValueError(f"--tokenizer {args.tokenizer} is {tokenizer.fingerprint}, the checkpoint was trained "
                         f"with {trained_with}; pass the tokenizer of its run (its recipe.yaml: data.tokenizer)")
    gpt, meta = load_text_model(args.checkpoint)
    ids = greedy_text(gpt, tokenizer.encode(args.prompt), args.max_new_tokens, tokenizer.eod,
                      meta.vocab.text_size)
    return ids, tokenizer.decode(ids)


def _import_viq(args: argparse.Namespace) -> int:
    from viq_mllm.viq.weights import import_release

    tokenizer, reports = import_release(args.release, args.config, args.preset)
    tokenizer.save_pretrained(args.out)
    for name, report in reports.items():
        print(f"{name}: {report}")
    print(f"wrote {args.out}: ViQ {args.config} {args.preset} ({tokenizer.fingerprint}); the pixel decoder is not "
          "in the release: train it with the decoder stage (recipes/viq_*_decoder*.yaml)")
    return 0


def _viq_chain(args: argparse.Namespace) -> int:
    from viq_mllm.viq_chain import run_chain

    run_chain(args.out)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from viq_mllm.demo import run_demo

    run_demo(args.out)
    return 0


#: benchmark name -> module with ``main(argv)``
BENCHMARKS = {
    "speedup": "megatron_ext.bench.speedup",
    "train": "megatron_ext.bench.train",
    "packing": "megatron_ext.bench.packing",
    "data": "megatron_ext.bench.data",
    "tokenize": "viq_mllm.bench.tokenize",
    "encode": "viq_mllm.bench.encode",
}


def _bench(args: argparse.Namespace) -> int:
    import importlib

    module = importlib.import_module(BENCHMARKS[args.what])
    return module.main(args.rest + (["--out", args.out] if args.out else []))


def _add_train(sub) -> None:
    train = sub.add_parser(
        "train",
        help="run a recipe (resumes from run.dir/checkpoints if present)",
        description="Run one recipe. Every field can be overridden with key=value (e.g. train.steps=10 "
        "parallel.tp=2). The run writes recipe.yaml, metrics.jsonl, tensorboard/, wandb/ and checkpoints/ "
        "into run.dir; started again with the same run.dir it resumes from the latest checkpoint. Kinds: "
        "text_lm (a GPT on text), vlm (the discrete VLM on code shards), viq (a ViQ tokenizer stage: "
        "stage1 / proximal / fsq / decoder, each with init.from=PREVIOUS_RUN_DIR).",
    )
    train.add_argument("recipe", type=existing, help="path to a YAML recipe (see recipes/)")
    train.add_argument("--nproc", type=int, default=0, help="launch N local processes through torchrun")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")
    train.set_defaults(func=_train)


def _add_tokenize(sub) -> None:
    tok = sub.add_parser(
        "tokenize",
        help="extract ViQ codes offline into webdataset shards (resumable)",
        description="Encode every sample of --input with the ViQ tokenizer in --viq and write code shards, "
        "manifest.json (fingerprint, counts, checksums) and report.json (skipped inputs and why) into --out. "
        "Rerun the same command after a crash: finished shards are kept, the rest is redone identically.",
    )
    tok.add_argument("--viq", required=True, type=existing, help="ViQ tokenizer folder (save_pretrained output)")
    tok.add_argument("--input", required=True, type=existing,
                     help="image folder, LLaVA-style .json / .jsonl (image + conversations or caption), or "
                     "webdataset .tar shard(s)")
    tok.add_argument("--image-root", type=existing, default=None,
                     help="folder the .json / .jsonl image paths are relative to (default: the file's folder)")
    tok.add_argument("--out", required=True, help="output folder for the shards")
    tok.add_argument("--workers", type=int, default=0, help="DataLoader workers decoding images")
    tok.add_argument("--nproc", type=int, default=0, help="launch N processes (torchrun); shards split by rank")
    tok.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    tok.add_argument("--max-tokens", type=int, default=2048, help="patches per packed encoder pass")
    tok.add_argument("--max-source-pixels", type=int, default=64_000_000,
                     help="refuse larger images before decoding (decompression bombs)")
    tok.set_defaults(func=_tokenize)


def _add_prepare(sub) -> None:
    prep = sub.add_parser(
        "prepare", help="code shards -> memory-mapped training documents with their packing (resumable)",
        description="Turn a code-shard set into megatron-core indexed datasets (tokens, loss mask, visual flags, "
        "codes, image locators; one sequence per document) and pack them into rows once. A VLM recipe whose "
        "data.sources names --out reads rows lazily from these files; its task, sequence length, group, "
        "vocabulary and ViQ tokenizer must be the ones given here. Rerun after a crash: finished parts are "
        "kept; the same inputs give byte-identical files.")
    prep.add_argument("--shards", required=True, type=existing, help="a code-shard folder (viq-mllm tokenize)")
    prep.add_argument("--vocab", required=True, type=existing, help="the extended vocabulary folder (extend-vocab)")
    prep.add_argument("--out", required=True, help="output folder")
    prep.add_argument("--task", choices=["pretrain", "sft"], default="pretrain",
                      help="pretrain: the caption after the image is supervised; sft: the assistant's answers")
    prep.add_argument("--seq-length", type=int, required=True, help="model.seq_length of the runs that read it")
    prep.add_argument("--group", type=int, choices=[1, 4, 16], default=16, help="model.visual.group")
    prep.add_argument("--truncate", action="store_true", help="cut documents longer than a row (data.truncate)")
    prep.add_argument("--one-per-row", action="store_true", help="no packing: one document per row (data.pack)")
    prep.add_argument("--nproc", type=int, default=0, help="launch N processes (torchrun); shards split by rank")
    prep.set_defaults(func=_prepare)


def _add_extend_vocab(sub) -> None:
    ext = sub.add_parser("extend-vocab", help="add the layout's special tokens and one token per ViQ code",
                         description="Write an extended tokenizer of the same kind (SentencePiece .model or HF "
                         "folder) and vocab.json (the id layout and fingerprints) into --out.")
    ext.add_argument("--text-tokenizer", required=True, type=existing, help="SentencePiece .model file or HF tokenizer folder")
    ext.add_argument("--viq", required=True, type=existing, help="ViQ tokenizer folder (its preset sets the number of codes)")
    ext.add_argument("--out", required=True)
    ext.set_defaults(func=_extend_vocab)


def _add_resize_vocab(sub) -> None:
    rsz = sub.add_parser("resize-vocab", help="grow a checkpoint's embedding and output layer to a vocab.json",
                         description="Old rows are kept bit-identical; new rows are drawn from the old rows' "
                         "mean and covariance (--init mean-cov, default) or set to their mean (--init mean).")
    rsz.add_argument("--checkpoint", required=True, type=existing, help="a checkpoint folder (checkpoints/step_XXXXXXXX)")
    rsz.add_argument("--vocab", required=True, type=existing, help="folder with vocab.json from extend-vocab")
    rsz.add_argument("--out", required=True)
    rsz.add_argument("--init", choices=["mean-cov", "mean"], default="mean-cov")
    rsz.add_argument("--seed", type=int, default=0)
    rsz.set_defaults(func=_resize_vocab)


def _add_convert(sub) -> None:
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


def _add_generate(sub) -> None:
    gen = sub.add_parser("generate", help="greedy generation: a VLM on an image, or a text GPT on a prompt",
                         description="With --image: encodes it with the checkpoint's ViQ tokenizer and continues the "
                         "sequence greedily (a caption when --prompt is empty, an answer otherwise). Without: "
                         "continues --prompt with a text GPT checkpoint (trained here or converted from HF), "
                         "tokenized with --tokenizer.")
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=existing, help="checkpoints/step_XXXXXXXX, or a converted checkpoint")
    source.add_argument("--hf", type=existing, help="a VLM folder written by `viq-mllm export hf` (run with "
                        "transformers, the same prompt layout)")
    gen.add_argument("--image", default=None, type=existing, help="image for a VLM checkpoint")
    gen.add_argument("--tokenizer", default=None, help="text models: HF tokenizer folder, SentencePiece .model, "
                     "or bytes (checked against the checkpoint's tokenizer fingerprint)")
    gen.add_argument("--prompt", default="", help="text to continue, or the question for chat VLMs")
    gen.add_argument("--max-new-tokens", type=int, default=24)
    gen.add_argument("--output-ids", default=None, help="also write the generated ids to this file")
    gen.set_defaults(func=_generate)


def _add_export(sub) -> None:
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


def _add_import_viq(sub) -> None:
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


def _add_demo(sub) -> None:
    demo = sub.add_parser("demo", help="the end-to-end job on offline real data")
    demo.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    demo.set_defaults(func=_demo)


def _add_viq_chain(sub) -> None:
    chain = sub.add_parser(
        "viq-chain", help="train a tiny ViQ tokenizer through all four stages (SmolLM2-135M, real offline data)",
        description="stage 1 (text-aligned, EfficientNet-Lite0 teacher) -> stage 2-1 (proximal) -> stage 2-2 (FSQ) "
                    "-> decoder, through a frozen SmolLM2-135M; ~27 min on 2 CPU cores. Writes report.md, "
                    "summary.json, loss_terms.png and the final tokenizer (OUT/decoder/tokenizer).")
    chain.add_argument("--out", default="runs/viq_chain", help="output directory (default: runs/viq_chain)")
    chain.set_defaults(func=_viq_chain)


def _add_bench(sub) -> None:
    bench = sub.add_parser(
        "bench",
        help="benchmarks: speedup (discrete vs continuous vs text), train (ours vs HF), tokenize (offline "
        "extraction), encode (ViQ packed vs one-by-one), packing (packed vs unpacked VLM batches), data (prepare, "
        "start-up and loader at scale)",
        description="Benchmarks print a table and write JSON under --out. Arguments after the benchmark name "
        "are passed to it (use `viq-mllm bench train --help`).",
    )
    bench.add_argument("what", choices=list(BENCHMARKS))
    bench.add_argument("--out", default=None, help="output directory")
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    bench.set_defaults(func=_bench)

def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="viq-mllm", description=plain(__doc__))
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an expected error (or set VIQ_MLLM_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_tokenize(sub)
    _add_prepare(sub)
    _add_extend_vocab(sub)
    _add_resize_vocab(sub)
    _add_convert(sub)
    _add_generate(sub)
    _add_export(sub)
    _add_import_viq(sub)
    _add_demo(sub)
    _add_viq_chain(sub)
    _add_bench(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if extra and args.command == "train" and all("=" in item and not item.startswith("-") for item in extra):
        args.overrides = [*args.overrides, *extra]  # overrides may follow --nproc
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except EXPECTED_ERRORS as error:
        if debugging(args.debug):
            raise
        return fail(f"viq-mllm {args.command}", error)


if __name__ == "__main__":
    sys.exit(main())
