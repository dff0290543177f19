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
import sys

from viq_mllm.cli import data, models, runs
from viq_mllm.cli.runs import BENCHMARKS
from viq_mllm.console import Parser, configure_logging, debugging, fail, plain

__all__ = ["BENCHMARKS", "EXPECTED_ERRORS", "build_parser", "main"]

#: what a user's input can cause (a missing file, a wrong field, a checkpoint of another vocabulary, a diverged
#: run): one line and exit status 2, the traceback only with --debug; anything else is a bug and keeps its traceback
EXPECTED_ERRORS = (OSError, ValueError, ArithmeticError)




def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="viq-mllm", description=plain(__doc__))
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an expected error (or set VIQ_MLLM_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (runs.add_train, data.add_tokenize, data.add_prepare, data.add_extend_vocab, data.add_resize_vocab,
                data.add_assets, data.add_verify, models.add_convert, models.add_generate, models.add_export, models.add_eval,
                models.add_import_viq, runs.add_demo, runs.add_viq_chain, runs.add_bench):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if extra and args.command == "train" and all("=" in item and not item.startswith("-") for item in extra):
        args.overrides = [*args.overrides, *extra]  # overrides may follow --nproc
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    configure_logging(debugging(args.debug))
    try:
        return args.func(args)
    except EXPECTED_ERRORS as error:
        if debugging(args.debug):
            raise
        return fail(f"viq-mllm {args.command}", error)


if __name__ == "__main__":
    sys.exit(main())
