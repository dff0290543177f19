"""The ``viq`` run kind: train the ViQ tokenizer through a (frozen) megatron GPT.

Stages 1, 2-1 and 2-2 are continuous VLM training with extra losses, on the continuous baseline's model:
:class:`~megatron_ext.vlm.VisionLanguageModel` whose visual path is a
:class:`~megatron_ext.vlm.ContinuousVisualEmbedding` around a :class:`~viq_mllm.viq.objectives.StageModel`
(pixels -> ViT -> [head] -> projector, plus distillation / reconstruction terms). The loss of a micro-batch is
``caption loss sum + count * (distill_weight * loss_distill + rec_weight * loss_rec)``, so after megatron's
per-token normalisation the objective is ``loss_text + weighted auxiliary terms``. The same megatron loop as
every other run (DDP, optimizer, warmup + cosine, NaN skip, checkpoints with automatic resume).
The decoder stage has no language model and runs :func:`viq_mllm.viq.decoder_stage.train_decoder_stage`.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import Iterator

import torch

from megatron_ext import checkpoint, vlm_eval
from megatron_ext.model import build_gpt, transformer_config
from megatron_ext.parallel import Layout, device, init_distributed
from megatron_ext.training import build_trainer, masked_loss, run_training
from megatron_ext.vlm import ContinuousVisualEmbedding, VisionLanguageModel, packed_params
from viq_mllm.data.captioned import CaptionedImages, load_captioned
from viq_mllm.data.layout import projected_caption_document
from viq_mllm.data.multimodal import PackedDataset, PackedSource
from viq_mllm.data.packing import pack
from viq_mllm.recipe import Recipe
from viq_mllm.viq.objectives import StageModel
from viq_mllm.viq.stage_io import evaluate_stage, held_out_images, load_adapters, save_stage, starting_tokenizer
from viq_mllm.viq.stages import trainable
from viq_mllm.viq.teachers import build_teacher
from viq_mllm.vocab.text_tokenizers import load_text_tokenizer


class LanguageModelMismatch(ValueError):
    """init.checkpoint is not the language model the recipe describes."""


def check_language_model(recipe: Recipe, meta: dict, text_fingerprint: str) -> None:
    """The recipe's model section and text tokenizer must be those of ``init.checkpoint``."""
    ours = recipe.model.model_dump(mode="json")
    for key, value in meta["model"].items():
        if key in ("visual", "seq_length", "hidden_dropout", "attention_dropout") or key not in ours:
            continue
        same = math.isclose(ours[key], value, rel_tol=1e-6) if isinstance(value, float) else ours[key] == value
        if not same:
            raise LanguageModelMismatch(f"model.{key}={ours[key]!r} but init.checkpoint={recipe.init.checkpoint} "
                                        f"has {value!r}")
    found = meta["vocab"].get("text_fingerprint")
    if found is not None and found != text_fingerprint:
        raise LanguageModelMismatch(f"data.tokenizer={recipe.data.tokenizer} is {text_fingerprint}, "
                                    f"init.checkpoint={recipe.init.checkpoint} was made with {found}")


def stage_forward_step(data_iterator: Iterator[dict], model: torch.nn.Module, weights: dict[str, float]):
    batch = next(data_iterator)
    output = model(batch, packed_params(batch))
    stage = model.module.visual.encoder
    return output, partial(stage_loss, batch["loss_mask"].to(device()), batch["real_tokens"], stage, weights)


def stage_loss(mask: torch.Tensor, real, stage: StageModel, weights: dict[str, float], per_token_loss: torch.Tensor):
    loss_sum, count, reported = masked_loss(mask, real, per_token_loss)
    aux = sum((weights[k] * v for k, v in stage.terms.items()), torch.zeros((), device=loss_sum.device))
    one = torch.ones((), device=loss_sum.device)
    reported["loss_text"] = torch.stack([loss_sum.detach().float(), count.detach().float()])  # global per-token mean
    for key, value in stage.terms.items():
        reported[key] = torch.stack([value.detach().float(), one])
    reported["loss_aux"] = torch.stack([aux.detach().float(), one])
    for key, value in stage.stats.items():
        reported[key] = torch.tensor([value, 1.0], device=loss_sum.device)
    return loss_sum + aux * count, count, reported


def build_stage_model(recipe: Recipe, layout: Layout, text_size: int):
    m, v, t = recipe.model, recipe.viq, recipe.train
    tokenizer, handoff = starting_tokenizer(recipe)
    with torch.random.fork_rng():
        torch.manual_seed(t.seed + 17)  # the same visual initialisation on every rank and layout
        teacher = None if v.teacher == "none" else build_teacher(v.teacher, tokenizer.vit, v.teacher_resolution)
        stage = StageModel(tokenizer, v.stage, teacher, v.usage_window)
        trainable(tokenizer, v.stage, v.train_encoder)
        visual = ContinuousVisualEmbedding(stage, tokenizer.config.width, m.hidden_size, trained=True, markers=True)
    gpt = build_gpt(transformer_config(m, recipe.parallel, t), m, recipe.parallel, text_size, layout, t.seed)
    return VisionLanguageModel(gpt, visual).to(device()), handoff


def adapters(vlm: VisionLanguageModel) -> dict:
    return {"projector": vlm.visual.projector, "distill_proj": vlm.visual.encoder.distill_proj}


@torch.no_grad()
def caption_losses(vlm: VisionLanguageModel, data: CaptionedImages, text) -> dict:
    """Held-out caption loss after the right image vs after another image: the one half the list away (the
    demo's choice; in a sorted folder the neighbour is often the same kind of picture)."""
    keys = list(data.captions)

    def losses(images: list[str]) -> list[float]:
        docs = [projected_caption_document(text, data.grids[image], data.captions[key], image)
                for key, image in zip(keys, images)]
        return vlm_eval.caption_losses(vlm, docs, attach=data.attach)

    vlm.eval()
    right, other = losses(keys), losses(keys[len(keys) // 2:] + keys[: len(keys) // 2])
    vlm.train()
    return {"caption_loss_right_image": sum(right) / len(right), "caption_loss_other_image": sum(other) / len(other),
            "right_image_lower_fraction": sum(r < o for r, o in zip(right, other)) / len(right),
            "documents": len(right)}


def train_viq_stage(recipe: Recipe) -> list[dict]:
    v, t, p = recipe.viq, recipe.train, recipe.parallel
    if v.stage == "decoder":
        from viq_mllm.viq.decoder_stage import train_decoder_stage

        return train_decoder_stage(recipe)
    layout = init_distributed(p.tp, p.pp, t.seed)
    text = load_text_tokenizer(recipe.data.tokenizer)
    lm_meta = checkpoint.read_meta(Path(recipe.init.checkpoint))
    check_language_model(recipe, lm_meta, text.fingerprint)
    padded = lm_meta["vocab"]["padded_size"]
    vlm, handoff = build_stage_model(recipe, layout, padded)
    loaded_adapters = load_adapters(recipe, adapters(vlm))
    cfg = vlm.visual.encoder.tokenizer.config
    parts = [load_captioned([s.path], text, cfg.image_base, cfg.max_pixels) for s in recipe.data.sources]
    sources = [PackedSource(pack(part.documents, recipe.model.seq_length), s.weight)
               for part, s in zip(parts, recipe.data.sources)]
    dataset, data = PackedDataset(sources, t.seed), CaptionedImages.merge(parts)
    meta = {"text_size": lm_meta["vocab"]["text_size"], "padded_size": padded, "text_fingerprint": text.fingerprint,
            "vocab_fingerprint": None}
    if checkpoint.latest(Path(recipe.run.dir) / "checkpoints") is None:
        checkpoint.load_model(Path(recipe.init.checkpoint), vlm.gpt)
    vlm.gpt.requires_grad_(v.train_lm)
    trainer = build_trainer(recipe, layout, vlm, meta, packed=True)
    if layout.rank == 0:
        print(f"viq {v.stage}: {len(data.documents)} captioned images in {sum(len(s.rows) for s in sources)} rows "
              f"({len(data.skipped)} skipped); {'carried over: ' + handoff.summary() if handoff else 'fresh tokenizer'}"
              f"; adapters from init.from: {loaded_adapters or 'none'}", flush=True)

    def batches(step: int):
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
