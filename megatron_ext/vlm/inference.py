"""Using trained models: held-out caption losses of a VLM (any image / caption pairing) and greedy generation
(VLM captions / answers, text continuations of a text GPT).

Single process (TP = PP = 1): a checkpoint of any layout loads here (torch_dist reshards). The checkpoint's
``model.json`` names the model shape, the vocabulary folder and the ViQ tokenizer, so nothing else is needed.
Discrete VLMs and the continuous baseline run through the same functions: ``attach`` (:func:`visual_attach`) adds
the baseline's pixels to each batch.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable, Optional

import torch

from megatron_ext.model.gpt import gpt_from_checkpoint
from megatron_ext.training import checkpoint
from megatron_ext.training.parallel import Layout, device, init_distributed
from megatron_ext.vlm.build import PixelSource, build_vlm
from megatron_ext.vlm.model import VisionLanguageModel, packed_params
from viq_mllm.data.chat import prompt_document
from viq_mllm.data.layout import Document, caption_document
from viq_mllm.data.multimodal import caption_text
from viq_mllm.data.packing import collate, pack
from viq_mllm.data.shards import CodeSample
from viq_mllm.evaluation import CaptionLosses
from viq_mllm.recipe import ParallelSection
from viq_mllm.viq import ViQTokenizer
from viq_mllm.vocab.tokenizer import MultimodalTokenizer


def load_for_inference(ckpt: str | Path) -> tuple[VisionLanguageModel, MultimodalTokenizer,
                                                 checkpoint.CheckpointMeta]:
    ckpt = Path(ckpt)
    meta = checkpoint.read_meta(ckpt)
    if not meta.vocab.vocab_dir or not meta.model.visual:
        raise ValueError(f"{ckpt}: not a VLM checkpoint (its model.json names no vocabulary / visual section)")
    tokenizer = MultimodalTokenizer.from_dir(meta.vocab.vocab_dir)
    layout: Layout = init_distributed(tp=1, pp=1, seed=0)
    vlm = build_vlm(meta.model, ParallelSection(), tokenizer, layout)
    checkpoint.load_model(ckpt, vlm)
    return vlm.eval(), tokenizer, meta


def visual_attach(meta: checkpoint.CheckpointMeta, tokenizer: MultimodalTokenizer
                  ) -> Optional[Callable[[dict], dict]]:
    """What a checkpoint's batches need beyond codes: the source images' pixels for the continuous baseline
    (decoded as in training), nothing for a discrete VLM."""
    if meta.model.visual.embedding != "continuous":
        return None
    return PixelSource(meta.vocab.viq_dir, tokenizer.vocab).attach


@torch.no_grad()
def caption_losses(model: VisionLanguageModel, documents: list[Document],
                   attach: Optional[Callable[[dict], dict]] = None) -> list[float]:
    """Mean loss per supervised token of each document, run alone; ``attach`` adds what the model's visual path
    needs beyond codes (the continuous path's pixels)."""
    losses = []
    for doc in documents:
        batch = collate(pack([doc], len(doc)))
        batch = attach(batch) if attach is not None else batch
        per_token = model(batch, packed_params(batch))[0].float()
        mask = batch["loss_mask"][0]
        losses.append(float((per_token * mask).sum() / mask.sum()))
    return losses


def caption_scorer(model: VisionLanguageModel, tokenizer: MultimodalTokenizer, samples: list[CodeSample],
                   group: int, attach: Optional[Callable[[dict], dict]] = None
                   ) -> CaptionLosses:
    """``[(i, j), ...] -> [loss, ...]``: the mean loss of sample ``j``'s caption after sample ``i``'s image (``i``
    None: the caption alone), for :func:`viq_mllm.evaluation.caption_report`. One-image samples."""

    def document(i: Optional[int], j: int) -> Document:
        images = [] if i is None else [samples[i].images[0]]
        doc = caption_document(tokenizer.text, tokenizer.vocab, [image.codes for image in images],
                               caption_text(samples[j].text), group)
        doc.images = [image.path for image in images]
        return doc

    return lambda pairs: caption_losses(model, [document(i, j) for i, j in pairs], attach)


@torch.no_grad()
def greedy_ids(next_logits: Callable[[torch.Tensor], torch.Tensor], prompt: torch.Tensor, max_new_tokens: int,
               stop_id: int, allowed: int) -> list[int]:
    """Greedy decoding: ``next_logits(tokens)`` gives the last position's logits; only ids below ``allowed`` (the
    text vocabulary) are chosen; stops at ``stop_id``. No KV cache: the whole sequence is re-run each step."""
    tokens, new = prompt, []
    for _ in range(max_new_tokens):
        next_id = int(next_logits(tokens)[:allowed].argmax())
        if next_id == stop_id:
            break
        new.append(next_id)
        tokens = torch.cat([tokens, torch.tensor([next_id])])
    return new


def greedy(model: VisionLanguageModel, tokenizer: MultimodalTokenizer, prompt: Document, max_new_tokens: int,
           attach: Optional[Callable[[dict], dict]] = None) -> list[int]:
    """Continue a multimodal prompt (image block, optional chat turn) with text; ``attach`` as in
    :func:`caption_losses` (the prompt's ``images`` name the pixels' source)."""

    def next_logits(tokens: torch.Tensor) -> torch.Tensor:
        extra = len(tokens) - len(prompt)
        visual = torch.cat([prompt.visual, torch.zeros(extra, dtype=torch.bool)])
        doc = Document(tokens, visual, prompt.codes, torch.zeros(len(tokens)), prompt.images)
        batch = collate(pack([doc], len(doc)))
        batch = attach(batch) if attach is not None else batch
        return model(batch, packed_params(batch), labels=False)[0, -1]

    return greedy_ids(next_logits, prompt.tokens, max_new_tokens, tokenizer.text.eod, tokenizer.vocab.text_size)


def load_text_model(ckpt: str | Path):
    """A text GPT checkpoint (trained here or converted from HF) -> (model, meta), single process."""
    return gpt_from_checkpoint(Path(ckpt), init_distributed(tp=1, pp=1, seed=0))


def greedy_text(gpt, prompt_ids: list[int], max_new_tokens: int, stop_id: int, vocab: int) -> list[int]:
    def next_logits(tokens: torch.Tensor) -> torch.Tensor:
        on = tokens.to(device())
        return gpt(on[None], torch.arange(len(on), device=on.device)[None], None)[0, -1]

    return greedy_ids(next_logits, torch.tensor(prompt_ids), max_new_tokens, stop_id, vocab)


def answerer(model: VisionLanguageModel, tokenizer: MultimodalTokenizer, viq_dir: str, group: int,
             attach: Optional[Callable[[dict], dict]] = None, max_new_tokens: int = 4
             ) -> Callable[[Optional[str], str], str]:
    """``(image or None, question) -> answer`` by greedy decoding (``viq_mllm.evaluation``); each image is
    encoded once. ``attach``: :func:`visual_attach` (the continuous baseline's pixels)."""

    viq = ViQTokenizer.from_pretrained(viq_dir)
    codes = functools.lru_cache(maxsize=4096)(lambda image: viq.encode([image])[0].numpy())

    def answer(image: Optional[str], question: str) -> str:
        prompt = prompt_document(tokenizer.text, tokenizer.vocab, None if image is None else codes(image), question,
                                 group, source=image)
        return tokenizer.text.decode(greedy(model, tokenizer, prompt, max_new_tokens, attach))

    return answer
