"""A VLM from a recipe: the network of a model section (discrete or continuous visual embedding), the vocabulary
record its checkpoints carry, and what turns a packed micro-batch into the model's input (the continuous
baseline's pixels, or none)."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from megatron_ext.model.gpt import build_gpt, transformer_config
from megatron_ext.training.checkpoint import VocabRecord
from megatron_ext.training.parallel import Layout, device
from megatron_ext.vlm.model import ContinuousVisualEmbedding, VisionLanguageModel, VisualEmbedding, continuous_batch
from viq_mllm.data.sources import TarMember
from viq_mllm.recipe import ModelSection, ParallelSection, Recipe
from viq_mllm.viq import ViQTokenizer
from viq_mllm.viq.preprocess import preprocess
from viq_mllm.vocab.tokenizer import MultimodalTokenizer


def vocab_record(recipe: Recipe, tokenizer: MultimodalTokenizer) -> VocabRecord:
    v = tokenizer.vocab
    return VocabRecord(text_size=v.text_size, padded_size=v.padded_size, text_fingerprint=v.text_fingerprint,
                       vocab_fingerprint=v.fingerprint, viq_fingerprint=v.viq_fingerprint,
                       vocab_dir=str(Path(recipe.data.vocab).resolve()),
                       viq_dir=str(Path(recipe.model.visual.viq).resolve()))


def build_vlm(m: ModelSection, p: ParallelSection, tokenizer: MultimodalTokenizer, layout: Layout, seed: int = 0,
              precision: str = "fp32", chunk: int = 0, fp8_recipe: str = "delayed") -> VisionLanguageModel:
    """The VLM of a model section (``visual`` set) for this layout; weights depend on ``seed`` only. ``chunk``:
    which of this rank's virtual pipeline stages (:attr:`Layout.chunks`); the visual module is the first's."""
    config = transformer_config(m, p, precision, fp8_recipe)
    gpt = build_gpt(config, m, p, tokenizer.vocab.padded_size, layout, seed, chunk=chunk)
    visual = None
    if layout.holds_embedding(chunk):
        with torch.random.fork_rng():
            torch.manual_seed(seed + 17)  # same visual init on every layout
            if m.visual.embedding == "continuous":
                viq = ViQTokenizer.from_pretrained(m.visual.viq)
                visual = ContinuousVisualEmbedding(viq.vit, viq.config.width, m.hidden_size, m.visual.encoder_trained)
            else:
                visual = VisualEmbedding(m.visual, tokenizer.vocab, m.hidden_size, gpt.embedding.word_embeddings)
    return VisionLanguageModel(gpt, visual).to(device())


class PixelSource:
    """The continuous baseline's image loader: the raw images the code shards were made from (image files or
    members of webdataset image shards), decoded and preprocessed with the ViQ tokenizer's own preprocessing, so
    the patch grids equal the code grids. It runs where the micro-batches are built (DataLoader workers, with
    ``data.workers``) and keeps the last ``cached`` images only, so its memory does not grow with the data."""

    def __init__(self, viq_dir: str, vocab, cached: int = 256):
        config = ViQTokenizer.from_pretrained(viq_dir).config
        self.base, self.max_pixels, self.vocab = config.image_base, config.max_pixels, vocab
        self.load = functools.lru_cache(maxsize=cached)(self._decode)

    def _decode(self, path: str | None) -> tuple:
        if path is None:
            raise ValueError("these code shards do not record where their images are (made by an older "
                             "`viq-mllm tokenize`); re-tokenize to train the continuous baseline")
        source = TarMember.from_locator(path).read() if "::" in path else path  # webdataset image shards
        item = preprocess(source, self.base, self.max_pixels)
        return item.pixels, item.grid

    def attach(self, batch: dict) -> dict:
        loaded = [self.load(p) for p in batch.pop("images")]
        return continuous_batch(batch, self.vocab, [p for p, _ in loaded], [g for _, g in loaded])


def without_images(batch: dict) -> dict:
    """A discrete model's micro-batch: the source-image locators are the baseline's only."""
    return {k: v for k, v in batch.items() if k != "images"}
