"""A SIGKILLed run, started again with the same run.dir, continues exactly as if never stopped (a run stopped at
its step count resumes through the same checkpoint path: test_vlm.py).

Dropout is on (0.1), so the RNG states must be restored too, not only weights, optimizer, schedule and data.
"""

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import QUIET, ROOT, TINY

from viq_mllm.metrics import read_metrics

SCHEDULE = ["train.steps=6", "train.decay_steps=6", "train.warmup_steps=2"]
COMMON = [*SCHEDULE, "model.hidden_dropout=0.1", "model.attention_dropout=0.1"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    from conftest import train_tiny

    return train_tiny(tmp_path_factory.mktemp("straight") / "run", *COMMON)


def _assert_same(resumed, straight, loss_tolerance: float = 1e-6):
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for ours, ref in zip(resumed, straight):
        assert abs(ours["loss"] - ref["loss"]) < loss_tolerance, (ours, ref)
        assert abs(ours["lr"] - ref["lr"]) < 1e-12


@pytest.mark.e2e
def test_dropout_changes_the_losses(tiny, uninterrupted):
    """Guards the resume tests: the same seed, weights and data without dropout give other losses, so the dropout
    draws (the RNG states a resume must restore) are in every loss those tests compare."""
    without = tiny("no_dropout", *COMMON, "model.hidden_dropout=0.0", "model.attention_dropout=0.0")
    assert without[0]["step"] == uninterrupted[0]["step"] == 1
    assert all(abs(a["loss"] - b["loss"]) > 1e-4 for a, b in zip(without, uninterrupted))


@pytest.mark.e2e
def test_sigkill_mid_run_then_resume(tiny, tmp_path, uninterrupted):
    run_dir = tmp_path / "killed"
    cmd = [sys.executable, "-m", "viq_mllm", "train", TINY, f"run.dir={run_dir}", *QUIET, *COMMON,
           "checkpoint.every=1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    deadline = time.time() + 240
    while len(read_metrics(run_dir)) < 4 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(read_metrics(run_dir)) < 6
    resumed = tiny("killed", *COMMON, "checkpoint.every=1")
    _assert_same(resumed, uninterrupted)


@pytest.mark.e2e
def test_distributed_optimizer_resumes_exactly_on_another_data_parallel_size(tiny):
    """The GPU recipes' setting (bf16, distributed optimizer): stopped on 2 ranks, resumed on 1. The optimizer
    state is resharded over the data-parallel ranks and Adam's step counts come back (no dropout: the RNG streams
    belong to the ranks, and this run has a different number of them).

    From step 4 the gradients are summed over one rank instead of two, in another order: the fp32 update moves by
    an ulp, which can flip a weight's bf16 rounding, and the loss by a few 1e-6 (2e-6 seen). A lost or misplaced
    optimizer state (Adam's moments or step counts) moves it by more than 1e-3 at this learning rate."""
    common = [*SCHEDULE, "train.precision=bf16", "parallel.distributed_optimizer=true"]
    straight = tiny("straight", *common, nproc=2)
    tiny("resharded", *common, "train.steps=3", "checkpoint.every=3", nproc=2)
    resumed = tiny("resharded", *common, "checkpoint.every=3")
    _assert_same(resumed, straight, loss_tolerance=1e-5)
