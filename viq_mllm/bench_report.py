"""What the benchmarks share: timing a step on whatever device runs it, and at the end a markdown table on stdout
and the numbers as JSON under ``--out``."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

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


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


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
