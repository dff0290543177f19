"""The run commands: train a recipe, the end-to-end demo, the ViQ tokenizer chain, benchmarks."""

from __future__ import annotations

import argparse
import os

from viq_mllm.cli.launch import relaunched
from viq_mllm.console import existing
from viq_mllm.recipe import load_recipe


def _train(args: argparse.Namespace) -> int:
    if args.max_restarts and not args.nproc:
        raise ValueError("--max-restarts restarts the processes that --nproc launches; give --nproc N too (under "
                         "your own torchrun, pass --max-restarts to torchrun)")
    world = args.nproc if args.nproc else int(os.environ.get("WORLD_SIZE", "1"))
    recipe = load_recipe(args.recipe, args.overrides, world_size=world)
    status = relaunched(args)
    if status is not None:
        return status
    from megatron_ext.jobs.run import run_recipe

    run_recipe(recipe)
    return 0


def _viq_chain(args: argparse.Namespace) -> int:
    from viq_mllm.jobs.viq_chain import run_chain

    run_chain(args.out)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from viq_mllm.jobs.demo import run_demo

    run_demo(args.out)
    return 0


#: benchmark name -> module with ``main(argv)``
BENCHMARKS = {
    "speedup": "megatron_ext.bench.speedup",
    "train": "megatron_ext.bench.train",
    "packing": "megatron_ext.bench.packing",
    "health": "megatron_ext.bench.health",
    "data": "megatron_ext.bench.data",
    "tokenize": "viq_mllm.bench.tokenize",
    "encode": "viq_mllm.bench.encode",
}


def _bench(args: argparse.Namespace) -> int:
    import importlib

    module = importlib.import_module(BENCHMARKS[args.what])
    return module.main(args.rest + (["--out", args.out] if args.out else []))


def add_train(sub) -> None:
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
    train.add_argument("--max-restarts", type=int, default=0,
                       help="with --nproc: start every process again, up to N times, when one dies (the run "
                       "resumes from its last checkpoint)")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")
    train.set_defaults(func=_train)


def add_demo(sub) -> None:
    demo = sub.add_parser("demo", help="the end-to-end job on offline real data")
    demo.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    demo.set_defaults(func=_demo)


def add_viq_chain(sub) -> None:
    chain = sub.add_parser(
        "viq-chain", help="train a tiny ViQ tokenizer through all four stages (SmolLM2-135M, real offline data)",
        description="stage 1 (text-aligned, EfficientNet-Lite0 teacher) -> stage 2-1 (proximal) -> stage 2-2 (FSQ) "
                    "-> decoder, through a frozen SmolLM2-135M; ~27 min on 2 CPU cores. Writes report.md, "
                    "summary.json, loss_terms.png and the final tokenizer (OUT/decoder/tokenizer).")
    chain.add_argument("--out", default="runs/viq_chain", help="output directory (default: runs/viq_chain)")
    chain.set_defaults(func=_viq_chain)


def add_bench(sub) -> None:
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
