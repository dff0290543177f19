"""What the benchmarks share: timing a step on whatever device runs it, and at the end a markdown table on stdout
and the numbers as JSON under ``--out``."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable, Sequence

import torch


def timed(step: Callable[[], object]) -> float:
    """Seconds ``step()`` takes, its queued GPU work included (the device is synchronised before and after)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    began = time.perf_counter()
    step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - began


def median_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """A distribution-free confidence interval of the median of ``values`` (independent draws).

    The order statistics ``x_(j)`` and ``x_(n+1-j)``, ``j`` the largest rank with ``P(B < j) <= (1 - confidence)
    / 2`` for ``B ~ Binomial(n, 1/2)`` (the count of draws below the true median): the interval covers the true
    median with probability at least ``confidence``, whatever the distribution. Example: 40 values give the 14th
    and the 27th smallest (coverage 96.2%). Below 6 values no rank qualifies at 95%; the sample's range is
    returned (coverage ``1 - 2**(1 - n)``).
    """
    xs, n = sorted(values), len(values)
    if n == 0:
        raise ValueError("median_interval needs at least one value")
    below, j = 1, 1  # below = 2**n * P(B < j)
    while j < (n + 1) // 2 and (below + math.comb(n, j)) / 2**n <= (1 - confidence) / 2:
        below, j = below + math.comb(n, j), j + 1
    return xs[j - 1], xs[n - j]


def write_json(out: str | Path, filename: str, payload: dict) -> Path:
    """``out/filename`` holds ``payload``; benchmarks with long cells call it after each one, so a run stopped
    part-way (a time limit, a crash) keeps what it measured."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / filename
    path.write_text(json.dumps(payload, indent=2))
    return path


def publish(out: str | Path, filename: str, payload: dict, table: str) -> Path:
    path = write_json(out, filename, payload)
    print(table)
    print(f"wrote {path}")
    return path
