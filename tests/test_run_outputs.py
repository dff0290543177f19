"""What every run writes, and how it survives NaN/inf losses."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
from conftest import QUIET, ROOT, TINY, viq_mllm

from viq_mllm.metrics import read_metrics

REQUIRED = {"step", "loss", "lr", "grad_norm", "tokens", "step_time_s", "tokens_per_s"}


@pytest.fixture(scope="module")
def three_steps(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("three") / "run"
    viq_mllm("train", TINY, f"run.dir={run_dir}", "train.steps=3", "train.warmup_steps=1", "checkpoint.every=3",
             "log.progress=false")
    return run_dir


@pytest.mark.e2e
def test_run_dir_contents_read_back_by_independent_readers(three_steps):
    """What a run writes, each read by a reader that is not ours: the resolved recipe recomposes to the recipe the
    run was given; TensorBoard's own reader sees the losses of metrics.jsonl; megatron's dist_checkpointing reads
    step 3 from the checkpoint ``latest`` names; the token counts are the recipe's global batch x sequence."""
    from megatron.core import dist_checkpointing
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from viq_mllm.recipe import load_recipe

    run_dir = three_steps
    log = (run_dir / "log.txt").read_text()
    assert "megatron-core patches:" in log, log  # the run's log lines, as the terminal showed them
    given = load_recipe(TINY, [f"run.dir={run_dir}", "train.steps=3", "train.warmup_steps=1", "checkpoint.every=3",
                               "log.progress=false"])
    assert load_recipe(run_dir / "recipe.yaml") == given
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3] and all(REQUIRED <= row.keys() for row in rows)
    for row in rows:  # no padding: every position of the 8 x 128 batch is a token of the corpus
        assert row["tokens"] == row["real_tokens"] == given.train.global_batch_size * given.model.seq_length
    (events,) = (run_dir / "tensorboard").glob("events.out.tfevents.*")
    board = EventAccumulator(str(events))
    board.Reload()
    assert [(e.step, e.value) for e in board.Scalars("loss")] == \
        [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in rows]
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    latest = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text()
    assert dist_checkpointing.load_common_state_dict(str(latest))["step"] == 3


@pytest.mark.e2e
def test_generate_checks_the_tokenizer(three_steps, tmp_path):
    """``generate`` takes the run's own tokenizer spec and refuses another one, naming both fingerprints."""
    from viq_mllm.vocab.text_tokenizers import train_sentencepiece

    checkpoint = three_steps / "checkpoints" / "step_00000003"
    ids = tmp_path / "ids.txt"
    viq_mllm("generate", "--checkpoint", str(checkpoint), "--tokenizer", "bytes", "--prompt", "def f",
             "--max-new-tokens", "3", "--output-ids", str(ids))
    assert all(0 <= int(i) < 257 for i in ids.read_text().split())
    other = train_sentencepiece(["a few words to learn a small vocabulary from"] * 40, tmp_path / "other.model", 300)
    refused = viq_mllm("generate", "--checkpoint", str(checkpoint), "--tokenizer", str(other), check=False)
    assert refused.returncode != 0
    assert "is text-" in refused.stderr and "trained with bytes-utf8-v1" in refused.stderr
    missing = viq_mllm("generate", "--checkpoint", str(checkpoint), "--tokenizer", str(tmp_path / "nope"), check=False)
    assert missing.returncode != 0 and "no such file or folder" in missing.stderr


@pytest.mark.e2e
def test_a_text_run_starts_from_init_checkpoint_and_refuses_another_network(three_steps, tmp_path):
    """Same seed, same first batch: from the 3-step weights the first loss is lower than from a fresh init (which
    is the first run's first loss, exactly)."""
    checkpoint = three_steps / "checkpoints" / "step_00000003"
    fresh = read_metrics(three_steps)[0]["loss"]
    viq_mllm("train", TINY, f"run.dir={tmp_path / 'init'}", f"init.checkpoint={checkpoint}", "train.steps=1",
             "train.warmup_steps=0", *QUIET)
    # three steps of the tiny recipe lower its loss by ~0.4 (6.89 to 6.51, measured with one warmup step);
    # 0.2 below the fresh start tells trained weights apart
    assert read_metrics(tmp_path / "init")[0]["loss"] < fresh - 0.2
    other = viq_mllm("train", TINY, f"run.dir={tmp_path / 'other'}", f"init.checkpoint={checkpoint}",
                     "model.num_layers=2", "train.steps=1", "train.warmup_steps=0", *QUIET, check=False)
    assert other.returncode != 0 and f"model.num_layers=2 but init.checkpoint={checkpoint} has 4" in other.stderr


SCRIPT = textwrap.dedent(
    """
    import json, sys
    import megatron_ext.training.loop as training
    from viq_mllm.health import NonFiniteLossError
    from megatron_ext.jobs.run import run_recipe
    from viq_mllm.recipe import load_recipe

    bad_steps, overrides = set(json.loads(sys.argv[1])), sys.argv[2:]
    real, calls = training.global_loss, []

    def poisoned(reported, layout):
        calls.append(1)
        loss_sum, count, tokens, extras = real(reported, layout)
        return (float("nan") if len(calls) in bad_steps else loss_sum), count, tokens, extras

    training.global_loss = poisoned
    try:
        run_recipe(load_recipe(overrides[0], overrides[1:]))
    except NonFiniteLossError as err:
        print("ABORTED:", err)
    """
)


def _run_with_nan(run_dir, bad_steps, *overrides):
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(bad_steps), TINY, f"run.dir={run_dir}", *QUIET, *overrides],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, read_metrics(run_dir)


@pytest.mark.e2e
def test_nan_steps_are_skipped_and_counted(tmp_path):
    _, rows = _run_with_nan(tmp_path / "r", [2, 3], "train.steps=5", "train.warmup_steps=2")
    assert [r["skipped"] for r in rows] == [False, True, True, False, False]
    assert rows[-1]["nan_skips"] == 2
    # skipped steps leave the LR schedule where it was: step 4 runs with step 2's learning rate
    assert rows[3]["lr"] == rows[1]["lr"] == rows[2]["lr"]
    assert all(r["loss"] == r["loss"] for r in (rows[0], rows[3], rows[4]))


@pytest.mark.e2e
def test_too_many_nan_steps_abort(tmp_path):
    out, rows = _run_with_nan(tmp_path / "r", [2, 3, 4, 5], "train.steps=5", "train.warmup_steps=2",
                              "train.max_nan_skips=2")
    assert "ABORTED: step 4: loss nan, gradient norm nan; 3 consecutive steps were not finite " \
           "(train.max_nan_skips=2)" in out
    assert len(rows) == 3
