"""The ``viq`` run kind: train the ViQ tokenizer through a (frozen) megatron GPT.

Stages 1, 2-1 and 2-2 are continuous VLM training with extra losses, on the continuous baseline's model:
:class:`~megatron_ext.vlm.model.VisionLanguageModel` whose visual path is a
:class:`~megatron_ext.vlm.model.ContinuousVisualEmbedding` around a :class:`~viq_mllm.viq_training.objectives.StageModel`
(pixels -> ViT -> [head] -> projector, plus distillation / reconstruction terms). The loss of a micro-batch is
``caption loss sum + count * (distill_weight * loss_distill + rec_weight * loss_rec)``, so after megatron's
per-token normalisation the objective is ``loss_text + weighted auxiliary terms``. The same megatron loop as
every other run (DDP, optimizer, warmup + cosine, NaN skip, checkpoints with automatic resume).
With ``viq.text_every > 1`` the steps between caption steps are image-only: the stage model alone on
``viq.images_per_step`` images, the weighted terms as the loss, no language model.
The decoder stage has no language model and runs :func:`viq_mllm.viq_training.decoder_stage.train_decoder_stage`.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Iterator

import torch

from megatron_ext.model.gpt import build_gpt, transformer_config
from megatron_ext.training import checkpoint
from megatron_ext.training.loop import build_trainer, check_same_model, masked_loss, run_training
from megatron_ext.training.parallel import Layout, device, init_distributed
from megatron_ext.vlm import inference
from megatron_ext.vlm.model import ContinuousVisualEmbedding, VisionLanguageModel, packed_params
from viq_mllm.data.captioned import CaptionedImages, images_for_step, load_captioned
from viq_mllm.data.layout import projected_caption_document
from viq_mllm.data.multimodal import PackedDataset, PackedSource
from viq_mllm.data.order import rank_micro_batches
from viq_mllm.evaluation import right_and_other_pairs, right_vs_other
from viq_mllm.data.packing import pack
from viq_mllm.recipe import Recipe
from viq_mllm.viq.config import ViQConfig
from viq_mllm.viq.preprocess import Preprocessed
from viq_mllm.viq_training.decoder_stage import train_decoder_stage
from viq_mllm.viq_training.objectives import StageModel
from viq_mllm.viq_training.stage_io import (
    evaluate_stage,
    held_out_images,
    load_adapters,
    save_stage,
    starting_tokenizer,
)
from viq_mllm.viq_training.stages import trainable
from viq_mllm.viq_training.teachers import build_teacher
from viq_mllm.vocab.text_tokenizers import load_text_tokenizer

log = logging.getLogger(__name__)


class LanguageModelMismatch(ValueError):
    """init.checkpoint is not the language model the recipe describes."""


def check_language_model(recipe: Recipe, meta: checkpoint.CheckpointMeta, text_fingerprint: str) -> None:
    """The recipe's model section and text tokenizer must be those of ``init.checkpoint``."""
    check_same_model(recipe.model, meta.model, recipe.init.checkpoint)
    found = meta.vocab.text_fingerprint
    if found is not None and found != text_fingerprint:
        raise LanguageModelMismatch(f"data.tokenizer={recipe.data.tokenizer} is {text_fingerprint}, "
                                    f"init.checkpoint={recipe.init.checkpoint} was made with {found}")


def stage_forward_step(data_iterator: Iterator[dict], model: torch.nn.Module, weights: dict[str, float]):
    batch = next(data_iterator)
    stage = model.module.visual.encoder
    if batch.get("image_only"):
        stage([p.to(device()) for p in batch["pixels"]], batch["grids"])
        return weighted_terms(stage, weights), partial(image_loss, stage)
    output = model(batch, packed_params(batch))
    return output, partial(stage_loss, batch["loss_mask"].to(device()), batch["real_tokens"], stage, weights)


def weighted_terms(stage: StageModel, weights: dict[str, float]) -> torch.Tensor:
    """``distill_weight * loss_distill + rec_weight * loss_rec`` of the stage's last forward (0 without terms)."""
    return sum((weights[k] * v for k, v in stage.terms.items()), torch.zeros((), device=device()))


def reported_terms(stage: StageModel, aux: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each term, their weighted sum and the code statistics as megatron ``[value, 1]`` pairs."""
    one = torch.ones((), device=aux.device)
    reported = {key: torch.stack([value.detach().float(), one]) for key, value in stage.terms.items()}
    reported["loss_aux"] = torch.stack([aux.detach().float(), one])
    for key, value in stage.stats.items():
        reported[key] = torch.tensor([value, 1.0], device=aux.device)
    return reported


def stage_loss(mask: torch.Tensor, real, stage: StageModel, weights: dict[str, float], per_token_loss: torch.Tensor):
    """A caption step: ``loss_text`` (the per-token caption loss) plus the weighted terms, counted per token."""
    loss_sum, count, reported = masked_loss(mask, real, per_token_loss)
    aux = weighted_terms(stage, weights)
    reported["loss_text"] = torch.stack([loss_sum.detach().float(), count.detach().float()])  # global per-token mean
    reported.update(reported_terms(stage, aux))
    return loss_sum + aux * count, count, reported


def image_loss(stage: StageModel, aux: torch.Tensor):
    """An image-only micro-batch counts as one unit of megatron's normalisation; the step's ``loss`` is the mean
    of the weighted terms over its micro-batches (no ``loss_text``: the language model did not run)."""
    one = torch.ones((), device=aux.device)
    reported = {"lm loss": torch.stack([aux.detach().float(), one, torch.zeros_like(one)])}  # loss, count, tokens
    reported.update(reported_terms(stage, aux))
    return aux, torch.ones((), dtype=torch.int, device=aux.device), reported


def build_stage_model(recipe: Recipe, layout: Layout, text_size: int):
    m, v, t = recipe.model, recipe.viq, recipe.train
    tokenizer, handoff = starting_tokenizer(recipe)
    with torch.random.fork_rng():
        torch.manual_seed(t.seed + 17)  # the same visual initialisation on every rank and layout
        teacher = None if v.teacher == "none" else build_teacher(v.teacher, tokenizer.vit, v.teacher_resolution)
        stage = StageModel(tokenizer, v.stage, teacher, v.usage_window)
        trainable(tokenizer, v.stage, v.train_encoder)
        visual = ContinuousVisualEmbedding(stage, tokenizer.config.width, m.hidden_size, trained=True, markers=True)
    config = transformer_config(m, recipe.parallel, t.precision, t.fp8_recipe)
    gpt = build_gpt(config, m, recipe.parallel, text_size, layout, t.seed)
    return VisionLanguageModel(gpt, visual).to(device()), handoff


def adapters(vlm: VisionLanguageModel) -> dict:
    return {"projector": vlm.visual.projector, "distill_proj": vlm.visual.encoder.distill_proj}


@torch.no_grad()
def caption_losses(vlm: VisionLanguageModel, data: CaptionedImages, text) -> dict:
    """Held-out caption loss after the right image vs after another image
    (:func:`viq_mllm.evaluation.right_vs_other`), the images projected as the stage trains them."""
    keys = list(data.captions)

    def losses(pairs: list[tuple[int, int]]) -> list[float]:
        docs = [projected_caption_document(text, data.grids[keys[i]], data.captions[keys[j]], keys[i])
                for i, j in pairs]
        return inference.caption_losses(vlm, docs, attach=data.attach)

    vlm.eval()
    report = right_vs_other(losses(right_and_other_pairs(len(keys))))
    vlm.train()
    return report


def image_pool(recipe: Recipe, data: CaptionedImages, cfg: ViQConfig) -> list[Preprocessed]:
    """What image-only steps draw from: ``data.sources``' images and the uncaptioned ``viq.image_sources``."""
    v = recipe.viq
    pool = data.preprocessed()
    if v.image_sources:
        pool += load_captioned(v.image_sources, None, cfg.image_base, cfg.max_pixels, need_captions=False).preprocessed()
    if len(pool) < v.images_per_step:
        raise ValueError(f"viq.images_per_step={v.images_per_step} but data.sources and viq.image_sources hold "
                         f"{len(pool)} usable images")
    return pool


def image_micro_batches(images: list[Preprocessed], recipe: Recipe, layout: Layout) -> Iterator[dict]:
    """This rank's micro-batches of an image-only step: the step's images split evenly over every rank's
    micro-batches, in order."""
    t = recipe.train
    micro_batches = t.global_batch_size // t.micro_batch_size  # over all ranks
    size = len(images) // micro_batches
    for positions in rank_micro_batches(0, size * micro_batches, size, layout.dp_rank, layout.dp_size):
        chosen = [images[i] for i in positions]
        yield {"image_only": True, "pixels": [it.pixels for it in chosen], "grids": [it.grid for it in chosen]}


def train_viq_stage(recipe: Recipe) -> list[dict]:
    v, t, p = recipe.viq, recipe.train, recipe.parallel
    if v.stage == "decoder":
        return train_decoder_stage(recipe)
    layout = init_distributed(p.tp, p.pp, t.seed, timeout_s=p.timeout_s)
    text = load_text_tokenizer(recipe.data.tokenizer)
    lm_meta = checkpoint.read_meta(Path(recipe.init.checkpoint))
    check_language_model(recipe, lm_meta, text.fingerprint)
    padded = lm_meta.vocab.padded_size
    vlm, handoff = build_stage_model(recipe, layout, padded)
    loaded_adapters = load_adapters(recipe, adapters(vlm))
    cfg = vlm.visual.encoder.tokenizer.config
    parts = [load_captioned([s.path], text, cfg.image_base, cfg.max_pixels) for s in recipe.data.sources]
    sources = [PackedSource(pack(part.documents, recipe.model.seq_length), s.weight)
               for part, s in zip(parts, recipe.data.sources)]
    dataset, data = PackedDataset(sources, t.seed), CaptionedImages.merge(parts)
    vocab = checkpoint.VocabRecord(text_size=lm_meta.vocab.text_size, padded_size=padded,
                                   text_fingerprint=text.fingerprint)
    if checkpoint.latest(Path(recipe.run.dir) / "checkpoints") is None:
        checkpoint.load_model(Path(recipe.init.checkpoint), vlm.gpt)
    vlm.gpt.requires_grad_(v.train_lm)
    trainer = build_trainer(recipe, layout, vlm, vocab, packed=True)
    log.info("viq %s: %d captioned images in %d rows (%d skipped); %s; adapters from init.from: %s", v.stage,
             len(data.documents), sum(len(s.rows) for s in sources), len(data.skipped),
             "carried over: " + handoff.summary() if handoff else "fresh tokenizer", loaded_adapters or "none")

    pool = image_pool(recipe, data, cfg) if v.text_every > 1 else []

    def batches(step: int):
        if step % v.text_every:
            yield from image_micro_batches(images_for_step(pool, t.seed, step, v.images_per_step), recipe, layout)
            return
        for batch in dataset.micro_batches(step, t.global_batch_size, t.micro_batch_size, layout.dp_rank,
                                           layout.dp_size):
            yield data.attach(batch)

    weights = {"loss_distill": v.distill_weight, "loss_rec": v.rec_weight}
    metrics = run_training(trainer, batches, tokens_per_step=t.global_batch_size * recipe.model.seq_length,
                           forward_step=partial(stage_forward_step, weights=weights))
    extra = {"stage": v.stage, "skipped": data.skipped}
    if v.eval_captions:
        held = load_captioned([v.eval_captions], text, cfg.image_base, cfg.max_pixels)
        extra["captions"] = caption_losses(vlm, held, text)
    if layout.rank == 0:
        tokenizer = vlm.visual.encoder.tokenizer.eval()
        save_stage(Path(recipe.run.dir), tokenizer, adapters(vlm), handoff)
        images = held_out_images(recipe, tokenizer) if v.stage != "stage1" else []  # stage 1 has no decoder
        evaluate_stage(Path(recipe.run.dir), tokenizer, images, extra)
    return metrics
