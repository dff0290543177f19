"""``viq-mllm resize-vocab``: grow a megatron checkpoint's embedding and output layer to an extended vocabulary.

The checkpoint's ``model.json`` says how many rows are real text tokens (``text_size``) and which text
tokenizer made them; the vocabulary's ``vocab.json`` must agree on both, or the resize is refused naming both.

Rows, for the embedding and (if untied) the output layer:

- ``[0, text_size)``: copied bit-identically (any TP of the source: torch_dist checkpoints reshard on load);
- ``[text_size, vocab.size)`` (special and code tokens, including rows that were padding before — the place
  where new tokens silently land on uninitialised rows in other stacks): drawn from a normal distribution with
  the old rows' mean and ``cov_scale`` x their covariance (``mean-cov``), or set to the mean (``mean``): a new token
  starts as an "average" token, so the loss does not jump after the resize, and different rows break symmetry;
- code rows, when the VLM sums ``group`` codes per visual position (``model.visual.group``; the slot vectors start
  at 1): mean / G and covariance / G, so that the *sum* starts as a new token would. Example, SmolLM2-135M: its
  rows' mean has norm 2.2; with G = 16 and every code at the mean, a visual position would start at norm 35, the
  same direction for every image, ten times any text token, and the pretrained LLM reads the images as noise on
  one huge vector; at mean / 16 it starts as an average token;
- ``[vocab.size, padded_size)``: padding, set to the mean.

The result is a model-only checkpoint, loadable at any TP by ``checkpoint.load_model``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from megatron_ext.model.gpt import build_gpt, transformer_config
from megatron_ext.training import checkpoint
from megatron_ext.training.parallel import init_distributed, shutdown
from viq_mllm.recipe import ParallelSection
from viq_mllm.vocab import Vocab

log = logging.getLogger(__name__)


class VocabMismatch(ValueError):
    """The checkpoint's text vocabulary is not the one the extended vocabulary was built on."""


def new_rows(old: torch.Tensor, count: int, init: str, cov_scale: float, generator: torch.Generator,
             group: int = 1) -> torch.Tensor:
    """``count`` rows from the statistics of ``old [n, h]`` (computed in float64), scaled so that the sum of
    ``group`` independent rows has the old mean and ``cov_scale`` x the old covariance."""
    old64 = old.double()
    old_mean = old64.mean(0)
    mean = old_mean / group
    if init == "mean":
        return mean.expand(count, -1).to(old.dtype).clone()
    centered = old64 - old_mean
    cov = centered.T @ centered / max(old.shape[0] - 1, 1) * cov_scale / group
    cov += torch.eye(cov.shape[0], dtype=cov.dtype) * 1e-12 * cov.diagonal().mean().clamp_min(1e-30)
    chol = torch.linalg.cholesky(cov)
    noise = torch.randn(count, old.shape[1], dtype=torch.float64, generator=generator)
    return (mean + noise @ chol.T).to(old.dtype)


def grow(table: torch.Tensor, vocab: Vocab, init: str, cov_scale: float, seed: int, group: int) -> torch.Tensor:
    """``table [P_new, h]`` whose first ``vocab.text_size`` rows hold the old values -> all rows initialised;
    ``group``: the codes one visual position sums."""
    generator = torch.Generator().manual_seed(seed)
    text, codes, used = vocab.text_size, vocab.code_offset, vocab.size
    old = table[:text]
    out = table.clone()
    out[text:codes] = new_rows(old, codes - text, init, cov_scale, generator)
    out[codes:used] = new_rows(old, used - codes, init, cov_scale, generator, group)
    out[used:] = old.double().mean(0).to(table.dtype)
    return out


def check_compatible(have: checkpoint.VocabRecord, vocab: Vocab, source: Path) -> None:
    if have.text_size != vocab.text_size or have.text_fingerprint != vocab.text_fingerprint:
        raise VocabMismatch(
            f"{source} was trained with a text vocabulary of {have.text_size} ids ({have.text_fingerprint}), "
            f"but the extended vocabulary is built on {vocab.text_size} ids ({vocab.text_fingerprint})"
        )
    if have.vocab_fingerprint:
        raise VocabMismatch(f"{source} already has an extended vocabulary ({have.vocab_fingerprint})")


def resize_checkpoint(source: str | Path, vocab_dir: str | Path, out: str | Path, group: int,
                      init: str = "mean-cov", cov_scale: float = 1e-2, seed: int = 0) -> dict:
    source, out = Path(source), Path(out)
    meta = checkpoint.read_meta(source)
    vocab = Vocab.load(vocab_dir)
    check_compatible(meta.vocab, vocab, source)
    model = meta.model
    layout = init_distributed(tp=1, pp=1, seed=seed)
    try:
        config = transformer_config(model)
        gpt = build_gpt(config, model, ParallelSection(), vocab.padded_size, layout, seed)
        checkpoint.load_model(source, gpt)
        with torch.no_grad():
            tables = [gpt.embedding.word_embeddings.weight]
            if not model.tie_embeddings:
                tables.append(gpt.output_layer.weight)
            for i, table in enumerate(tables):
                table.copy_(grow(table, vocab, init, cov_scale, seed + i, group))
        new_meta = checkpoint.CheckpointMeta(
            model=model, resized_from=str(source.resolve()), hf_config=meta.hf_config,
            vocab=checkpoint.VocabRecord(text_size=vocab.text_size, padded_size=vocab.padded_size,
                                         text_fingerprint=vocab.text_fingerprint, vocab_fingerprint=vocab.fingerprint))
        checkpoint.save_model(out, gpt, new_meta)
    finally:
        shutdown()
    log.info("wrote %s: embedding %d -> %d rows (%d kept, %d new, init %s; code rows scaled for %d codes per "
             "visual position)", out, meta.vocab.padded_size, vocab.padded_size, vocab.text_size,
             vocab.size - vocab.text_size, init, group)
    return new_meta
