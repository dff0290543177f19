"""Running a command in several processes: ``--nproc N`` relaunches it under ``torchrun --standalone``; commands
whose ranks split the work read their rank and world size from torchrun's environment."""

from __future__ import annotations

import argparse
import functools
import os
from typing import Callable

from viq_mllm import launch


#: the options that shape the launch, not the command: left out of what each process runs
LAUNCH_OPTIONS = ("--nproc", "--max-restarts")


def relaunched(args: argparse.Namespace) -> int | None:
    """With ``--nproc N`` (and not already inside torchrun): this same command in N processes through
    ``torchrun --standalone`` (``--max-restarts`` where the command has it), returning its exit status; otherwise
    None (run here)."""
    if not args.nproc or "LOCAL_RANK" in os.environ:
        return None
    rest, skip = [], False
    for item in args.argv:
        if skip or item.startswith(tuple(f"{option}=" for option in LAUNCH_OPTIONS)):
            skip = False
            continue
        skip = item in LAUNCH_OPTIONS
        if not skip:
            rest.append(item)
    return launch.torchrun(args.nproc, rest, getattr(args, "max_restarts", 0))


def on_every_rank(job: Callable[[argparse.Namespace, int, int], int]) -> Callable[[argparse.Namespace], int]:
    """A command whose ranks split the work: relaunched under torchrun with ``--nproc N``, otherwise run here as
    ``job(args, rank, world)`` with torchrun's (or a single process's) rank and world size."""

    @functools.wraps(job)
    def run(args: argparse.Namespace) -> int:
        status = relaunched(args)
        if status is not None:
            return status
        return job(args, int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))

    return run
