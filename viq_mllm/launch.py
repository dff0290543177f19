"""Child processes, one way for every job that needs them.

- :func:`command`: ``python -m viq_mllm ARGS`` in a child (the demo's steps, benchmarks that time real runs), with
  Python's warnings off and the child's errors raised here naming the command;
- :func:`call`: a function of a module run in a fresh process, its JSON-able arguments and result passed as JSON
  (measurements whose memory must not carry into the next one, the one-process ``init.hf`` conversion inside a
  distributed run); an expected error in the child (OSError, ValueError, ArithmeticError) comes back as
  :class:`ChildError` with the child's one-line message;
- :func:`torchrun`: a command relaunched in N processes through ``torchrun --standalone``.

    >>> call("statistics:median", [3, 1, 2])
    2
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from typing import Any

from viq_mllm.console import configure_logging

#: the variables torchrun sets; a child started with ``alone=True`` is a plain single process
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                      "MASTER_PORT", "TORCHELASTIC_RUN_ID")
_EXPECTED = (OSError, ValueError, ArithmeticError)
_RESULT = "VIQ_MLLM_RESULT "


class ChildError(ValueError):
    """A child process stopped on an expected error; the message is the child's."""


def environment(alone: bool = False) -> dict[str, str]:
    """This process's environment with warnings off; ``alone``: without torchrun's variables."""
    env = {k: v for k, v in os.environ.items() if not (alone and k in LAUNCHER_VARIABLES)}
    return {**env, "PYTHONWARNINGS": "ignore"}


def command(*args: str, capture: bool = False, cwd: str | None = None) -> subprocess.CompletedProcess:
    """``python -m viq_mllm ARGS`` in a child; raises :class:`ChildError` (with the end of its standard error when
    captured) if it fails."""
    proc = subprocess.run([sys.executable, "-m", "viq_mllm", *args], env=environment(), cwd=cwd,
                          capture_output=capture, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or "").strip().splitlines()[-3:] if capture else []
        raise ChildError(f"`viq-mllm {' '.join(args)}` failed with status {proc.returncode}"
                         + (": " + " / ".join(tail) if tail else " (its error is above)"))
    return proc


def call(target: str, *args: Any, alone: bool = False, cwd: str | None = None) -> Any:
    """``module:function(*args)`` in a fresh Python process; returns its result (both through JSON)."""
    proc = subprocess.run([sys.executable, "-m", "viq_mllm.launch", target, json.dumps(list(args))],
                          env=environment(alone), cwd=cwd, stdout=subprocess.PIPE, text=True)
    results = [line[len(_RESULT):] for line in proc.stdout.splitlines() if line.startswith(_RESULT)]
    if proc.returncode != 0 or not results:
        raise ChildError(f"{target} failed in its process (status {proc.returncode}; its error is above)")
    return json.loads(results[-1])


#: torchrun's agent shares its rendezvous store with the workers by default, and a restarted job's workers then
#: read their predecessors' connection keys and never connect (pytorch/pytorch#135712, still so in torch 2.13):
#: each rendezvous round gets a store of its own with this set. Launch torchrun on a cluster with it exported too.
FRESH_STORE = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def torchrun(nproc: int, args: list[str], max_restarts: int = 0) -> int:
    """``viq-mllm ARGS`` in ``nproc`` processes on this machine; returns torchrun's exit status. ``max_restarts``:
    how often torchrun starts every process again when one fails (a run resumes from its last checkpoint)."""
    return subprocess.call([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            f"--nproc_per_node={nproc}", f"--max-restarts={max_restarts}", "-m", "viq_mllm", *args],
                           env={**os.environ, **FRESH_STORE})


def _child(target: str, arguments: str) -> int:
    """The child's side of :func:`call`: run the function, print its result on a line of its own."""
    configure_logging()
    module, _, name = target.partition(":")
    try:
        result = getattr(importlib.import_module(module), name)(*json.loads(arguments))
    except _EXPECTED as error:
        print(f"{target}: {error}", file=sys.stderr)
        return 2
    print(_RESULT + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_child(*sys.argv[1:3]))
