"""``eval`` and ``generate`` on a megatron checkpoint: load it for inference in this process, run the task, and
release the process group whatever happens. The command line prints what these return; an exported HF folder is
served by :mod:`viq_mllm.hf` instead."""

from __future__ import annotations

from pathlib import Path

from megatron_ext.training.checkpoint import read_meta
from megatron_ext.training.parallel import shutdown
from megatron_ext.vlm.inference import (answerer, caption_scorer, greedy, greedy_text, load_for_inference,
                                        load_text_model, visual_attach)
from viq_mllm.data.chat import prompt_document
from viq_mllm.data.shards import CodeShards
from viq_mllm.evaluation import accuracy, caption_report
from viq_mllm.viq import ViQTokenizer
from viq_mllm.vocab.text_tokenizers import load_text_tokenizer


def vqa_accuracy(checkpoint: str, items: list) -> dict:
    """Exact-match accuracy of the VLM at ``checkpoint`` on VQA ``items`` (greedy answers)."""
    try:
        model, tokenizer, meta = load_for_inference(checkpoint)
        ask = answerer(model, tokenizer, meta.vocab.viq_dir, meta.model.visual.group, visual_attach(meta, tokenizer))
        return accuracy(ask, items)
    finally:
        shutdown()


def caption_scores(checkpoint: str, shards: str, limit: int, k: int) -> dict:
    """Held-out caption loss with the right image and with another one, and retrieval among ``k``, on the first
    ``limit`` one-image samples of ``shards`` (refused when they were made by another ViQ tokenizer)."""
    try:
        model, tokenizer, meta = load_for_inference(checkpoint)
        samples = [s for s in CodeShards(shards, expected_fingerprint=meta.vocab.viq_fingerprint)
                   if len(s.images) == 1][:limit]  # caption data: one image each
        scorer = caption_scorer(model, tokenizer, samples, meta.model.visual.group, visual_attach(meta, tokenizer))
        return caption_report(scorer, len(samples), k)
    finally:
        shutdown()


def generate_from_image(checkpoint: str, image: str, prompt: str, max_new_tokens: int) -> tuple[list[int], str]:
    """Greedy text from the VLM at ``checkpoint`` for an image (encoded by the checkpoint's ViQ tokenizer) and an
    optional prompt; returns (ids, text)."""
    try:
        model, tokenizer, meta = load_for_inference(checkpoint)
        codes = ViQTokenizer.from_pretrained(meta.vocab.viq_dir).encode([image])[0]
        document = prompt_document(tokenizer.text, tokenizer.vocab, codes, prompt, meta.model.visual.group,
                                   source=image)
        ids = greedy(model, tokenizer, document, max_new_tokens, visual_attach(meta, tokenizer))
        return ids, tokenizer.text.decode(ids)
    finally:
        shutdown()


def generate_text(checkpoint: str, tokenizer_path: str, prompt: str, max_new_tokens: int) -> tuple[list[int], str]:
    """Greedy text from the text GPT at ``checkpoint``; ``tokenizer_path`` (an HF folder, a SentencePiece
    ``.model`` or ``bytes``) must be the one it was trained with (fingerprints compared)."""
    path = Path(tokenizer_path)
    if tokenizer_path != "bytes" and not path.exists():
        raise FileNotFoundError(f"--tokenizer {path}: no such file or folder")
    spec = "bytes" if tokenizer_path == "bytes" else f"{'sentencepiece' if path.suffix == '.model' else 'hf'}:{path}"
    tokenizer = load_text_tokenizer(spec)
    trained_with = read_meta(Path(checkpoint)).vocab.text_fingerprint
    if trained_with is not None and tokenizer.fingerprint != trained_with:
        raise ValueError(f"--tokenizer {tokenizer_path} is {tokenizer.fingerprint}, the checkpoint was trained "
                         f"with {trained_with}; pass the tokenizer of its run (its recipe.yaml: data.tokenizer)")
    try:
        gpt, meta = load_text_model(checkpoint)
        ids = greedy_text(gpt, tokenizer.encode(prompt), max_new_tokens, tokenizer.eod, meta.vocab.text_size)
        return ids, tokenizer.decode(ids)
    finally:
        shutdown()
