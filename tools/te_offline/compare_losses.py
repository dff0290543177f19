"""FP8 runs against the bf16 run of the same recipe: the mean loss of the last 10 steps, the median step time and
an MFU lower bound; exit 1 when an FP8 run's last-10 mean is more than TOLERANCE nats from bf16's.

usage: python compare_losses.py BF16_RUN_DIR FP8_RUN_DIR... [--out JSON]

TOLERANCE 0.05 nats: FP8 GEMMs (e4m3 forward, e5m2 gradients, per-tensor scales) perturb each step by about the
bf16 noise of a few batches; published FP8 trainings end within ~1% of bf16's loss, 0.05 nats at the losses
(~2-5) of these short runs.

MFU counts the matmul weights (6 x parameters per token in the layers, the output layer at the supervised
positions; megatron_ext/bench/flops.py) and leaves attention out, so it is a lower bound; it divides by the GPU's
dense bf16 peak for every run, FP8 included (FP8's peak is twice that).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from megatron_ext.bench.flops import GPTShape
from megatron_ext.bench.speedup import peak_tflops
from viq_mllm.metrics import read_metrics
from viq_mllm.recipe import load_recipe
from viq_mllm.vocab.ids import padded_vocab_size

TOLERANCE = 0.05


def _padded_vocab(recipe) -> int:
    if recipe.kind == "vlm":
        from viq_mllm.vocab.tokenizer import MultimodalTokenizer

        return MultimodalTokenizer.from_dir(recipe.data.vocab).vocab.padded_size
    from viq_mllm.vocab.text_tokenizers import load_text_tokenizer

    return padded_vocab_size(load_text_tokenizer(recipe.data.tokenizer).vocab_size)


def summary(run_dir: Path, peak: float) -> dict:
    rows = read_metrics(run_dir)
    if not rows:
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl rows (did the run start?)")
    recipe = load_recipe(run_dir / "recipe.yaml")
    m = recipe.model
    shape = GPTShape(m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads, m.query_groups,
                     _padded_vocab(recipe))
    steady = rows[1:]  # the first step compiles and warms up
    flops = [6.0 * (shape.layer_params * r["tokens"] + shape.vocab * shape.hidden * r["loss_tokens"])
             for r in steady]
    return {"run": str(run_dir), "steps": len(rows), "losses": [r["loss"] for r in rows],
            "last10_mean": statistics.fmean(r["loss"] for r in rows[-10:]),
            "median_step_s": statistics.median(r["step_time_s"] for r in steady),
            "mfu_lower_bound": statistics.median(f / r["step_time_s"] / 1e12 / peak for f, r in zip(flops, steady))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bf16", type=Path)
    parser.add_argument("fp8", type=Path, nargs="+")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    peak, peak_note = peak_tflops()
    reference = summary(args.bf16, peak)
    results, ok = {"bf16": reference, "tolerance_nats": TOLERANCE, "peak": peak_note}, True
    print(f"{'run':<28} {'last-10 loss':>12} {'vs bf16':>8} {'step s':>7} {'MFU >=':>7}")
    print(f"{args.bf16.name:<28} {reference['last10_mean']:>12.4f} {'':>8} {reference['median_step_s']:>7.3f} "
          f"{reference['mfu_lower_bound']:>7.1%}")
    for run in args.fp8:
        s = summary(run, peak)
        s["delta"] = s["last10_mean"] - reference["last10_mean"]
        s["within_tolerance"] = abs(s["delta"]) <= TOLERANCE
        ok &= s["within_tolerance"]
        results[run.name] = s
        print(f"{run.name:<28} {s['last10_mean']:>12.4f} {s['delta']:>+8.4f} {s['median_step_s']:>7.3f} "
              f"{s['mfu_lower_bound']:>7.1%}")
    print(f"MFU against {peak_note}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
