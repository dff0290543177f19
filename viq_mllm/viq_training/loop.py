"""The plain-PyTorch training loop of the tokenizer's pixel stages (the decoder stage, the demo's reconstruction
training): AdamW, megatron's warmup + cosine schedule, gradient clipping, one metrics row per step.

The stages that run through a language model use megatron-core's loop (``megatron_ext.training.loop``); these
train a few million parameters in one process and need none of it, so they stay torch-only, as the rest of
``viq_mllm.viq``. The learning rate is megatron's ``OptimizerParamScheduler`` formula with ``init_lr = 0``
(``tests/test_schedule.py`` checks it against megatron's), so a recipe's ``train`` section means the same here
as in a megatron run.

    >>> t = TrainSection(steps=10, lr=1.0, min_lr=0.0, warmup_steps=2)
    >>> [round(warmup_cosine(t, step), 3) for step in range(11)]   # step = optimizer steps already taken
    [0.0, 0.5, 1.0, 0.962, 0.854, 0.691, 0.5, 0.309, 0.146, 0.038, 0.0]
"""

from __future__ import annotations

import math
import time
from typing import Callable, Iterable

import torch

from viq_mllm.health import Health
from viq_mllm.recipe import TrainSection


def warmup_cosine(t: TrainSection, step: int) -> float:
    """The learning rate of the update after ``step`` updates: linear from 0 over ``warmup_steps``, then cosine
    from ``lr`` to ``min_lr`` until ``decay_steps`` (default ``steps``), ``min_lr`` after."""
    decay = t.decay_steps or t.steps
    if t.warmup_steps > 0 and step <= t.warmup_steps:
        return t.lr * step / t.warmup_steps
    if step > decay:
        return t.min_lr
    ratio = (step - t.warmup_steps) / (decay - t.warmup_steps)
    return t.min_lr + 0.5 * (math.cos(math.pi * ratio) + 1.0) * (t.lr - t.min_lr)


def adamw(params: Iterable[torch.nn.Parameter], t: TrainSection) -> torch.optim.AdamW:
    return torch.optim.AdamW(list(params), lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
                             weight_decay=t.weight_decay)


def train_steps(optimizer: torch.optim.Optimizer, t: TrainSection, start: int,
                loss_terms: Callable[[int], dict[str, torch.Tensor]],
                after_step: Callable[[dict], None] = lambda row: None) -> list[dict]:
    """Steps ``start + 1 .. t.steps``. ``loss_terms(step)`` returns the tensors of one step, ``"loss"`` (what is
    minimised) among them; a step whose loss or gradient norm is not finite is skipped (:mod:`viq_mllm.health`).
    Each step's row (``step``, ``loss``, ``lr``, ``grad_norm``, ``step_time_s`` and every
    other term as a float) goes to ``after_step`` (logging, checkpoints) and into the returned list."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    rows, health = [], Health(t.max_nan_skips)
    for step in range(start, t.steps):
        began = time.perf_counter()
        lr = warmup_cosine(t, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        terms = loss_terms(step)
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, t.clip_grad or float("inf")))
        loss = float(terms["loss"].detach())
        applied = math.isfinite(loss) and math.isfinite(grad_norm)
        if applied:
            optimizer.step()
        health.record(step + 1, applied, f"loss {loss}, gradient norm {grad_norm}")
        row = {"step": step + 1, "lr": lr, "grad_norm": grad_norm, "step_time_s": time.perf_counter() - began,
               "skipped": not applied, "nan_skips": health.total,
               **{name: float(value.detach()) for name, value in terms.items()}}
        after_step(row)
        rows.append(row)
    return rows
