"""Faults on purpose, for the tests of what a job does when a rank dies or hangs; off unless named.

``VIQ_MLLM_FAULT=kill:STEP:RANK`` SIGKILLs global rank RANK when it has finished optimizer step STEP;
``VIQ_MLLM_FAULT=hang:STEP:RANK`` makes it stop answering there (it sleeps, as a rank stuck in a driver call or a
dead NIC would), so every other rank waits in its next collective until ``parallel.timeout_s``. A fault fires in
the first attempt of a torchrun job only (``TORCHELASTIC_RESTART_COUNT`` 0 or unset), so a job restarted with
``--max-restarts`` runs through.

Example: ``VIQ_MLLM_FAULT=kill:3:1 torchrun --nproc_per_node 2 --max-restarts 1 -m viq_mllm train ...`` kills rank 1
after step 3; torchrun stops rank 0, starts both again, and the run resumes from its last checkpoint.
"""

from __future__ import annotations

import logging
import os
import signal
import time

VARIABLE = "VIQ_MLLM_FAULT"
log = logging.getLogger(__name__)


def after_step(step: int, rank: int) -> None:
    """Inject the fault ``VIQ_MLLM_FAULT`` names if it is for this step and rank (nothing when unset)."""
    spec = os.environ.get(VARIABLE)
    if not spec or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        return
    try:
        kind, at_step, at_rank = spec.split(":")
        at_step, at_rank = int(at_step), int(at_rank)
    except ValueError:
        raise ValueError(f"{VARIABLE}={spec!r}: expected kill:STEP:RANK or hang:STEP:RANK") from None
    if kind not in ("kill", "hang"):
        raise ValueError(f"{VARIABLE}={spec!r}: the fault is kill or hang, not {kind!r}")
    if (step, rank) != (at_step, at_rank):
        return
    log.warning("%s: rank %d %s after step %d", VARIABLE, rank, "killed" if kind == "kill" else "hangs", step)
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    while True:
        time.sleep(3600)
