"""The ``vlm`` run kind: pretraining or SFT of the discrete VLM on packed code shards.

Before any compute, the pieces must agree: the code shards were made by the recipe's ViQ tokenizer
(``model.visual.viq``), the vocabulary was extended for that tokenizer, and an ``init.checkpoint`` (or the start
``init.hf`` builds, ``from_hf.py``) or a resumed checkpoint has the same vocabulary; each mismatch is refused with
both fingerprints.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

from megatron_ext.data import prepared
from megatron_ext.data.prepared import PreparedRows
from megatron_ext.model.gpt import build_gpt, transformer_config
from megatron_ext.training.checkpoint import VocabRecord
from megatron_ext.training.loop import base_hf_config, build_trainer, initialize_from, run_training
from megatron_ext.training.parallel import Layout, device, init_distributed
from megatron_ext.vlm.from_hf import init_checkpoint
from megatron_ext.vlm.model import (
    ContinuousVisualEmbedding,
    VisionLanguageModel,
    VisualEmbedding,
    continuous_batch,
    viq_fingerprint,
    vlm_forward_step,
)
from viq_mllm import artifact
from viq_mllm.data.loader import MicroBatchLoader
from viq_mllm.data.multimodal import PackedDataset, PackedSource, documents_from_shards
from viq_mllm.data.packing import pack
from viq_mllm.data.shards import CodeShards, FingerprintMismatch
from viq_mllm.data.sources import TarMember
from viq_mllm.recipe import ModelSection, ParallelSection, Recipe, TrainSection
from viq_mllm.viq import ViQTokenizer
from viq_mllm.viq.preprocess import preprocess
from viq_mllm.vocab.tokenizer import MultimodalTokenizer

log = logging.getLogger(__name__)


def load_data(recipe: Recipe, tokenizer: MultimodalTokenizer, expected_viq: str) -> PackedDataset:
    """Each source is a prepared directory (``viq-mllm prepare``: memory-mapped, read row by row) or a code-shard
    set (read and packed in memory at start-up)."""
    data, model = recipe.data, recipe.model
    sources = []
    for source in data.sources:
        if artifact.kind_of(Path(source.path)) == prepared.KIND:
            rows = PreparedRows(source.path)
            rows.check(viq_fingerprint=expected_viq, vocab_fingerprint=tokenizer.vocab.fingerprint, task=data.task,
                       seq_length=model.seq_length, group=model.visual.group, truncate=data.truncate,
                       pack=data.pack)
        else:
            shards = CodeShards(source.path, expected_fingerprint=expected_viq)
            docs = documents_from_shards(shards, tokenizer, data.task, model.visual.group)
            rows = pack(docs, model.seq_length, data.truncate, one_per_row=not data.pack)
        sources.append(PackedSource(rows, source.weight))
    return PackedDataset(sources, recipe.train.seed)


def vocab_record(recipe: Recipe, tokenizer: MultimodalTokenizer) -> VocabRecord:
    v = tokenizer.vocab
    return VocabRecord(text_size=v.text_size, padded_size=v.padded_size, text_fingerprint=v.text_fingerprint,
                       vocab_fingerprint=v.fingerprint, viq_fingerprint=v.viq_fingerprint,
                       vocab_dir=str(Path(recipe.data.vocab).resolve()),
                       viq_dir=str(Path(recipe.model.visual.viq).resolve()))


def build_vlm(m: ModelSection, p: ParallelSection, t: TrainSection, tokenizer: MultimodalTokenizer,
              layout: Layout) -> VisionLanguageModel:
    """The VLM of a model section (``visual`` set) for this layout; weights depend on ``t.seed`` only."""
    gpt = build_gpt(transformer_config(m, p, t), m, p, tokenizer.vocab.padded_size, layout, t.seed)
    visual = None
    if layout.first_stage:
        with torch.random.fork_rng():
            torch.manual_seed(t.seed + 17)  # same visual init on every layout
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


def train_vlm(recipe: Recipe) -> list[dict]:
    p, t, m = recipe.parallel, recipe.train, recipe.model
    layout = init_distributed(p.tp, p.pp, t.seed)
    start = init_checkpoint(recipe, layout) if recipe.init.hf else None
    tokenizer = MultimodalTokenizer.from_dir(recipe.data.vocab)
    expected_viq = viq_fingerprint(m.visual.viq)
    if tokenizer.vocab.viq_fingerprint != expected_viq:
        raise FingerprintMismatch(
            f"data.vocab={recipe.data.vocab} was extended for ViQ tokenizer {tokenizer.vocab.viq_fingerprint}, "
            f"model.visual.viq={m.visual.viq} is {expected_viq}"
        )
    dataset = load_data(recipe, tokenizer, expected_viq)
    vlm = build_vlm(recipe.model, recipe.parallel, recipe.train, tokenizer, layout)
    vocab = vocab_record(recipe, tokenizer)
    # a VLM checkpoint, or a GPT one (resize-vocab's output)
    initialize_from(recipe, vocab, lambda found: vlm if found.model.visual else vlm.gpt, start)
    trainer = build_trainer(recipe, layout, vlm, vocab, packed=True, hf_config=base_hf_config(recipe, start))
    padding = [round(s.padding_fraction, 4) for s in dataset.sources]
    log.info("packed %d rows of %d positions; padding fraction per source %s",
             sum(len(s.rows) for s in dataset.sources), m.seq_length, padding)

    pixels = PixelSource(m.visual.viq, tokenizer.vocab) if m.visual.embedding == "continuous" else None
    batches = MicroBatchLoader(dataset, t.global_batch_size, t.micro_batch_size, layout.dp_rank, layout.dp_size,
                               workers=recipe.data.workers, transform=pixels.attach if pixels else without_images)
    return run_training(trainer, batches, tokens_per_step=t.global_batch_size * m.seq_length,
                        forward_step=vlm_forward_step)


def without_images(batch: dict) -> dict:
    """A discrete model's micro-batch: the source-image locators are the baseline's only."""
    return {k: v for k, v in batch.items() if k != "images"}
