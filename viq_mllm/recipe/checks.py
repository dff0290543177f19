"""What a recipe's types cannot say: layouts megatron-core cannot build, sections that do not go together,
schedules that do not fit, each refused before any compute with the field named."""

from __future__ import annotations

from typing import Optional

from viq_mllm.recipe.sections import MAX_TP, ModelSection, ParallelSection, Recipe, RecipeError, TrainSection


def check_layout(recipe: Recipe, world_size: Optional[int] = None) -> None:
    """Reject parallel layouts megatron-core cannot build, naming the field, before any process starts."""
    m, p, t = recipe.model, recipe.parallel, recipe.train
    _check_kind(recipe)
    _check_schedule(t)
    if m is None:  # the ViQ decoder stage: no language model
        if p.tp * p.pp > 1:
            raise RecipeError("viq.stage=decoder trains without a language model: parallel.tp and parallel.pp must be 1")
        return
    check_model_layout(m, p)
    if p.sequence_parallel and p.transformer_impl != "transformer_engine":
        raise RecipeError("parallel.sequence_parallel=true needs parallel.transformer_impl=transformer_engine")
    if t.precision == "fp8" and p.transformer_impl != "transformer_engine":
        raise RecipeError("train.precision=fp8 needs parallel.transformer_impl=transformer_engine")
    if recipe.kind == "viq" and p.pp > 1:
        raise RecipeError(f"parallel.pp={p.pp}: the ViQ stages add their distillation and reconstruction losses "
                          "on the first pipeline stage; train them with parallel.pp=1 (tensor and data parallel work)")
    if world_size is not None:
        if world_size % (p.tp * p.pp):
            raise RecipeError(
                f"parallel.tp={p.tp} x parallel.pp={p.pp} does not divide the world size {world_size}"
            )
        dp = world_size // (p.tp * p.pp)
        if t.global_batch_size % (t.micro_batch_size * dp):
            raise RecipeError(
                f"train.global_batch_size={t.global_batch_size} is not divisible by "
                f"train.micro_batch_size={t.micro_batch_size} x data-parallel size {dp}"
            )
        micro_batches = t.global_batch_size // (t.micro_batch_size * dp)
        if p.vpp > 1 and micro_batches % p.pp:
            raise RecipeError(
                f"parallel.vpp={p.vpp}: the interleaved schedule runs micro-batches in groups of parallel.pp={p.pp}; "
                f"train.global_batch_size / (train.micro_batch_size x data-parallel size {dp}) = {micro_batches} "
                "is not a multiple of it"
            )


def check_model_layout(m: ModelSection, p: ParallelSection) -> None:
    """Whether megatron-core can split this network over ``p.tp`` tensor and ``p.pp`` pipeline ranks (``p.vpp``
    chunks each)."""
    if p.tp > MAX_TP:
        raise RecipeError(f"parallel.tp={p.tp}: at most {MAX_TP} (vocabulary padding is 128 x {MAX_TP})")
    for name, value in (("num_attention_heads", m.num_attention_heads), ("num_query_groups", m.query_groups)):
        if value % p.tp:
            raise RecipeError(f"parallel.tp={p.tp}: model.{name}={value} is not divisible by it")
    if m.num_attention_heads % m.query_groups:
        raise RecipeError(
            f"model.num_query_groups={m.query_groups} does not divide model.num_attention_heads={m.num_attention_heads}"
        )
    if m.num_layers % p.pp:
        raise RecipeError(f"parallel.pp={p.pp}: model.num_layers={m.num_layers} is not divisible by it")
    if p.vpp > 1 and p.pp == 1:
        raise RecipeError(f"parallel.vpp={p.vpp} interleaves pipeline stages: it needs parallel.pp > 1")
    if m.num_layers % (p.pp * p.vpp):
        raise RecipeError(f"parallel.vpp={p.vpp}: model.num_layers={m.num_layers} does not split into "
                          f"parallel.pp x parallel.vpp = {p.pp * p.vpp} equal chunks")


def _check_schedule(t: TrainSection) -> None:
    decay = t.decay_steps or t.steps
    if t.warmup_steps >= decay:
        raise RecipeError(
            f"train.warmup_steps={t.warmup_steps} must be smaller than the decay length "
            f"{decay} (train.decay_steps, or train.steps when unset)"
        )
    if t.min_lr > t.lr:
        raise RecipeError(f"train.min_lr={t.min_lr} is larger than train.lr={t.lr}")


def _check_kind(recipe: Recipe) -> None:
    if recipe.init.hf and (recipe.kind != "vlm" or recipe.init.checkpoint):
        raise RecipeError("init.hf starts a kind=vlm run from an HF LLM; it cannot go with init.checkpoint")
    if recipe.kind == "viq":
        if recipe.viq.stage != "decoder" and recipe.model is None:
            raise RecipeError("model: required field is missing (the language model's shape)")
        _check_viq(recipe)
        return
    visual = recipe.model.visual
    if recipe.kind == "vlm" and visual is None:
        raise RecipeError("kind=vlm needs a model.visual section (embedding, group, viq)")
    if recipe.kind == "text_lm" and visual is not None:
        raise RecipeError("model.visual is only for kind=vlm")
    if recipe.kind != "vlm" and (recipe.train.trainable != "all" or recipe.train.visual_lr_mult != 1.0):
        raise RecipeError(f"train.trainable / train.visual_lr_mult are for kind=vlm (the rows and modules a "
                          f"vocabulary extension adds), not kind={recipe.kind}")
    if visual is not None and visual.embedding != "table" and visual.group != 16:
        raise RecipeError(f"model.visual.embedding={visual.embedding} pools 2x2 patches: needs "
                          f"model.visual.group=16, got {visual.group}")
    align = getattr(recipe.data, "pack_align", 1)
    if recipe.model.seq_length % align:
        raise RecipeError(f"data.pack_align={align} must divide model.seq_length={recipe.model.seq_length}")


def _check_viq(recipe: Recipe) -> None:
    from viq_mllm.viq.fsq import PRESETS  # here, not above: it imports torch, which the command line's --help skips

    v, init = recipe.viq, recipe.init
    if v.preset not in PRESETS:
        raise RecipeError(f"viq.preset={v.preset!r}: choose one of {', '.join(PRESETS)}")
    if v.teacher_resolution % 32:
        raise RecipeError(f"viq.teacher_resolution={v.teacher_resolution}: must be a multiple of 32")
    if recipe.model is not None and recipe.model.visual is not None:
        raise RecipeError("model.visual is only for kind=vlm (the ViQ stages build their own visual path)")
    if v.stage != "stage1" and init.from_ is None:
        raise RecipeError(f"viq.stage={v.stage} continues the previous stage: set init.from=RUN_DIR")
    if init.from_ is not None and init.viq is not None:
        raise RecipeError("init.from and init.viq both set: a stage starts from one tokenizer")
    if v.text_every > 1 and v.stage == "decoder":
        raise RecipeError(f"viq.text_every={v.text_every}: the decoder stage has no caption loss")
    if v.text_every > 1 and v.stage == "stage1" and v.teacher == "none":
        raise RecipeError(f"viq.text_every={v.text_every}: stage 1 without a teacher has nothing to train on "
                          "image-only steps")
    splits = recipe.train.global_batch_size // recipe.train.micro_batch_size
    if v.text_every > 1 and v.images_per_step % splits:
        raise RecipeError(f"viq.images_per_step={v.images_per_step}: an image-only step splits its images over the "
                          f"{splits} micro-batches of train.global_batch_size / train.micro_batch_size; "
                          "make it a multiple")
    if v.stage != "decoder" and init.checkpoint is None:
        raise RecipeError(f"viq.stage={v.stage} needs the language model: set init.checkpoint=DIR "
                          "(a megatron checkpoint, e.g. from `viq-mllm convert hf-to-mcore`)")
