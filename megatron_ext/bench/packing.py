"""``viq-mllm bench packing``: the tiny VLM recipe with packed rows vs one document per row.

Both variants train the same recipe for the same number of steps on the same shards (synthetic captioned
shapes unless ``--assets`` names a folder made by ``viq_mllm.bench.synthetic``), twice each in alternating order.
Reported per variant: median real (non-padding) tokens/s, padding fraction, step time.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

from viq_mllm import launch
from viq_mllm.bench.report import publish
from viq_mllm.console import Parser, markdown_table, plain
from viq_mllm.bench.synthetic import make_vlm_assets
from viq_mllm.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]


def run(run_dir: Path, assets: dict, pack: bool, steps: int) -> list[dict]:
    launch.command("train", str(ROOT / "recipes" / "vlm_tiny_pretrain.yaml"), f"run.dir={run_dir}",
                   f"data.sources=[{{path: {assets['shards']}}}]", f"data.vocab={assets['vocab']}",
                   f"model.visual.viq={assets['viq']}", f"data.pack={str(pack).lower()}", f"train.steps={steps}",
                   "train.warmup_steps=2", "checkpoint.every=0", "log.wandb=disabled", "log.tensorboard=false",
                   "log.progress=false", capture=True, cwd=str(ROOT))
    return read_metrics(run_dir)[2:]  # the first steps warm up


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="viq-mllm bench packing", description=plain(__doc__))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default="runs/bench_packing")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        assets = make_vlm_assets(root / "assets", images=120)
        rows: dict[str, list[dict]] = {"packed": [], "unpacked": []}
        for i in range(2):
            for name in ("unpacked", "packed"):
                rows[name] += run(root / f"{name}{i}", assets, name == "packed", args.steps)
    table = {}
    for name, metrics in rows.items():
        table[name] = {
            "real_tokens_per_s": statistics.median(r["real_tokens"] / r["step_time_s"] for r in metrics),
            "padding_fraction": statistics.median(r["padding_fraction"] for r in metrics),
            "step_time_s": statistics.median(r["step_time_s"] for r in metrics),
            "steps": len(metrics),
        }
    ratio = table["packed"]["real_tokens_per_s"] / table["unpacked"]["real_tokens_per_s"]
    publish(args.out, "bench_packing.json", table, markdown_table(
        ["batches", "real tokens/s", "padding fraction", "step time (s)"],
        [[name, f"{r['real_tokens_per_s']:.0f}", f"{r['padding_fraction']:.1%}", f"{r['step_time_s']:.3f}"]
         for name, r in table.items()]) + f"\npacked / unpacked real tokens/s: {ratio:.2f}x")
    return 0
