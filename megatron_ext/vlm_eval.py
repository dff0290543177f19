"""Using a trained discrete VLM: held-out caption loss (matched vs mismatched images) and greedy generation.

Single process (TP = PP = 1): a checkpoint of any layout loads here (torch_dist reshards). The checkpoint's
``model.json`` names the model shape, the vocabulary folder and the ViQ tokenizer, so nothing else is needed.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_ext import checkpoint
from megatron_ext.parallel import Layout, init_distributed
from megatron_ext.vlm import VisionLanguageModel, packed_params
from megatron_ext.vlm_train import build_vlm
from viq_mllm.data.layout import Document, SequenceBuilder
from viq_mllm.data.packing import collate, pack
from viq_mllm.recipe import recipe_from_dict
from viq_mllm.vocab.tokenizer import MultimodalTokenizer


def load_for_inference(ckpt: str | Path) -> tuple[VisionLanguageModel, MultimodalTokenizer, dict]:
    ckpt = Path(ckpt)
    meta = checkpoint.read_meta(ckpt)
    vocab_dir, model = meta["vocab"].get("vocab_dir"), meta["model"]
    if not vocab_dir or not model.get("visual"):
        raise ValueError(f"{ckpt}: not a VLM checkpoint (its model.json names no vocabulary / visual section)")
    recipe = recipe_from_dict({
        "kind": "vlm", "run": {"dir": str(ckpt)}, "model": model, "train": {"steps": 1},
        "data": {"kind": "codes", "sources": [{"path": "unused"}], "vocab": vocab_dir},
    })
    tokenizer = MultimodalTokenizer.from_dir(vocab_dir)
    layout: Layout = init_distributed(tp=1, pp=1, seed=0)
    vlm = build_vlm(recipe, tokenizer, layout)
    checkpoint.load_model(ckpt, vlm)
    return vlm.eval(), tokenizer, meta


@torch.no_grad()
def caption_losses(model: VisionLanguageModel, documents: list[Document]) -> list[float]:
    """Mean loss per supervised token of each document, run alone."""
    losses = []
    for doc in documents:
        batch = collate(pack([doc], len(doc)))
        per_token = model(batch, packed_params(batch))[0].float()
        mask = batch["loss_mask"][0]
        losses.append(float((per_token * mask).sum() / mask.sum()))
    return losses


def prompt_document(tokenizer: MultimodalTokenizer, codes, prompt: str, group: int) -> Document:
    """The image block, then (for chat models) ``User: PROMPT<eod>Assistant: `` — the model continues."""
    b = SequenceBuilder(tokenizer.vocab)
    if prompt:
        b.text(tokenizer.text.encode("User: "), False)
        b.image(codes, group)
        b.text(tokenizer.text.encode(prompt) + [tokenizer.text.eod], False)
        b.text(tokenizer.text.encode("Assistant: "), False)
    else:
        b.image(codes, group)
    return b.build()


@torch.no_grad()
def greedy(model: VisionLanguageModel, tokenizer: MultimodalTokenizer, prompt: Document, max_new_tokens: int
           ) -> list[int]:
    """Greedy decoding over text ids only (no KV cache: the whole sequence is re-run each step)."""
    tokens, visual, codes = prompt.tokens, prompt.visual, prompt.codes
    new: list[int] = []
    text_size = tokenizer.vocab.text_size
    for _ in range(max_new_tokens):
        doc = Document(tokens, visual, codes, torch.zeros(len(tokens)))
        batch = collate(pack([doc], len(doc)))
        logits = model(batch, packed_params(batch), labels=False)[0, -1, :text_size]
        next_id = int(logits.argmax())
        if next_id == tokenizer.text.eod:
            break
        new.append(next_id)
        tokens = torch.cat([tokens, torch.tensor([next_id])])
        visual = torch.cat([visual, torch.tensor([False])])
    return new
