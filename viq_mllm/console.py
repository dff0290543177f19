"""What the command line shows a person: help text without docstring markup, one-line errors, progress bars that
suit a terminal and a log file alike.

    >>> plain("Run ``viq-mllm train``; see :func:`~viq_mllm.recipe.load_recipe`.")
    'Run viq-mllm train; see load_recipe.'
"""

from __future__ import annotations

import argparse
import os
import re
import sys
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
    """An ``ArgumentParser`` whose usage errors are one line (``prog: argument --x: why``), exit status 2."""

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


def progress(total: int, desc: str, unit: str, initial: int = 0, disable: bool = False):
    """A tqdm bar: redrawn freely on a terminal, one line every ``LOG_INTERVAL_S`` seconds in a file or CI log."""
    from tqdm import tqdm

    tty = sys.stderr.isatty()
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=tty, disable=disable,
                mininterval=0.1 if tty else LOG_INTERVAL_S)
