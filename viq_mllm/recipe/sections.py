"""The sections of a recipe, one pydantic model each (strict types, unknown keys refused), and the recipe."""

from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StringConstraints


#: the largest tensor-parallel size: vocabularies are padded to a multiple of 128 x MAX_TP rows, so one checkpoint
#: serves every TP up to it (``viq_mllm.vocab`` pads by it)
MAX_TP = 8


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

    kind: Literal["codes"] = "codes"
    sources: list[CodeSource] = Field(min_length=1)
    vocab: str
    task: Literal["pretrain", "sft"] = "pretrain"
    truncate: bool = False
    pack: bool = True  # false: one document per row (padding to seq_length), for comparison
    #: pad each document in a packed row to a multiple of this (16 for FP8 GEMMs, TP for sequence parallelism),
    #: masked out of the loss and of attention
    pack_align: int = Field(default=1, ge=1)
    workers: int = Field(default=2, ge=0)  # DataLoader processes building the micro-batches (0: in the step's)


class ImagesDataSection(_Section):
    """Captioned images for the ViQ tokenizer stages: folders (caption in a sidecar ``stem.txt``), ``.jsonl``
    files or webdataset shards (see ``viq-mllm tokenize``), blended by ``weight`` in the language-model stages
    (the decoder stage draws uniformly from all their images). ``tokenizer`` is the language model's text
    tokenizer (``hf:DIR``, ``sentencepiece:FILE`` or ``bytes``)."""

    kind: Literal["images"] = "images"
    sources: list[CodeSource] = Field(min_length=1)
    tokenizer: TokenizerSpec = "bytes"


class InitSection(_Section):
    """Weights to start from when run.dir has no checkpoint yet.

    ``checkpoint``: a megatron GPT (or VLM) checkpoint, e.g. the output of resize-vocab or of
    ``convert hf-to-mcore``. ``hf``: a VLM's start from a Hugging Face LLM folder (Llama / Qwen2): it is converted,
    its tokenizer extended into ``data.vocab`` (when that folder does not exist yet) and its embedding grown, once,
    into ``RUN_DIR/init/``. ``from``: the run directory of the previous ViQ stage (its ``tokenizer/``).
    ``viq``: a ViQ tokenizer folder to start the first stage from (e.g. imported SigLIP2 weights).
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, populate_by_name=True)
    checkpoint: Optional[str] = None
    hf: Optional[str] = None
    from_: Optional[str] = Field(default=None, alias="from")
    viq: Optional[str] = None


class ViQSection(_Section):
    """A ViQ tokenizer training stage (``kind: viq``; ``viq_mllm/viq_training/stages.py`` has the stage table).

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
    #: fp8's scaling (megatron's names): delayed (from an amax history) or tensorwise (current, per tensor)
    fp8_recipe: Literal["delayed", "tensorwise"] = "delayed"
    #: all: every parameter trains; visual: only what the vocabulary extension and the visual path added (the
    #: visual module, the embedding and output rows from text_size on), everything else frozen
    trainable: Literal["all", "visual"] = "all"
    #: learning-rate multiplier of the visual module's own parameters (slot vectors, embedder, projector)
    visual_lr_mult: float = Field(default=1.0, gt=0)
    #: consecutive steps whose loss or gradient norm is NaN/inf (each skipped, its update not applied) that the
    #: run tolerates; one more stops it with a non-zero exit, its last checkpoint intact
    max_nan_skips: int = Field(default=3, ge=0)


class ParallelSection(_Section):
    tp: int = Field(default=1, gt=0)
    pp: int = Field(default=1, gt=0)
    #: virtual pipeline stages per pipeline rank (megatron's interleaved 1F1B: a smaller bubble for more
    #: point-to-point traffic); needs pp > 1, model.num_layers divisible by pp x vpp, and the micro-batches of a
    #: step per data-parallel rank a multiple of pp
    vpp: int = Field(default=1, gt=0)
    sequence_parallel: bool = False
    #: how long a rank waits in a collective for the others before the job fails (a hung rank, a dead node)
    #: instead of hanging; long enough for the slowest step and checkpoint save
    timeout_s: float = Field(default=1800.0, gt=0)
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


class _RunSections(_Section):
    """What every run kind has."""

    run: RunSection
    init: InitSection = InitSection()
    train: TrainSection
    parallel: ParallelSection = ParallelSection()
    checkpoint: CheckpointSection = CheckpointSection()
    log: LogSection = LogSection()


class TextLMRecipe(_RunSections):
    """``kind: text_lm``: a GPT trained on text."""

    kind: Literal["text_lm"] = "text_lm"
    model: ModelSection
    data: DataSection = DataSection()


class VLMRecipe(_RunSections):
    """``kind: vlm``: the discrete VLM (or the continuous baseline) on packed code shards."""

    kind: Literal["vlm"]
    model: ModelSection
    data: CodesDataSection


class ViQRecipe(_RunSections):
    """``kind: viq``: one ViQ tokenizer stage; the decoder stage has no language model (no ``model``)."""

    kind: Literal["viq"]
    model: Optional[ModelSection] = None
    data: ImagesDataSection
    viq: ViQSection


#: one model per run kind, chosen by ``kind`` (``text_lm`` when absent)
Recipe = Annotated[Union[TextLMRecipe, VLMRecipe, ViQRecipe], Field(discriminator="kind")]
RECIPE_KINDS: dict[str, type[_RunSections]] = {"text_lm": TextLMRecipe, "vlm": VLMRecipe, "viq": ViQRecipe}
