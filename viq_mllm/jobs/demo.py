"""``viq-mllm demo``: the whole story on offline real data, on a laptop-class CPU, in minutes.

1. Data: the Tux Paint stamps (785 real drawings with English captions, Debian package
   ``tuxpaint-stamps-default``, installed with apt when missing and possible); every 12th image is held out.
2. A tiny ViQ tokenizer, trained end to end on pixel reconstruction (PSNR vs a mean-colour-per-patch baseline).
3. Offline code extraction of the train and held-out images into shards (``viq-mllm tokenize``).
4. A SentencePiece text tokenizer trained on the captions and CPython's docstrings, extended with the layout's
   special tokens and one token per code (``viq-mllm extend-vocab``).
5. A tiny text LM trained with megatron-core on the same text, its vocabulary grown (``viq-mllm resize-vocab``).
6. The discrete VLM, initialised from it, trained on packed caption sequences (``viq-mllm train``).
7. The continuous baseline: the same VLM, recipe and packed data, with the tokenizer's ViT run on the pixels
   inside every step (trained) instead of codes; the measured speed-up and both loss curves.
8. Held-out captions, for both VLMs: the caption loss given the right image vs another image, caption retrieval
   among 10 candidates; greedy captions for held-out images.

Writes ``summary.json``, ``report.md`` and PNG plots into ``--out``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

from viq_mllm import launch
from megatron_ext.training.parallel import shutdown
from megatron_ext.vlm.inference import caption_scorer, greedy, load_for_inference, visual_attach
from viq_mllm.data.chat import prompt_document
from viq_mllm.data.shards import CodeShards
from viq_mllm.data.text import stdlib_docs_corpus
from viq_mllm.evaluation import caption_report
from viq_mllm.metrics import read_metrics
from viq_mllm.offline_assets import STAMPS, captioned_stamps
from viq_mllm.recipe.compose import load_recipe
from viq_mllm.viq import ViQTokenizer
from viq_mllm.viq.preprocess import to_rgb
from viq_mllm.viq_training.reconstruction import evaluate_reconstruction, plot_reconstructions, train_reconstruction
from viq_mllm.vocab.text_tokenizers import train_sentencepiece

ROOT = Path(__file__).resolve().parents[2]
VLM_MODEL = ["model.hidden_size=128", "model.ffn_hidden_size=344", "model.seq_length=256",
             "model.num_query_groups=2", "model.num_attention_heads=4", "model.num_layers=4"]

log = logging.getLogger(__name__)


def say(message: str) -> None:
    log.info("[demo %s] %s", time.strftime("%H:%M:%S"), message)


def ensure_stamps() -> Path:
    if STAMPS.is_dir():
        return STAMPS
    if shutil.which("apt-get") and os.geteuid() == 0:
        say("installing the Tux Paint stamps (Debian package tuxpaint-stamps-default, ~160 MB) ...")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=False, env=env, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "tuxpaint-stamps-default"], check=True, env=env,
                       capture_output=True)
    if not STAMPS.is_dir():
        raise RuntimeError("the demo needs the Tux Paint stamps: run `apt-get install tuxpaint-stamps-default` "
                           "as root (they are real captioned images that need no internet beyond Debian's mirror)")
    return STAMPS


def write_jsonl(path: Path, pairs: list[tuple[Path, str]]) -> Path:
    path.write_text("".join(json.dumps({"image": str(image), "caption": caption}) + "\n" for image, caption in pairs))
    return path


def viq_mllm(*args: str) -> None:
    launch.command(*args, cwd=str(ROOT))


def train_tokenizer(out: Path, train: list[tuple[Path, str]], held: list[tuple[Path, str]], steps: int) -> dict:
    model = ViQTokenizer.from_config("tiny", preset="16k", seed=0)
    items = model.preprocess([p for p, _ in train])
    held_items = model.preprocess([p for p, _ in held])
    before = evaluate_reconstruction(model, held_items)
    began = time.perf_counter()
    losses = train_reconstruction(model, items, steps=steps, batch=16, lr=1e-3,
                                  on_step=lambda s, loss: s % 200 == 0 and say(f"  tokenizer step {s}: mse {loss:.4f}"))
    after = evaluate_reconstruction(model, held_items)
    model.save_pretrained(out / "viq")
    plot_reconstructions(model, held_items[:8], out / "reconstructions.png")
    return {"steps": steps, "seconds": time.perf_counter() - began, "loss_first": losses[0], "loss_last": losses[-1],
            "held_out_before_training": before, "held_out": after, "fingerprint": model.fingerprint}


def build_text_corpus(out: Path, train: list[tuple[Path, str]]) -> tuple[Path, Path]:
    captions = [c for _, c in train]
    docs = stdlib_docs_corpus()[:1500]
    corpus = out / "text_corpus.txt"
    corpus.write_text("\n\n".join(captions * 3 + docs))
    model = train_sentencepiece(captions * 5 + docs, out / "text_tokenizer.model", 2000)
    return corpus, model


def evaluate_vlm(out: Path, checkpoint: Path, captions: int = 12) -> dict:
    """Held-out caption metrics (:func:`viq_mllm.evaluation.caption_report`) and greedy captions for the first
    ``captions`` held-out images, for a discrete VLM or the continuous baseline."""

    model, tokenizer, meta = load_for_inference(checkpoint)
    try:
        group, attach = meta.model.visual.group, visual_attach(meta, tokenizer)
        samples = list(CodeShards(out / "shards" / "eval", expected_fingerprint=meta.vocab.viq_fingerprint))
        report = caption_report(caption_scorer(model, tokenizer, samples, group, attach), len(samples))
        generated = []
        for sample in samples[:captions]:
            prompt = prompt_document(tokenizer.text, tokenizer.vocab, sample.codes, "", group,
                                     source=sample.images[0].path)
            ids = greedy(model, tokenizer, prompt, 16, attach)
            generated.append({"source": Path(sample.images[0].path).name, "image": sample.images[0].path,
                              "caption": sample.text["caption"], "generated": tokenizer.text.decode(ids)})
    finally:
        shutdown()
    return {"held_out": report, "generated": generated}


def plot_losses(out: Path, panels: list[tuple[str, list[Path], str]]) -> None:
    """``loss_curves.png``: one panel per ``(title, run dirs, x)``, x ``"step"`` or ``"time"`` (the training
    steps' cumulative wall-clock seconds, where the speed-up shows)."""
    import itertools

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5))
    for ax, (name, run_dirs, x) in zip(axes, panels):
        for run_dir in run_dirs:
            rows = read_metrics(run_dir)
            xs = ([r["step"] for r in rows] if x == "step"
                  else list(itertools.accumulate(r["step_time_s"] for r in rows)))
            ax.plot(xs, [r["loss"] for r in rows], label=run_dir.name, linewidth=0.8)
        ax.legend(fontsize=8)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step" if x == "step" else "training time (s)")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=90)
    plt.close(fig)


def plot_captions(out: Path, generated: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image


    fig, axes = plt.subplots(3, 4, figsize=(12, 10))
    for ax, item in zip(axes.flat, generated):
        ax.imshow(to_rgb(Image.open(item["image"])))
        ax.set_title(f"model: {item['generated']}\ntruth: {item['caption']}", fontsize=8, wrap=True)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out / "captions.png", dpi=80)
    plt.close(fig)


def run_demo(out: str | Path, vlm_steps: int = 500, text_steps: int = 300, tokenizer_steps: int = 1000) -> dict:
    """The module's eight steps into ``out``; returns ``summary.json``'s record. One function of ~75 lines on
    purpose: it reads top to bottom as the report does, each step a call and its one-line account."""
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    summary: dict = {}

    say("1/8 data: Tux Paint stamps with captions")
    pairs = captioned_stamps(ensure_stamps())
    held = pairs[::12]
    train = [p for i, p in enumerate(pairs) if i % 12]
    summary["data"] = {"images": len(pairs), "train": len(train), "held_out": len(held), "source": str(STAMPS)}

    say(f"2/8 training a tiny ViQ tokenizer on pixel reconstruction ({tokenizer_steps} steps)")
    summary["tokenizer"] = train_tokenizer(out, train, held, tokenizer_steps)
    rec = summary["tokenizer"]["held_out"]
    say(f"  held-out PSNR {rec['psnr']:.2f} dB vs mean-colour-per-patch {rec['psnr_patch_mean_baseline']:.2f} dB")

    say("3/8 extracting codes offline")
    for split, items in (("train", train), ("eval", held)):
        viq_mllm("tokenize", "--viq", str(out / "viq"), "--input", str(write_jsonl(out / f"{split}.jsonl", items)),
                 "--out", str(out / "shards" / split), "--shard-size", "256", "--overwrite")
    summary["shards"] = json.loads((out / "shards" / "train" / "manifest.json").read_text())["summary"]
    summary["shards"].pop("shards")

    say("4/8 text tokenizer and extended vocabulary")
    corpus, sp_model = build_text_corpus(out, train)
    viq_mllm("extend-vocab", "--text-tokenizer", str(sp_model), "--viq", str(out / "viq"), "--out", str(out / "vocab"),
             "--overwrite")

    say(f"5/8 text LM with megatron-core ({text_steps} steps), then resize-vocab")
    viq_mllm("train", str(ROOT / "recipes" / "tiny_text_cpu.yaml"), f"run.dir={out / 'text_lm'}",
             f"train.steps={text_steps}", f"checkpoint.every={text_steps}", f"data.tokenizer=sentencepiece:{sp_model}",
             f"data.text_files=[{corpus}]", "train.lr=2.0e-3", *VLM_MODEL)
    text_ckpt = out / "text_lm" / "checkpoints" / f"step_{text_steps:08d}"
    vlm_recipe = ROOT / "recipes" / "vlm_tiny_pretrain.yaml"
    viq_mllm("resize-vocab", "--checkpoint", str(text_ckpt), "--vocab", str(out / "vocab"), "--out",
             str(out / "vlm_init"), "--group", str(load_recipe(vlm_recipe, world_size=1).model.visual.group))

    vlm_args = [str(vlm_recipe), f"data.sources=[{{path: {out / 'shards' / 'train'}}}]",
                f"data.vocab={out / 'vocab'}", f"model.visual.viq={out / 'viq'}", f"init.checkpoint={out / 'vlm_init'}",
                f"train.steps={vlm_steps}", f"checkpoint.every={vlm_steps}", *VLM_MODEL]
    say(f"6/8 discrete VLM on packed caption sequences ({vlm_steps} steps)")
    viq_mllm("train", *vlm_args, f"run.dir={out / 'vlm_pretrain'}")
    say(f"7/8 continuous baseline: the same VLM with the ViT inside every step ({vlm_steps} steps)")
    viq_mllm("train", *vlm_args, f"run.dir={out / 'baseline_pretrain'}", "model.visual.embedding=continuous")

    say("8/8 held-out evaluation and captions")

    vlm_rows = read_metrics(out / "vlm_pretrain")
    base_rows = read_metrics(out / "baseline_pretrain")
    t_d, t_c = (sorted(r["step_time_s"] for r in rows)[len(rows) // 2] for rows in (vlm_rows, base_rows))
    summary["continuous_baseline"] = {"first_loss": base_rows[0]["loss"], "final_loss": base_rows[-1]["loss"],
                                      "median_step_time_s": t_c}
    summary["continuous_baseline"].update(evaluate_vlm(out, out / "baseline_pretrain" / "checkpoints" /
                                                       f"step_{vlm_steps:08d}", captions=0))
    summary["speedup"] = {"median_step_time_discrete_s": t_d, "median_step_time_continuous_s": t_c,
                          "speedup": 1 - t_d / t_c}
    summary["text_lm"] = {"final_loss": read_metrics(out / "text_lm")[-1]["loss"]}
    summary["discrete_vlm"] = evaluate_vlm(out, out / "vlm_pretrain" / "checkpoints" / f"step_{vlm_steps:08d}")
    summary["discrete_vlm"].update(first_loss=vlm_rows[0]["loss"], final_loss=vlm_rows[-1]["loss"],
                                   median_tokens_per_s=sorted(r["tokens_per_s"] for r in vlm_rows)[len(vlm_rows) // 2])
    vlms = [out / "vlm_pretrain", out / "baseline_pretrain"]
    plot_losses(out, [("text LM", [out / "text_lm"], "step"), ("VLM: discrete codes vs continuous encoder", vlms, "step"),
                      ("the same against training time", vlms, "time")])
    plot_captions(out, summary["discrete_vlm"]["generated"])
    summary["seconds"] = time.perf_counter() - began
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "report.md").write_text(report(summary))
    vlm = summary["discrete_vlm"]
    held, base = vlm["held_out"], summary["continuous_baseline"]["held_out"]
    say(f"done in {summary['seconds'] / 60:.1f} min: held-out caption loss {held['loss_right_image']:.3f} with "
        f"the right image vs {held['loss_other_image']:.3f} with another image's codes; caption retrieval among 10 "
        f"{held['retrieval_accuracy']:.0%} (continuous baseline {base['retrieval_accuracy']:.0%}); training step "
        f"{summary['speedup']['speedup']:.0%} faster than the continuous baseline; see {out / 'report.md'}")
    return summary


def report(s: dict) -> str:
    t, v, sh, c = s["tokenizer"]["held_out"], s["discrete_vlm"], s["shards"], s["continuous_baseline"]
    held, base = v["held_out"], c["held_out"]
    lines = [
        "# viq-mllm demo report", "",
        f"Data: {s['data']['images']} Tux Paint stamps with captions ({s['data']['train']} train, "
        f"{s['data']['held_out']} held out). Total time {s['seconds'] / 60:.1f} min on this machine.", "",
        "## ViQ tokenizer (tiny, trained on pixel reconstruction)", "",
        "| held-out metric | value |", "|---|---|",
        f"| PSNR of decoded codes | {t['psnr']:.2f} dB |",
        f"| PSNR of mean colour per 16x16 patch (baseline) | {t['psnr_patch_mean_baseline']:.2f} dB |",
        f"| codebook usage / code perplexity | {t['codebook_usage']:.3f} / {t['code_perplexity']:.0f} |",
        f"| code bytes vs raw pixel bytes | 1/{sh['pixel_bytes'] / sh['code_bytes']:.0f} |", "",
        "![reconstructions](reconstructions.png)", "",
        "## Discrete codes vs the continuous baseline (same VLM, recipe and packed data)", "",
        "| | discrete (codes) | continuous (ViT in the step) |", "|---|---|---|",
        f"| median step time (s) | {s['speedup']['median_step_time_discrete_s']:.3f} | "
        f"{s['speedup']['median_step_time_continuous_s']:.3f} |",
        f"| train loss first -> last | {v['first_loss']:.3f} -> {v['final_loss']:.3f} | "
        f"{c['first_loss']:.3f} -> {c['final_loss']:.3f} |",
        f"| held-out caption loss, right image | {held['loss_right_image']:.3f} | {base['loss_right_image']:.3f} |",
        f"| held-out caption loss, another image | {held['loss_other_image']:.3f} | {base['loss_other_image']:.3f} |",
        f"| right image gives the lower loss (chance 50%) | {held['right_image_lower']:.0%} | "
        f"{base['right_image_lower']:.0%} |",
        f"| caption retrieval among {held['retrieval_k']} (chance {held['retrieval_chance']:.0%}) | "
        f"{held['retrieval_accuracy']:.0%} | {base['retrieval_accuracy']:.0%} |",
        f"| median training tokens/s | {v['median_tokens_per_s']:.0f} | |",
        f"| speed-up 1 - t_d / t_c | {s['speedup']['speedup']:.0%} | |", "",
        "Retrieval scores each candidate caption by its loss after the image minus its loss alone "
        "(what the image explains).", "",
        "![loss curves](loss_curves.png)", "", "![captions](captions.png)", "",
        "| held-out image | truth | generated |", "|---|---|---|",
        *[f"| {g['source']} | {g['caption']} | {g['generated']} |" for g in v["generated"]],
    ]
    return "\n".join(lines) + "\n"
