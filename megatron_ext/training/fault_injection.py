"""Faults on purpose, for the tests of what a job does when a rank dies or hangs; off unless named.

``VIQ_MLLM_FAULT=kill:STEP:RANK`` SIGKILLs global rank RANK when it has finished optimizer step STEP;
``VIQ_MLLM_FAULT=hang:STEP:RANK`` makes it stop answering there (it sleeps, as a rank stuck in a driver call or a
dead NIC would), so every other rank waits in its next collective until ``parallel.timeout_s``. A fault fires in
the first attempt of a torchrun job only (``TORCHELASTIC_RESTART_COUNT`` 0 or unset), so a job restarted with
``--max-restarts`` runs through. The variable is read once, before the first step: a malformed one, or one naming
a rank the job does not have, is refused before any compute.

Example: ``VIQ_MLLM_FAULT=kill:3:1 torchrun --nproc_per_node 2 --max-restarts 1 -m viq_mllm train ...`` kills rank 1
after step 3; torchrun stops rank 0, starts both again, and the run resumes from its last checkpoint.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass
from typing import Optional

VARIABLE = "VIQ_MLLM_FAULT"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Fault:
    kind: str  # kill | hang
    step: int
    rank: int

    def after_step(self, step: int, rank: int) -> None:
        """Inject the fault if it is for this step and rank."""
        if (step, rank) != (self.step, self.rank):
            return
        log.warning("%s: rank %d %s after step %d", VARIABLE, rank, "killed" if self.kind == "kill" else "hangs", step)
        if self.kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        while True:
            time.sleep(3600)


def planned(world_size: int) -> Optional[Fault]:
    """The fault ``VIQ_MLLM_FAULT`` names for this attempt; None when unset or in a restarted attempt."""
    spec = os.environ.get(VARIABLE)
    if not spec or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        return None
    try:
        kind, step, rank = spec.split(":")
        fault = Fault(kind, int(step), int(rank))
    except ValueError:
        raise ValueError(f"{VARIABLE}={spec!r}: expected kill:STEP:RANK or hang:STEP:RANK") from None
    if fault.kind not in ("kill", "hang"):
        raise ValueError(f"{VARIABLE}={spec!r}: the fault is kill or hang, not {fault.kind!r}")
    if not 0 <= fault.rank < world_size:
        raise ValueError(f"{VARIABLE}={spec!r}: rank {fault.rank} is not one of this job's {world_size} ranks")
    return fault
