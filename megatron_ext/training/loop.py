"""The training loop: megatron-core's pipeline schedules, DDP and optimizer, on CPU (gloo) and GPU (NCCL).

One optimizer step = ``global_batch_size`` samples, split over data-parallel ranks and micro-batches and run by
``get_forward_backward_func()`` (no pipelining, or 1F1B when ``parallel.pp > 1``). The loss is the mean over
supervised tokens of the whole global batch (``calculate_per_token_loss``: each micro-batch returns a loss *sum*
and a token count, and megatron divides the gradients by the global count), so any TP/PP/DP layout and any
micro-batch split computes the same number as one process.

A run is resumable: started again with the same ``run.dir``, it loads the newest complete checkpoint and
continues as if never stopped (data position, RNG, optimizer, LR schedule, NaN-skip count).
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, clip_grads, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_ext import patches
from megatron_ext.patches import cpu_compat
from megatron_ext.training import checkpoint, fault_injection, trainable
from megatron_ext.training.parallel import Layout, device
from viq_mllm.console import progress
from viq_mllm.health import Health, NonFiniteLossError
from viq_mllm.metrics import MetricsLog
from viq_mllm.recipe import ModelSection, Recipe, dump_recipe


@dataclass
class Trainer:
    """Everything a step needs, built once per run by :func:`build_trainer`."""

    recipe: Recipe
    layout: Layout
    chunks: list[DistributedDataParallel]  # this rank's model chunks (one, unless parallel.vpp > 1), DDP-wrapped
    optimizer: object
    scheduler: OptimizerParamScheduler
    meta: checkpoint.CheckpointMeta  # written as model.json into every checkpoint
    schedule_shape: tuple[int, int]  # (seq_length, micro_batch_size) the pipeline schedule communicates
    text_rows: list[trainable.TextRows]  # vocabulary rows kept still (train.trainable: visual)

    @property
    def model(self) -> DistributedDataParallel:
        """The DDP-wrapped model of a run without virtual pipeline stages."""
        if len(self.chunks) != 1:
            raise ValueError(f"this run holds {len(self.chunks)} model chunks (parallel.vpp); use Trainer.chunks")
        return self.chunks[0]

    @property
    def modules(self) -> list[torch.nn.Module]:
        """The model chunks without their DDP wrappers (what checkpoints hold)."""
        return [chunk.module for chunk in self.chunks]


def build_trainer(recipe: Recipe, layout: Layout, model: torch.nn.Module | list[torch.nn.Module],
                  vocab: checkpoint.VocabRecord, packed: bool = False, hf_config: Optional[dict] = None) -> Trainer:
    """Wrap a megatron model (or this rank's list of virtual-pipeline chunks, ``parallel.vpp``) in DDP and build the
    optimizer and warmup + cosine schedule of the recipe.

    ``vocab`` describes the embedding rows and ``hf_config`` the HF model the run started from (see
    :func:`base_hf_config`); both go into every checkpoint's ``model.json``. ``packed``: each
    micro-batch is one thd sequence of ``micro_batch_size`` rows (the schedule then sees batch 1).

    bf16 / fp8 runs hold every parameter in bf16, as Megatron-LM's ``Float16Module`` does: megatron's local-spec
    norms and the plain-torch visual modules are built in fp32, and megatron's optimizer cannot checkpoint a model
    that mixes the two (its state would not line up with the parameters). Each module casts its own float inputs
    (pixels) to its weights' dtype; rotary angles, FSQ and the losses compute in fp32 whatever the weights.
    """
    t, p = recipe.train, recipe.parallel
    models = model if isinstance(model, list) else [model]
    chunks, text_rows = _wrap(models, recipe, layout, vocab.text_size)
    config = models[0].config  # the one the pipeline schedule reads
    optimizer_config = OptimizerConfig(
        optimizer="adam",
        lr=t.lr,
        min_lr=t.min_lr,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_eps=t.adam_eps,
        clip_grad=t.clip_grad,
        bf16=t.precision in ("bf16", "fp8"),
        params_dtype=config.params_dtype,
        use_distributed_optimizer=p.distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(
        optimizer_config, chunks,
        config_overrides=trainable.config_overrides(optimizer_config, t.trainable, t.visual_lr_mult))
    patches.configure_optimizer(optimizer)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=t.lr,
        min_lr=t.min_lr,
        lr_warmup_steps=t.warmup_steps,
        lr_decay_steps=t.decay_steps or t.steps,
        lr_decay_style="cosine",
        start_wd=t.weight_decay,
        end_wd=t.weight_decay,
        wd_incr_steps=t.steps,
        wd_incr_style="constant",
    )
    meta = checkpoint.CheckpointMeta(model=recipe.model, vocab=vocab, hf_config=hf_config)
    seq, mbs = recipe.model.seq_length, t.micro_batch_size
    return Trainer(recipe, layout, chunks, optimizer, scheduler, meta, (seq * mbs, 1) if packed else (seq, mbs),
                   text_rows)


def _wrap(models: list[torch.nn.Module], recipe: Recipe, layout: Layout,
          text_size: int) -> tuple[list[DistributedDataParallel], list[trainable.TextRows]]:
    """Cast, freeze (``train.trainable``) and wrap each model chunk in megatron's DDP; set the gradient hooks the
    pipeline schedule calls on the first chunk's config. Returns (the DDP chunks, the text rows kept still)."""
    t, text_rows = recipe.train, []
    for chunk in models:
        if t.precision in ("bf16", "fp8"):
            chunk.bfloat16()
        text_rows += trainable.freeze(chunk, t.trainable, text_size)
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               use_distributed_optimizer=recipe.parallel.distributed_optimizer)
    # as Megatron-LM: one gradient bucket per chunk but the first, whose reduction overlaps the others' backward
    chunks = [DistributedDataParallel(chunk.config, ddp_config, chunk, disable_bucketing=i > 0)
              for i, chunk in enumerate(models)]
    config = models[0].config
    config.finalize_model_grads_func = finalize_model_grads if layout.world_size > 1 else finalize_alone
    no_sync = [chunk.no_sync for chunk in chunks]
    config.no_sync_func = no_sync if len(chunks) > 1 else no_sync[0]
    return chunks, text_rows


def finalize_alone(model: list[DistributedDataParallel], num_tokens: torch.Tensor | None = None, **_) -> None:
    """megatron's ``finalize_model_grads`` for a run of one process: the 1 / tokens scaling, nothing else.

    Alone, every group megatron's version reduces over (data-parallel replicas, pipeline stages, tensor-parallel
    ranks) holds one rank, so each of its collectives is the identity; it still sends three of them through the
    process group and walks every module for MoE router state, which these models lack (``transformer_config``
    builds no experts).
    """
    if num_tokens is not None and num_tokens > 0:
        for chunk in model:
            chunk.scale_gradients(1.0 / num_tokens)


def lm_forward_step(data_iterator: Iterator[dict], model: torch.nn.Module):
    """megatron's forward-step contract for a GPT: returns the output and a loss function.

    The loss function returns (loss sum, supervised token count, reported values); megatron sums them over
    micro-batches and divides gradients by the global token count.
    """
    batch = {k: v.to(device()) for k, v in next(data_iterator).items()}
    output = model(batch["tokens"], batch["position_ids"], attention_mask=None, labels=batch["labels"],
                   loss_mask=batch["loss_mask"])
    return output, partial(masked_loss, batch["loss_mask"], None)


def masked_loss(mask: torch.Tensor, real_tokens: torch.Tensor | None, per_token_loss: torch.Tensor):
    """megatron's 3-tuple loss contract: (loss sum, token count, reported [sum, count, real tokens]).

    ``real_tokens``: positions holding documents (not row padding); None when every position is real."""
    loss_sum = (per_token_loss.float().view(-1) * mask.view(-1)).sum()
    real = torch.tensor(float(mask.numel()) if real_tokens is None else float(real_tokens), device=mask.device)
    reported = torch.stack([loss_sum.detach(), mask.sum().detach().float(), real])
    return loss_sum, mask.sum().to(torch.int), {"lm loss": reported}


def global_loss(reported: list[dict], layout: Layout) -> tuple[float, float, float, dict[str, float]]:
    """(loss sum, supervised token count, real tokens) of the whole global batch, identical on every rank, and
    the mean over micro-batches and data-parallel ranks of any other reported value (``[value, 1]`` pairs,
    e.g. the ViQ stages' auxiliary losses)."""
    keys = sorted(k for k in (reported[0] if reported else {}) if k != "lm loss")
    totals = torch.zeros(3 + 2 * len(keys), dtype=torch.float64)
    for item in reported:
        totals[:3] += item["lm loss"].double().cpu()
        for i, key in enumerate(keys):
            totals[3 + 2 * i : 5 + 2 * i] += item[key].double().cpu()
    totals = totals.to(device())
    if layout.last_stage and layout.dp_size > 1:
        dist.all_reduce(totals, group=parallel_state.get_data_parallel_group())
    if layout.pp_size > 1:
        dist.broadcast(
            totals,
            src=parallel_state.get_pipeline_model_parallel_last_rank(),
            group=parallel_state.get_pipeline_model_parallel_group(),
        )
    extras = {key: float(totals[3 + 2 * i] / totals[4 + 2 * i]) for i, key in enumerate(keys)}
    return float(totals[0]), float(totals[1]), float(totals[2]), extras


def forward_backward(trainer: Trainer, batches: Iterator[dict], forward_step: Callable = lm_forward_step):
    """Forward and backward over one global batch's micro-batches; returns :func:`global_loss`.

    With virtual pipeline stages every chunk of a rank runs every micro-batch, each reading its own copy of
    ``batches`` (``itertools.tee``: a micro-batch is built once and kept until the last chunk has read it)."""
    t = trainer.recipe.train
    for chunk in trainer.chunks:
        chunk.zero_grad_buffer()
    cpu_compat.native(trainer.optimizer.zero_grad)()  # names no CUDA; 3 intercepted calls per parameter in the mode
    reported = get_forward_backward_func()(
        forward_step_func=cpu_compat.native(forward_step),
        data_iterator=list(itertools.tee(batches, len(trainer.chunks))) if len(trainer.chunks) > 1 else batches,
        model=trainer.chunks,
        num_microbatches=t.global_batch_size // (t.micro_batch_size * trainer.layout.dp_size),
        seq_length=trainer.schedule_shape[0],
        micro_batch_size=trainer.schedule_shape[1],
        forward_only=False,
    )
    return global_loss(reported, trainer.layout)


def optimizer_step(trainer: Trainer) -> tuple[bool, float]:
    """Clip, update, advance the LR schedule; returns (applied, gradient norm before clipping).

    megatron's ``ChainedOptimizer.step`` with one addition: a non-finite gradient norm skips the update. Its own
    ``step`` skips only on ``found_inf``, which a loss scaler (fp16) alone raises; in bf16 / fp32 it clips by a NaN
    factor, a no-op, and applies the NaN gradients. The same calls in the same order (``prepare_grads``, the global
    norm, ``clip_grad_by_total_norm_fp32``, ``step_with_ready_grads``), so the norm is computed once and every rank
    decides alike (it is reduced over the model-parallel ranks); a skip changes no parameter, optimizer state or
    LR schedule, as megatron's skip on ``found_inf`` does."""
    optimizer = trainer.optimizer
    trainable.mask_text_rows(trainer.text_rows)
    if cpu_compat.native(optimizer.prepare_grads)():  # found_inf: megatron's own skip (loss-scaled fp16)
        return False, float("nan")
    grad_norm = float(cpu_compat.native(optimizer.get_grad_norm)())
    if not math.isfinite(grad_norm):
        return False, grad_norm
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        params = [] if getattr(part, "is_stub_optimizer", False) else part.get_parameters()
        if params and part.config.clip_grad > 0.0:  # clip_grads runs in cpu_compat's mode wherever it is called
            clip_grads.clip_grad_by_total_norm_fp32(
                params, max_norm=part.config.clip_grad, total_norm=grad_norm,
                use_decoupled_grad=part.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
    applied = bool(cpu_compat.native(optimizer.step_with_ready_grads)())
    if applied:
        trainer.scheduler.step(increment=1)
    return applied, grad_norm


class CheckpointMismatch(ValueError):
    """A checkpoint made for another vocabulary or tokenizer."""


def check_same_vocab(found: checkpoint.VocabRecord, expected: checkpoint.VocabRecord, where: Path) -> None:
    """Refuse a checkpoint whose vocabulary differs, showing both fingerprints."""
    for key in ("text_fingerprint", "vocab_fingerprint", "padded_size"):
        if getattr(found, key) != getattr(expected, key):
            raise CheckpointMismatch(
                f"{where}: checkpoint {key} is {getattr(found, key)!r}, this run expects {getattr(expected, key)!r}; "
                "point run.dir / init.checkpoint at a checkpoint of the same vocabulary (or resize-vocab it)"
            )


def check_same_model(model: ModelSection, found: ModelSection, where: Path) -> None:
    """Refuse ``init.checkpoint`` when its ``model.json`` describes another network than the recipe's model
    section, naming the field (dropout, sequence length and the init scale may change between runs)."""
    ours = model.model_dump(mode="json")
    for key, value in found.model_dump(mode="json").items():
        if key in ("visual", "seq_length", "hidden_dropout", "attention_dropout", "init_std") or key not in ours:
            continue
        same = math.isclose(ours[key], value, rel_tol=1e-6) if isinstance(value, float) else ours[key] == value
        if not same:
            raise CheckpointMismatch(f"model.{key}={ours[key]!r} but init.checkpoint={where} has {value!r}")


def base_hf_config(recipe: Recipe, start: Optional[Path] = None) -> Optional[dict]:
    """The HF ``config.json`` of the model a run starts from (``start``, else ``init.checkpoint``; None when it was
    not converted from HF), carried into the run's checkpoints so an export serves as its base model did
    (context length, bos / eos)."""
    start = start or recipe.init.checkpoint
    return checkpoint.read_meta(Path(start)).hf_config if start else None


def initialize_from(recipe: Recipe, vocab: checkpoint.VocabRecord,
                    target: Callable[[checkpoint.CheckpointMeta], checkpoint.Model],
                    start: Optional[Path] = None) -> None:
    """Load the starting weights (``start``, else ``init.checkpoint``) into ``target(its model.json)`` (a freshly
    built model, or the part of it the checkpoint holds), after checking it is the same vocabulary (both
    fingerprints shown otherwise) and network. Nothing to do without one, or when ``run.dir`` has a checkpoint to
    resume from."""
    start = start or recipe.init.checkpoint
    if not start or checkpoint.latest(Path(recipe.run.dir) / "checkpoints") is not None:
        return
    path = Path(start)
    meta = checkpoint.read_meta(path)
    check_same_vocab(meta.vocab, vocab, path)
    check_same_model(recipe.model, meta.model, path)
    checkpoint.load_model(path, target(meta))


def run_training(
    trainer: Trainer,
    batches_for_step: Callable[[int], Iterator[dict]],
    tokens_per_step: int,
    forward_step: Callable = lm_forward_step,
) -> list[dict]:
    """Train ``train.steps`` optimizer steps from the latest checkpoint (if any); returns the metrics rows."""
    recipe, layout = trainer.recipe, trainer.layout
    run_dir, ckpt_root = Path(recipe.run.dir), Path(recipe.run.dir) / "checkpoints"
    fault = fault_injection.planned(layout.world_size)  # a test hook; None unless VIQ_MLLM_FAULT is set
    start, counters = _start(trainer, run_dir, ckpt_root)
    health = Health(recipe.train.max_nan_skips, counters["nan_skips"])
    log = MetricsLog(run_dir, start, recipe.log.tensorboard, recipe.log.wandb, recipe.log.wandb_project,
                     recipe.run.name) if layout.rank == 0 else None
    bar = _progress(layout, recipe, start)
    rows = []
    for step in range(start, recipe.train.steps):
        began = time.perf_counter()
        loss_sum, count, real, extras = forward_backward(trainer, batches_for_step(step), forward_step)
        loss, lr = loss_sum / max(count, 1.0), trainer.optimizer.param_groups[0]["lr"]
        finite = all(math.isfinite(v) for v in (loss, *extras.values()))
        applied, grad_norm = optimizer_step(trainer) if finite else (False, float("nan"))
        detail = f"loss {loss}{f' ({extras})' if extras else ''}, gradient norm {grad_norm}"
        try:
            health.record(step + 1, applied, detail)
        except NonFiniteLossError as error:
            raise NonFiniteLossError(f"{error}; {checkpoint.set_aside_from(ckpt_root, health.suspect_step)}") from None
        counters["nan_skips"] = health.total
        elapsed = time.perf_counter() - began
        rows.append({"step": step + 1, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens_per_step,
                     "loss_tokens": int(count), "real_tokens": int(real),
                     "padding_fraction": 1.0 - real / tokens_per_step, "step_time_s": elapsed,
                     "tokens_per_s": tokens_per_step / elapsed, "skipped": not applied,
                     "nan_skips": counters["nan_skips"], **extras})
        _report(rows[-1], log, bar)
        every = recipe.checkpoint.every
        if every and applied and ((step + 1) % every == 0 or step + 1 == recipe.train.steps):
            checkpoint.save(ckpt_root, step + 1, trainer.modules, trainer.optimizer, trainer.scheduler,
                            recipe.checkpoint.keep_last, counters, trainer.meta)
        if fault is not None:
            fault.after_step(step + 1, layout.rank)
    for sink in (bar, log):
        if sink is not None:
            sink.close()
    return rows


def _start(trainer: Trainer, run_dir: Path, ckpt_root: Path) -> tuple[int, dict]:
    """Write the resolved recipe, clear a killed save, and resume from the newest checkpoint (vocabulary
    checked); returns (step, counters)."""
    if trainer.layout.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_recipe(trainer.recipe, run_dir / "recipe.yaml")
    dist.barrier()
    checkpoint.remove_incomplete(ckpt_root)
    resume_from = checkpoint.latest(ckpt_root)
    if resume_from is None:
        return 0, {"nan_skips": 0}
    check_same_vocab(checkpoint.read_meta(resume_from).vocab, trainer.meta.vocab, resume_from)
    return checkpoint.load(resume_from, trainer.modules, trainer.optimizer, trainer.scheduler)


def _report(row: dict, log: Optional[MetricsLog], bar) -> None:
    if log is not None:
        log.log(row)
    if bar is not None:
        bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}", refresh=False)
        bar.update(1)  # redraws (postfix included) at the bar's interval, not every step


def _progress(layout: Layout, recipe: Recipe, start: int):
    if layout.rank != 0 or not recipe.log.progress:
        return None
    return progress(recipe.train.steps, desc=recipe.run.name, unit="step", initial=start)
