"""Recipes: one YAML file is a whole run; ``key=value`` on the command line overrides any field.

A recipe is data, validated before any compute: unknown keys, wrong types and impossible parallel layouts
raise :class:`RecipeError` with a message that names the field, e.g.::

    >>> load_recipe("recipes/tiny_text_cpu.yaml", ["parallel.tp=3"], world_size=3)
    RecipeError: parallel.tp=3: model.num_attention_heads=4 is not divisible by it

Overrides are parsed as YAML scalars (``train.steps=6`` is an int, ``train.lr=3e-4`` a float,
``log.wandb=disabled`` a string) and then type-checked strictly: ``train.steps=six`` is rejected, never coerced.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from viq_mllm.vocab import MAX_TP


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-3`` as a string; recipes mean a float (YAML 1.2 behaviour)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+|\.[0-9_]+(?:[eE][-+]?[0-9]+)?)$"),
    list("-+0123456789."),
)


def _yaml(text: str):
    return yaml.load(text, Loader=_Loader)


class RecipeError(ValueError):
    """A recipe that cannot run; the message names the offending field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class RunSection(_Section):
    dir: str
    name: str = "run"


class VisualSection(_Section):
    """How visual positions become hidden vectors (docs/concepts.md, visual positions).

    ``table``: each code has a row of the extended embedding table; a position is the sum of its ``group``
    codes' rows, each scaled elementwise by a learned per-slot vector. ``embedder``: codes -> the ViQ code
    embedder -> 2x2 pooling projector (needs ``group: 16``), initialised from the tokenizer in ``viq``.
    ``continuous``: the baseline: the source images -> the ViQ tokenizer's ViT inside every step (trained, or
    frozen with ``encoder_trained: false``) -> 2x2 pooling projector, in the same positions (``group: 16``).
    """

    embedding: Literal["table", "embedder", "continuous"] = "table"
    group: Literal[1, 4, 16] = 16
    viq: str
    train_embedder: bool = True
    encoder_trained: bool = True


class ModelSection(_Section):
    """A Llama/Qwen2-style decoder: RMSNorm, SwiGLU, RoPE, optional GQA and q/k/v biases."""

    num_layers: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    ffn_hidden_size: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)
    num_query_groups: Optional[int] = Field(default=None, gt=0)
    seq_length: int = Field(gt=1)
    rope_theta: float = Field(default=10000.0, gt=0)
    norm_eps: float = Field(default=1e-6, gt=0)
    qkv_bias: bool = False
    tie_embeddings: bool = True
    hidden_dropout: float = Field(default=0.0, ge=0, lt=1)
    attention_dropout: float = Field(default=0.0, ge=0, lt=1)
    init_std: float = Field(default=0.02, gt=0)
    visual: Optional[VisualSection] = None

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads


#: ``bytes``, ``hf:DIR`` or ``sentencepiece:FILE`` (the path is checked where it is opened: GPU recipes name paths
#: of the cluster they run on)
TokenizerSpec = Annotated[str, StringConstraints(pattern=r"^(bytes|hf:.+|sentencepiece:.+)$")]


class DataSection(_Section):
    """Text for language-model runs.

    ``text_files`` empty means the built-in offline corpus (CPython's standard-library documentation, which is
    on every machine that runs Python). ``tokenizer`` is ``bytes`` (256 byte ids + end-of-document) or
    ``hf:DIR`` / ``sentencepiece:FILE`` for a tokenizer on disk.
    """

    kind: Literal["text"] = "text"
    text_files: list[str] = Field(default_factory=list)
    tokenizer: TokenizerSpec = "bytes"


class CodeSource(_Section):
    path: str
    weight: float = Field(default=1.0, gt=0)


class CodesDataSection(_Section):
    """Packed multimodal sequences from code shards (``viq-mllm tokenize``) in an extended vocabulary."""

    kind: Literal["codes"]
    sources: list[CodeSource] = Field(min_length=1)
    vocab: str
    task: Literal["pretrain", "sft"] = "pretrain"
    truncate: bool = False
    pack: bool = True  # false: one document per row (padding to seq_length), for comparison


class ImagesDataSection(_Section):
    """Captioned images for the ViQ tokenizer stages: folders (caption in a sidecar ``stem.txt``), ``.jsonl``
    files or webdataset shards (see ``viq-mllm tokenize``), blended by ``weight`` in the language-model stages
    (the decoder stage draws uniformly from all their images). ``tokenizer`` is the language model's text
    tokenizer (``hf:DIR``, ``sentencepiece:FILE`` or ``bytes``)."""

    kind: Literal["images"]
    sources: list[CodeSource] = Field(min_length=1)
    tokenizer: TokenizerSpec = "bytes"


class InitSection(_Section):
    """Weights to start from when run.dir has no checkpoint yet.

    ``checkpoint``: a megatron GPT (or VLM) checkpoint, e.g. the output of resize-vocab or of
    ``convert hf-to-mcore``. ``from``: the run directory of the previous ViQ stage (its ``tokenizer/``).
    ``viq``: a ViQ tokenizer folder to start the first stage from (e.g. imported SigLIP2 weights).
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, populate_by_name=True)
    checkpoint: Optional[str] = None
    from_: Optional[str] = Field(default=None, alias="from")
    viq: Optional[str] = None


class ViQSection(_Section):
    """A ViQ tokenizer training stage (``kind: viq``; ``viq_mllm/viq/train/stages.py`` has the stage table).

    A fresh tokenizer (no ``init.from`` / ``init.viq``) has ``architecture`` and ``preset``. The loss is
    ``loss_text + distill_weight * loss_distill + rec_weight * loss_rec`` (the decoder stage:
    ``loss_rec + perceptual_weight * loss_perceptual``). The teacher sees every image at
    ``teacher_resolution`` (square): ``encoder`` is a frozen copy of the stage's starting encoder,
    ``efficientnet-lite0`` the offline ImageNet network. ``eval_images``: held-out images (a folder or .jsonl)
    for PSNR/SSIM; ``eval_captions``: held-out captioned images for the caption loss with the right image vs
    another image.

    ``text_every: k`` runs the caption loss (a language-model forward and backward) on steps 0, k, 2k, ...; the
    steps between are image-only steps: the distillation and reconstruction terms on ``images_per_step`` images
    (``data.sources``' images and ``image_sources``, no captions needed), without the language model. Where the
    LM step dominates (a 135M LM beside a tiny tokenizer on CPU), this gives the tokenizer's own terms many more
    optimizer steps for the same time. 1 (every step a caption step) is the paper's schedule.
    """

    stage: Literal["stage1", "proximal", "fsq", "decoder"]
    architecture: Literal["tiny", "so400m", "giant"] = "tiny"
    preset: str = "16k"
    proximal_width: int = Field(default=32, gt=0)
    teacher: Literal["encoder", "efficientnet-lite0", "none"] = "encoder"
    teacher_resolution: int = Field(default=384, gt=0)
    distill_weight: float = Field(default=10.0, ge=0)
    rec_weight: float = Field(default=1.0, ge=0)
    perceptual_weight: float = Field(default=0.0, ge=0)
    train_encoder: bool = True
    train_lm: bool = False
    usage_window: int = Field(default=20, gt=0)
    text_every: int = Field(default=1, gt=0)
    images_per_step: int = Field(default=16, gt=0)
    image_sources: list[str] = Field(default_factory=list)
    eval_images: Optional[str] = None
    eval_captions: Optional[str] = None


class TrainSection(_Section):
    steps: int = Field(gt=0)
    seed: int = 1234
    micro_batch_size: int = Field(default=1, gt=0)
    global_batch_size: int = Field(default=1, gt=0)
    lr: float = Field(default=3e-4, gt=0)
    min_lr: float = Field(default=3e-5, ge=0)
    warmup_steps: int = Field(default=0, ge=0)
    decay_steps: Optional[int] = Field(default=None, gt=0)
    weight_decay: float = Field(default=0.1, ge=0)
    adam_beta1: float = Field(default=0.9, ge=0, lt=1)
    adam_beta2: float = Field(default=0.95, ge=0, lt=1)
    adam_eps: float = Field(default=1e-8, gt=0)
    clip_grad: float = Field(default=1.0, ge=0)
    precision: Literal["fp32", "bf16", "fp8"] = "fp32"
    max_nan_skips: int = Field(default=10, ge=0)


class ParallelSection(_Section):
    tp: int = Field(default=1, gt=0)
    pp: int = Field(default=1, gt=0)
    sequence_parallel: bool = False
    distributed_optimizer: bool = False
    transformer_impl: Literal["local", "transformer_engine"] = "local"


class CheckpointSection(_Section):
    every: int = Field(default=0, ge=0)
    keep_last: int = Field(default=2, gt=0)


class LogSection(_Section):
    tensorboard: bool = True
    wandb: Literal["offline", "online", "disabled"] = "offline"
    wandb_project: str = "viq-mllm"
    progress: bool = True


class Recipe(_Section):
    kind: Literal["text_lm", "vlm", "viq"] = "text_lm"
    run: RunSection
    model: Optional[ModelSection] = None
    data: Union[DataSection, CodesDataSection, ImagesDataSection] = Field(default_factory=DataSection,
                                                                         discriminator="kind")
    viq: Optional[ViQSection] = None
    init: InitSection = InitSection()
    train: TrainSection
    parallel: ParallelSection = ParallelSection()
    checkpoint: CheckpointSection = CheckpointSection()
    log: LogSection = LogSection()


def load_recipe(path: str | Path, overrides: list[str] = (), world_size: Optional[int] = None) -> Recipe:
    """Read a YAML recipe, apply ``key=value`` overrides, validate types and the parallel layout."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    raw = _yaml(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping, got {type(raw).__name__}")
    for item in overrides:
        apply_override(raw, item)
    recipe = recipe_from_dict(raw)
    check_layout(recipe, world_size)
    return recipe


def apply_override(raw: dict, item: str) -> None:
    """Set ``a.b.c=value`` in a nested dict; the value is parsed as a YAML scalar."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise RecipeError(f"override {item!r} is not of the form key=value")
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RecipeError(f"override {item!r}: {part} is not a section")
    node[parts[-1]] = _yaml(value) if value else ""


def recipe_from_dict(raw: dict) -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as err:
        raise RecipeError("invalid recipe:\n" + "\n".join(_describe(e) for e in err.errors())) from None


def _describe(error: dict) -> str:
    loc = error["loc"]
    if loc[:1] == ("data",) and len(loc) > 2:  # pydantic puts the data section's kind (its union tag) in the path
        loc = loc[:1] + loc[2:]
    field = ".".join(str(p) for p in loc)
    if error["type"] == "extra_forbidden":
        hint = _did_you_mean(error["loc"])
        return f"  {field}: unknown key{hint}"
    if error["type"] == "missing":
        return f"  {field}: required field is missing"
    return f"  {field}: {error['msg']} (got {error.get('input')!r})"


def _did_you_mean(loc: tuple) -> str:
    model: Any = Recipe
    for part in loc[:-1]:
        field = model.model_fields.get(part)
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return ""
        model = field.annotation
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
    return f" (did you mean {'.'.join(str(p) for p in loc[:-1] + (close[0],))}?)" if close else ""


def check_layout(recipe: Recipe, world_size: Optional[int] = None) -> None:
    """Reject parallel layouts megatron-core cannot build, naming the field, before any process starts."""
    m, p, t = recipe.model, recipe.parallel, recipe.train
    _check_kind(recipe)
    _check_schedule(t)
    if m is None:  # the ViQ decoder stage: no language model
        if p.tp * p.pp > 1:
            raise RecipeError("viq.stage=decoder trains without a language model: parallel.tp and parallel.pp must be 1")
        return
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
    wants = {"text_lm": "text", "vlm": "codes", "viq": "images"}[recipe.kind]
    if recipe.data.kind != wants:
        raise RecipeError(f"kind={recipe.kind} needs data.kind={wants}, got data.kind={recipe.data.kind}")
    if (recipe.kind == "viq") != (recipe.viq is not None):
        raise RecipeError("a viq section goes with kind=viq (and kind=viq needs one: viq.stage, ...)")
    needs_model = recipe.kind != "viq" or recipe.viq.stage != "decoder"
    if needs_model and recipe.model is None:
        raise RecipeError("model: required field is missing (the language model's shape)")
    if recipe.kind == "viq":
        _check_viq(recipe)
        return
    visual = recipe.model.visual
    if recipe.kind == "vlm" and visual is None:
        raise RecipeError("kind=vlm needs a model.visual section (embedding, group, viq)")
    if recipe.kind == "text_lm" and visual is not None:
        raise RecipeError("model.visual is only for kind=vlm")
    if visual is not None and visual.embedding != "table" and visual.group != 16:
        raise RecipeError(f"model.visual.embedding={visual.embedding} pools 2x2 patches: needs "
                          f"model.visual.group=16, got {visual.group}")


def _check_viq(recipe: Recipe) -> None:
    v, init = recipe.viq, recipe.init
    from viq_mllm.viq.fsq import PRESETS

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


def dump_recipe(recipe: Recipe, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(recipe.model_dump(mode="json", by_alias=True), sort_keys=False))
