"""Numerical health of a training run, one policy for every loop: a step whose loss or gradient norm is NaN/inf
is skipped (its update not applied, counted in ``metrics.jsonl`` as ``skipped`` / ``nan_skips``), and more than
``train.max_nan_skips`` consecutive skips stop the run with :class:`NonFiniteLossError` (a non-zero exit naming the
step) before any checkpoint of the bad state can be written.

    >>> health = Health(max_consecutive=1)
    >>> health.record(step=7, applied=False, detail="loss nan")   # one skip is tolerated
    >>> health.record(step=8, applied=False, detail="loss nan")
    Traceback (most recent call last):
    ...
    viq_mllm.health.NonFiniteLossError: step 8: loss nan; 2 consecutive steps were not finite ...
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """More than ``train.max_nan_skips`` consecutive steps had a NaN/inf loss or gradient norm."""


class Health:
    """Counts skipped steps (``total``, resumed from a checkpoint's counters) and consecutive ones."""

    def __init__(self, max_consecutive: int, total: int = 0):
        self.max_consecutive, self.total, self.consecutive, self.step = max_consecutive, total, 0, 0

    @property
    def suspect_step(self) -> int:
        """During a run of skips, the step whose update left the parameters that go non-finite (skips change
        nothing, so its checkpoint and any written since hold that state); otherwise the last step."""
        return self.step - self.consecutive

    def record(self, step: int, applied: bool, detail: str) -> None:
        """Count step ``step`` (1-based); raise once the consecutive skips exceed the limit."""
        self.step = step
        if applied:
            self.consecutive = 0
            return
        self.total += 1
        self.consecutive += 1
        log.warning("step %d skipped: %s", step, detail)
        if self.consecutive > self.max_consecutive:
            raise NonFiniteLossError(
                f"step {step}: {detail}; {self.consecutive} consecutive steps were not finite "
                f"(train.max_nan_skips={self.max_consecutive}); lower train.lr or raise train.warmup_steps")
