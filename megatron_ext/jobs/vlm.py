"""The ``vlm`` run kind: pretraining or SFT of the discrete VLM on packed code shards.

Before any compute, the pieces must agree: the code shards were made by the recipe's ViQ tokenizer
(``model.visual.viq``), the vocabulary was extended for that tokenizer, and an ``init.checkpoint`` (or the start
``init.hf`` builds, ``init_hf.py``) or a resumed checkpoint has the same vocabulary; each mismatch is refused with
both fingerprints.
"""

from __future__ import annotations

import logging
from pathlib import Path

from megatron_ext.data import prepared
from megatron_ext.data.prepared import PreparedRows
from megatron_ext.jobs.init_hf import init_checkpoint
from megatron_ext.training.loop import base_hf_config, build_trainer, initialize_from, run_training
from megatron_ext.training.parallel import init_distributed
from megatron_ext.vlm.build import PixelSource, build_vlm, vocab_record, without_images
from megatron_ext.vlm.model import viq_fingerprint, vlm_forward_step
from viq_mllm import artifact
from viq_mllm.data.loader import MicroBatchLoader
from viq_mllm.data.multimodal import PackedDataset, PackedSource, documents_from_shards
from viq_mllm.data.packing import pack
from viq_mllm.data.shards import CodeShards, FingerprintMismatch
from viq_mllm.recipe import Recipe
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
                       pack=data.pack, pack_align=data.pack_align)
        else:
            shards = CodeShards(source.path, expected_fingerprint=expected_viq)
            docs = documents_from_shards(shards, tokenizer, data.task, model.visual.group)
            rows = pack(docs, model.seq_length, data.truncate, one_per_row=not data.pack, align=data.pack_align)
        sources.append(PackedSource(rows, source.weight))
    return PackedDataset(sources, recipe.train.seed)


def train_vlm(recipe: Recipe) -> list[dict]:
    p, t, m = recipe.parallel, recipe.train, recipe.model
    layout = init_distributed(p.tp, p.pp, t.seed, p.vpp, p.timeout_s)
    start = init_checkpoint(recipe, layout) if recipe.init.hf else None
    tokenizer = MultimodalTokenizer.from_dir(recipe.data.vocab)
    expected_viq = viq_fingerprint(m.visual.viq)
    if tokenizer.vocab.viq_fingerprint != expected_viq:
        raise FingerprintMismatch(
            f"data.vocab={recipe.data.vocab} was extended for ViQ tokenizer {tokenizer.vocab.viq_fingerprint}, "
            f"model.visual.viq={m.visual.viq} is {expected_viq}"
        )
    dataset = load_data(recipe, tokenizer, expected_viq)
    vlm = [build_vlm(m, p, tokenizer, layout, t.seed, t.precision, chunk, t.fp8_recipe) for chunk in layout.chunks]
    vocab = vocab_record(recipe, tokenizer)
    # a VLM checkpoint, or a GPT one (resize-vocab's output)
    initialize_from(recipe, vocab, lambda found: vlm if found.model.visual else [c.gpt for c in vlm], start)
    trainer = build_trainer(recipe, layout, vlm, vocab, packed=True, hf_config=base_hf_config(recipe, start))
    padding = [round(s.padding_fraction, 4) for s in dataset.sources]
    log.info("packed %d rows of %d positions; padding fraction per source %s",
             sum(len(s.rows) for s in dataset.sources), m.seq_length, padding)

    pixels = PixelSource(m.visual.viq, tokenizer.vocab) if m.visual.embedding == "continuous" else None
    batches = MicroBatchLoader(dataset, t.global_batch_size, t.micro_batch_size, layout.dp_rank, layout.dp_size,
                               workers=recipe.data.workers, transform=pixels.attach if pixels else without_images)
    return run_training(trainer, batches, tokens_per_step=t.global_batch_size * m.seq_length,
                        forward_step=vlm_forward_step)
