"""Per-step metrics of a run: ``metrics.jsonl`` (one JSON object per optimizer step), TensorBoard, wandb.

Only rank 0 writes. On resume, rows past the restored step are dropped first, so the file always reads as
one uninterrupted run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional


class MetricsLog:
    def __init__(self, run_dir: Path, resume_step: int, tensorboard: bool, wandb_mode: str, project: str, name: str):
        self.path = run_dir / "metrics.jsonl"
        _truncate_after(self.path, resume_step)
        self._tb = None
        self._wandb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if wandb_mode != "disabled":
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb

            self._wandb = wandb.init(
                project=project, name=name, dir=str(run_dir), mode=wandb_mode, resume="allow",
                id=_wandb_id(run_dir), settings=wandb.Settings(console="off", x_disable_stats=True),
            )

    def log(self, row: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        step = row["step"]
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                if self._tb is not None:
                    self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if k != "step"}, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _truncate_after(path: Path, step: int) -> None:
    if path.exists():
        rows = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        path.write_text("".join(row + "\n" for row in rows))


def _wandb_id(run_dir: Path) -> Optional[str]:
    """One wandb run per run.dir, kept across resumes."""
    id_file = run_dir / "wandb_id"
    if not id_file.exists():
        import uuid

        id_file.write_text(uuid.uuid4().hex[:12])
    return id_file.read_text().strip()
