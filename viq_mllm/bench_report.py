"""What every benchmark does at the end: a markdown table on stdout and the numbers as JSON under ``--out``."""

from __future__ import annotations

import json
from pathlib import Path


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def publish(out: str | Path, filename: str, payload: dict, table: str) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / filename
    path.write_text(json.dumps(payload, indent=2))
    print(table)
    print(f"wrote {path}")
    return path
