"""Dispatch a validated recipe to the training job of its kind, inside the launched processes; rank 0 also
writes the run's log lines to ``RUN_DIR/log.txt`` (appended when a run resumes)."""

from __future__ import annotations

import os
from pathlib import Path

from megatron_ext.jobs.text_lm import train_text_lm
from megatron_ext.jobs.viq_stages import train_viq_stage
from megatron_ext.jobs.vlm import train_vlm
from megatron_ext.training.parallel import shutdown
from viq_mllm.console import log_to_file
from viq_mllm.recipe import Recipe


def run_recipe(recipe: Recipe) -> list[dict]:
    if recipe.kind == "text_lm":
        job = train_text_lm
    elif recipe.kind == "vlm":
        job = train_vlm
    elif recipe.kind == "viq":
        job = train_viq_stage
    else:
        raise ValueError(f"kind={recipe.kind!r} has no training job")
    if int(os.environ.get("RANK", "0")) == 0:
        Path(recipe.run.dir).mkdir(parents=True, exist_ok=True)
        log_to_file(Path(recipe.run.dir) / "log.txt")
    try:
        return job(recipe)
    finally:
        shutdown()
