"""``viq-mllm bench data``: the VLM data path at scale: prepare time, start-up time and memory, loader throughput.

For each ``--samples N`` the command writes N synthetic code samples (a 384 px image's 24 x 24 x 4 random codes
and a short caption each; no image is encoded), then measures:

- ``prepare``: ``viq-mllm prepare`` of the shards (seconds);
- start-up, in a fresh process each: from nothing to the first step's micro-batches in hand, seconds and resident
  memory above the imports, for the prepared data (memory-mapped) and, up to ``--in-memory-max`` samples, for the
  shards read and packed in memory (the path without ``prepare``);
- loader rows/s (the tiny VLM recipe's batches: 8 rows a step in micro-batches of 2) with 0 and 2 workers, next to
  the rows/s the tiny VLM's training step consumes (its median step time, measured in the same run).
"""

from __future__ import annotations

import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

from viq_mllm import launch
from megatron_ext.data.prepared import PreparedRows
from megatron_ext.jobs.prepare import prepare
from viq_mllm.bench.report import publish
from viq_mllm.console import Parser, markdown_table, plain
from viq_mllm.data.loader import MicroBatchLoader
from viq_mllm.data.multimodal import PackedDataset, PackedSource, documents_from_shards
from viq_mllm.data.packing import pack
from viq_mllm.data.shards import CodeShards
from viq_mllm.bench.synthetic import make_code_shards
from viq_mllm.metrics import read_metrics
from viq_mllm.vocab.tokenizer import MultimodalTokenizer

ROOT = Path(__file__).resolve().parents[2]
SEQ, GLOBAL, MICRO = 256, 8, 2


def _rss_mb() -> float:
    """Resident memory now (not the peak: the imports' peak would hide what the data adds)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def start_up(kind: str, path: str, vocab: str) -> dict:
    """In this (fresh) process: load the data as a run does and read the first step's micro-batches."""
    before, began = _rss_mb(), time.perf_counter()
    if kind == "prepared":
        rows = PreparedRows(path)
    else:
        tokenizer = MultimodalTokenizer.from_dir(vocab)
        rows = pack(documents_from_shards(CodeShards(path), tokenizer, "pretrain", 16), SEQ)
    batches = list(MicroBatchLoader(PackedDataset([PackedSource(rows, 1.0)], seed=0), GLOBAL, MICRO, 0, 1)(0))
    return {"seconds": time.perf_counter() - began, "rss_mb": _rss_mb() - before, "micro_batches": len(batches)}


def _start_up_in_child(kind: str, path: Path, vocab: Path) -> dict:
    return launch.call("megatron_ext.bench.data:start_up", kind, str(path), str(vocab), cwd=str(ROOT))


def loader_rows_per_s(prepared: Path, workers: int, steps: int) -> float:
    loader = MicroBatchLoader(PackedDataset([PackedSource(PreparedRows(prepared), 1.0)], seed=0), GLOBAL, MICRO, 0, 1,
                              workers=workers)
    list(loader(0))  # workers started, first items in
    began = time.perf_counter()
    for step in range(1, steps + 1):
        for _ in loader(step):
            pass
    return steps * GLOBAL / (time.perf_counter() - began)


def step_rows_per_s(assets: dict, prepared: Path, run_dir: Path) -> float:
    """Rows per second the tiny VLM recipe's training step consumes (median step of 8 after 2 warm-up steps)."""
    launch.command("train", str(ROOT / "recipes" / "vlm_tiny_pretrain.yaml"), f"run.dir={run_dir}",
                   f"data.sources=[{{path: {prepared}}}]", f"data.vocab={assets['vocab']}",
                   f"model.visual.viq={assets['viq']}", "train.steps=10", "train.warmup_steps=2", "checkpoint.every=0",
                   "log.wandb=disabled", "log.tensorboard=false", "log.progress=false", capture=True, cwd=str(ROOT))
    return GLOBAL / statistics.median(r["step_time_s"] for r in read_metrics(run_dir)[2:])


def measure(samples: int, root: Path, in_memory_max: int, loader_steps: int) -> dict:
    assets = make_code_shards(root, samples)
    began = time.perf_counter()
    prepare(assets["shards"], assets["vocab"], root / "prepared", "pretrain", SEQ, show_progress=False)
    row = {"samples": samples, "prepare_s": time.perf_counter() - began,
           "prepared": _start_up_in_child("prepared", root / "prepared", assets["vocab"]),
           "in_memory": (_start_up_in_child("shards", assets["shards"], assets["vocab"])
                         if samples <= in_memory_max else None),
           "loader_rows_per_s": {w: loader_rows_per_s(root / "prepared", w, loader_steps) for w in (0, 2)}}
    row["step_rows_per_s"] = step_rows_per_s(assets, root / "prepared", root / "run")
    return row


def format_table(rows: list[dict]) -> str:
    def start(r):
        return "-" if r is None else f"{r['seconds']:.2f} s / {r['rss_mb']:.0f} MB"

    return markdown_table(
        ["samples", "prepare (s)", "start-up, prepared", "start-up, in memory", "loader rows/s, 0 / 2 workers",
         "step consumes rows/s", "loader / step"],
        [[f"{r['samples']:,}", f"{r['prepare_s']:.1f}", start(r["prepared"]), start(r["in_memory"]),
          f"{r['loader_rows_per_s'][0]:.0f} / {r['loader_rows_per_s'][2]:.0f}", f"{r['step_rows_per_s']:.1f}",
          f"{max(r['loader_rows_per_s'].values()) / r['step_rows_per_s']:.0f}x"] for r in rows])


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="viq-mllm bench data", description=plain(__doc__))
    parser.add_argument("--samples", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--in-memory-max", type=int, default=100_000,
                        help="largest N for which the in-memory path is measured too (it is slow by design)")
    parser.add_argument("--loader-steps", type=int, default=30)
    parser.add_argument("--work", default=None, help="where the synthetic data goes (default: a temporary folder)")
    parser.add_argument("--out", default="runs/bench_data")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        for samples in args.samples:
            rows.append(measure(samples, Path(tmp) / f"n{samples}", args.in_memory_max, args.loader_steps))
            print(format_table(rows[-1:]), flush=True)
    publish(args.out, "bench_data.json", {"rows": rows}, format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
