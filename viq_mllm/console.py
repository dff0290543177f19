"""What the command line shows a person: help text without docstring markup, one-line errors, progress bars that
suit a terminal and a log file alike.

    >>> plain("Run ``viq-mllm train``; see :func:`~viq_mllm.recipe.load_recipe`.")
    'Run viq-mllm train; see load_recipe.'
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from pathlib import Path
from typing import NoReturn

#: set (to anything but 0) to see the traceback of an expected error, as ``--debug`` does
DEBUG_ENV = "VIQ_MLLM_DEBUG"
#: seconds between two progress lines when standard error is a file or a CI log, not a terminal
LOG_INTERVAL_S = 10.0

_ROLE = re.compile(r":(?:func|class|mod|meth|attr|data|exc):`~?([\w.]+)`")
_LITERAL = re.compile(r"``(.+?)``")


def plain(doc: str) -> str:
    """The first paragraph of a docstring as plain text: ``x`` -> x, :func:`~a.b` -> b, :mod:`a.b` -> a.b."""
    first = doc.strip().split("\n\n")[0]
    text = _ROLE.sub(lambda m: m.group(1).rsplit(".", 1)[-1] if "~" in m.group(0) else m.group(1), first)
    return _LITERAL.sub(r"\1", text)


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line (``prog: argument --x: why``), exit status 2, and
    whose ``--help`` shows every option's default."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (--help for usage)\n")


def existing(path: str) -> str:
    """argparse ``type=`` for a file or folder that must exist: the error names the argument and the path."""
    if not os.path.exists(path):
        raise argparse.ArgumentTypeError(f"{path}: no such file or folder")
    return path


def debugging(argv_flag: bool = False) -> bool:
    return argv_flag or os.environ.get(DEBUG_ENV, "0") not in ("", "0")


def fail(prog: str, error: BaseException) -> int:
    """Print an expected error as one line naming the command, and return the exit status 2."""
    print(f"{prog}: {error}", file=sys.stderr)
    return 2


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub markdown table (the benchmarks' and ``eval``'s output)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


class _TqdmHandler(logging.StreamHandler):
    """Log lines written through ``tqdm.write``, so an open progress bar is redrawn below them, not torn."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging must never stop a job
            self.handleError(record)


def configure_logging(debug: bool = False) -> None:
    """The one logging set-up of the command line: the project's loggers (``viq_mllm``, ``megatron_ext``) print
    their messages to standard error (warnings prefixed), rank 0 at INFO, other ranks (``RANK`` set by torchrun)
    warnings only, so a run of 8 processes says each thing once."""
    rank = int(os.environ.get("RANK", "0"))
    handler = _TqdmHandler()
    handler.setFormatter(_Format(rank))
    for name in ("viq_mllm", "megatron_ext"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.propagate = False
        logger.setLevel(logging.DEBUG if debug else logging.INFO if rank == 0 else logging.WARNING)


class _RunLog(logging.FileHandler):
    """The run's log file (one class, so a second run in the same process replaces the first's)."""


def log_to_file(path: Path) -> None:
    """Also write the project's log lines to ``path``, as the terminal shows them (appended: a resumed run
    continues its log). Rank 0's lines: the other ranks' warnings reach the terminal."""
    handler = _RunLog(path, encoding="utf-8")
    handler.setFormatter(_Format(0))
    for name in ("viq_mllm", "megatron_ext"):
        logger = logging.getLogger(name)
        for old in [h for h in logger.handlers if isinstance(h, _RunLog)]:
            old.close()  # the previous run's file (the same handler on both loggers: closing twice is harmless)
        logger.handlers[:] = [h for h in logger.handlers if not isinstance(h, _RunLog)] + [handler]
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)


class _Format(logging.Formatter):
    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.levelno >= logging.WARNING:
            text = f"{record.levelname.lower()}: {text}"
        return f"[rank {self.rank}] {text}" if self.rank else text


def progress(total: int, desc: str, unit: str, initial: int = 0, disable: bool = False):
    """A tqdm bar: redrawn freely on a terminal, one line every ``LOG_INTERVAL_S`` seconds in a file or CI log."""
    from tqdm import tqdm

    tty = sys.stderr.isatty()
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=tty, disable=disable,
                mininterval=0.1 if tty else LOG_INTERVAL_S)
