"""The tokenizer's pixel stages follow megatron's learning-rate schedule step for step, as the megatron runs do."""

import types

import pytest
import torch
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from viq_mllm.recipe import TrainSection
from viq_mllm.viq_training.loop import adamw, train_steps, warmup_cosine


def megatrons_lrs(t: TrainSection) -> list[float]:
    """The lr of each update of a megatron run: the scheduler as ``build_trainer`` builds it, stepped once per
    update (megatron's optimizer wrapper is only a holder of param groups here)."""
    holder = types.SimpleNamespace(param_groups=[{"lr": 0.0, "weight_decay": t.weight_decay}])
    scheduler = OptimizerParamScheduler(holder, init_lr=0.0, max_lr=t.lr, min_lr=t.min_lr,
                                        lr_warmup_steps=t.warmup_steps, lr_decay_steps=t.decay_steps or t.steps,
                                        lr_decay_style="cosine", start_wd=t.weight_decay, end_wd=t.weight_decay,
                                        wd_incr_steps=t.steps, wd_incr_style="constant")
    lrs = []
    for _ in range(t.steps):
        lrs.append(holder.param_groups[0]["lr"])
        scheduler.step(increment=1)
    return lrs


@pytest.mark.parametrize("fields", [
    dict(steps=12, warmup_steps=3),
    dict(steps=12, warmup_steps=0),
    dict(steps=20, warmup_steps=4, decay_steps=10),
    dict(steps=7, warmup_steps=6),
])
def test_warmup_cosine_equals_megatrons_scheduler(fields):
    t = TrainSection(lr=2e-3, min_lr=1e-4, **fields)
    assert [warmup_cosine(t, step) for step in range(t.steps)] == pytest.approx(megatrons_lrs(t), abs=1e-15)


def test_train_steps_runs_each_update_at_the_schedules_lr_and_minimises_the_loss():
    t = TrainSection(steps=30, lr=0.3, min_lr=0.0, warmup_steps=3, weight_decay=0.0, clip_grad=0.0)
    weight = torch.nn.Parameter(torch.tensor([3.0, -2.0]))
    rows = train_steps(adamw([weight], t), t, 0, lambda step: {"loss": (weight ** 2).sum()})
    assert [row["step"] for row in rows] == list(range(1, 31))
    assert [row["lr"] for row in rows] == megatrons_lrs(t)
    assert rows[-1]["loss"] < 0.1 * rows[0]["loss"]  # a quadratic bowl at lr 0.3: 30 steps reach ~0; 10x is ample
    resumed = train_steps(adamw([weight], t), t, 25, lambda step: {"loss": (weight ** 2).sum()})
    assert [row["step"] for row in resumed] == [26, 27, 28, 29, 30]
