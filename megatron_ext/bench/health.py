"""``viq-mllm bench health``: what the non-finite check costs a training step.

The loop runs megatron's optimizer step call by call with a skip when the global gradient norm is not finite
(:func:`megatron_ext.training.loop.optimizer_step`); the norm is computed once, as megatron's ``step`` does. This
benchmark times the same trainer's full step (gradients + update) with the check and with megatron's bare
``step``, alternating round by round on one model so machine noise hits both alike, and reports the medians, the
per-round ratio with its 95% interval (``viq_mllm.bench.report.median_interval``), and the norm alone as a share of
the step (what the check would cost if it had to compute its own norm).
"""

from __future__ import annotations

import statistics

from megatron_ext.bench.train import CONFIGS, _batch, _recipe
from megatron_ext.model.gpt import build_gpt, transformer_config
from megatron_ext.patches import cpu_compat
from megatron_ext.training.checkpoint import VocabRecord
from megatron_ext.training.loop import build_trainer, forward_backward, optimizer_step
from megatron_ext.training.parallel import init_distributed, shutdown
from viq_mllm.bench.report import median_interval, publish, timed
from viq_mllm.console import Parser, markdown_table, plain


def measure(name: str, rounds: int, layout) -> dict:
    cfg = CONFIGS[name]
    recipe = _recipe(cfg, steps=2 * rounds + 10)
    config = transformer_config(recipe.model, recipe.parallel, recipe.train.precision)
    gpt = build_gpt(config, recipe.model, recipe.parallel, cfg["vocab"], layout, 0)
    trainer = build_trainer(recipe, layout, gpt,
                            VocabRecord(text_size=cfg["vocab"], padded_size=cfg["vocab"], text_fingerprint="random"))
    batch = _batch(cfg)

    def bare():
        forward_backward(trainer, iter([batch]))
        cpu_compat.native(trainer.optimizer.step)()
        trainer.scheduler.step(increment=1)

    def checked():
        forward_backward(trainer, iter([batch]))
        optimizer_step(trainer)

    for step in (bare, checked):  # warm-up: allocator, lazily built optimizer state
        step()
    times = {"bare": [], "checked": [], "norm": []}
    for _ in range(rounds):
        times["bare"].append(timed(bare))
        times["checked"].append(timed(checked))
        times["norm"].append(timed(cpu_compat.native(trainer.optimizer.get_grad_norm)))
    ratios = [c / b for c, b in zip(times["checked"], times["bare"])]
    low, high = median_interval(ratios)
    return {"config": name, "rounds": rounds, **{f"{k}_s": statistics.median(v) for k, v in times.items()},
            "ratio_median": statistics.median(ratios), "ratio_ci95": [low, high],
            "norm_share": statistics.median(times["norm"]) / statistics.median(times["bare"])}


def format_table(rows: list[dict]) -> str:
    return markdown_table(
        ["config", "bare step (s)", "checked step (s)", "checked / bare (95% CI)", "norm alone / step"],
        [[r["config"], f"{r['bare_s']:.4f}", f"{r['checked_s']:.4f}",
          f"{r['ratio_median']:.3f} ({r['ratio_ci95'][0]:.3f}-{r['ratio_ci95'][1]:.3f})", f"{r['norm_share']:.1%}"]
         for r in rows])


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="viq-mllm bench health", description=plain(__doc__))
    parser.add_argument("--configs", nargs="+", default=["20M", "20M-V49k"], choices=list(CONFIGS))
    parser.add_argument("--rounds", type=int, default=20, help="timed steps per side (median reported)")
    parser.add_argument("--out", default="runs/bench_health", help="writes bench_health.json here")
    args = parser.parse_args(argv)
    layout = init_distributed(tp=1, pp=1, seed=0)
    try:
        rows = [measure(name, args.rounds, layout) for name in args.configs]
    finally:
        shutdown()
    publish(args.out, "bench_health.json", {"rows": rows}, format_table(rows))
    return 0
