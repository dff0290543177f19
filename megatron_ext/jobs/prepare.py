"""``viq-mllm prepare``: a code-shard set -> the prepared training format (``megatron_ext.data.prepared``), split
over ranks shard by shard (:class:`viq_mllm.artifact.ShardedJob`), resumable, byte-identical on a rerun."""

from __future__ import annotations

import gc
import hashlib
import shutil
from pathlib import Path

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder

from megatron_ext.data.prepared import FIELDS, FORMAT, KIND, PARTS
from viq_mllm import artifact
from viq_mllm.console import progress
from viq_mllm.data.chat import chat_layout_id
from viq_mllm.data.layout import Document
from viq_mllm.data.multimodal import sample_document
from viq_mllm.data.packing import fit, row_documents
from viq_mllm.data.shards import CodeShards, FingerprintMismatch, read_shard
from viq_mllm.vocab.tokenizer import MultimodalTokenizer


def _id_dtype(vocab_size: int):
    return DType.optimal_dtype(vocab_size)


def spec_of(shards: CodeShards, tokenizer: MultimodalTokenizer, task: str, seq_length: int, group: int,
            truncate: bool, pack: bool, pack_align: int = 1) -> artifact.Spec:
    """Everything the prepared files depend on: the artifact's identity."""
    made_from = {"shards": hashlib.sha256("".join(shards.checksums).encode()).hexdigest()[:16],
                 "viq_fingerprint": shards.fingerprint, "vocab_fingerprint": tokenizer.vocab.fingerprint}
    options = {"task": task, "seq_length": seq_length, "group": group, "truncate": truncate, "pack": pack,
               "pack_align": pack_align, "id_dtype": np.dtype(_id_dtype(tokenizer.vocab.size)).name}
    if task != "pretrain":  # a chat's ids follow its template
        options["chat_layout"] = chat_layout_id(tokenizer.text)
    return artifact.Spec(KIND, FORMAT, made_from, options)


def check_chain(shards: CodeShards, tokenizer: MultimodalTokenizer) -> None:
    """Refuse shards made by another ViQ tokenizer than the vocabulary was extended with (both named)."""
    if shards.fingerprint != tokenizer.vocab.viq_fingerprint:
        raise FingerprintMismatch(
            f"{shards.directory} holds codes of ViQ tokenizer {shards.fingerprint}, but the vocabulary was extended "
            f"for ViQ tokenizer {tokenizer.vocab.viq_fingerprint}; tokenize with that tokenizer or extend-vocab "
            "with this one")


def prepare(shards_dir: str | Path, vocab_dir: str | Path, out: str | Path, task: str, seq_length: int,
            group: int = 16, truncate: bool = False, pack: bool = True, rank: int = 0, world: int = 1,
            show_progress: bool = True, overwrite: bool = False, pack_align: int = 1) -> dict:
    """Prepare ``shards_dir`` into ``out`` (see the module); returns the summary (rank 0; ``{}`` on the others).
    ``out`` made from the same inputs is reused; from others, refused (or redone with ``overwrite``)."""
    shards, tokenizer, out = CodeShards(shards_dir), MultimodalTokenizer.from_dir(vocab_dir), Path(out)
    check_chain(shards, tokenizer)
    if seq_length % pack_align:
        raise ValueError(f"--seq-length {seq_length} is not a multiple of --pack-align {pack_align}")
    spec = spec_of(shards, tokenizer, task, seq_length, group, truncate, pack, pack_align)
    found = artifact.check_reuse(out, spec, overwrite, hint=" (or pass --overwrite to redo it)")
    if found is not None:
        return found["summary"]
    job = artifact.ShardedJob(out, spec, len(shards.shards), rank, world)
    mine = job.todo()
    bar = progress(len(mine), desc="prepare", unit="shard", disable=not (show_progress and rank == 0))
    for s in mine:
        _prepare_part(job, shards, s, tokenizer, task, seq_length, group, truncate)
        bar.update(1)
    bar.close()
    if rank != 0:
        return {}
    job.gather()
    return _finish(job, len(shards.shards), seq_length, pack, pack_align, _dtypes(tokenizer.vocab.size))


def _part_prefix(job: artifact.ShardedJob, shard: int) -> Path:
    return job.path / PARTS / f"part-{shard:05d}"


def _prepare_part(job: artifact.ShardedJob, shards: CodeShards, shard: int, tokenizer: MultimodalTokenizer,
                  task: str, seq_length: int, group: int, truncate: bool) -> None:
    """One shard's documents into ``parts/part-NNNNN.<field>.{bin,idx}``, then its unit record."""
    prefix = _part_prefix(job, shard)
    prefix.parent.mkdir(exist_ok=True)
    dtypes = _dtypes(tokenizer.vocab.size)
    builders = {f: IndexedDatasetBuilder(f"{prefix}.{f}.bin", dtype=dtypes[f]) for f in FIELDS}
    for sample in read_shard(shards.shards[shard]):
        name = f"{shards.shards[shard].name}: sample {sample.key}"
        doc = fit(sample_document(shards.directory, sample, tokenizer, task, group), seq_length, truncate, name)
        for field, values in _fields(doc, dtypes).items():
            builders[field].add_item(torch.from_numpy(values))
            builders[field].end_document()
    files = {}
    for field, builder in builders.items():
        builder.finalize(f"{prefix}.{field}.idx")
        for ext in ("bin", "idx"):  # trusted only once the unit's record says so, with these sizes
            path = Path(f"{prefix}.{field}.{ext}")
            files[str(path.relative_to(job.path))] = {"bytes": path.stat().st_size, "sha256": ""}
    job.finish_unit(shard, files, {})


def _dtypes(vocab_size: int) -> dict[str, type]:
    return {f: dtype or _id_dtype(vocab_size) for f, dtype in FIELDS.items()}


def _fields(doc: Document, dtypes: dict[str, type]) -> dict[str, np.ndarray]:
    values = {"tokens": doc.tokens.numpy(), "loss_mask": doc.loss_mask.numpy(), "visual": doc.visual.numpy(),
              "codes": doc.codes.reshape(-1).numpy(),
              "images": np.frombuffer(_locators(doc.images).encode(), dtype=np.uint8)}
    return {field: values[field].astype(dtypes[field]) for field in FIELDS}


def _locators(images: list) -> str:
    """One line per image block, each ended by a line break; a block whose source was not recorded is an empty
    line."""
    if any("\n" in (path or "") for path in images):
        raise ValueError(f"an image path holds a line break, which the prepared format cannot store: {images}")
    return "".join(f"{path or ''}\n" for path in images)


def _finish(job: artifact.ShardedJob, count: int, seq_length: int, pack: bool, align: int,
            dtypes: dict[str, type]) -> dict:
    """Merge the parts, pack once, drop the parts, publish."""
    out, parts = job.path, job.path / PARTS
    gc.freeze()  # megatron's add_index runs gc.collect() per part: seconds each over a process holding torch
    try:
        for field in FIELDS:
            builder = IndexedDatasetBuilder(str(out / f"{field}.bin"), dtype=dtypes[field])
            for s in range(count):
                builder.add_index(str(parts / f"{_part_prefix(job, s).name}.{field}"))
            builder.finalize(str(out / f"{field}.idx"))
    finally:
        gc.unfreeze()
    tokens = IndexedDataset(str(out / "tokens"))
    lengths = np.array(tokens.sequence_lengths, dtype=np.int64)  # a copy: the index is unmapped with ``tokens``
    del tokens
    rows = row_documents(lengths.tolist(), seq_length, one_per_row=not pack, align=align)
    np.save(out / "rows.npy", np.array([d for row in rows for d in row], dtype=np.int64))
    np.save(out / "row_offsets.npy", np.cumsum([0] + [len(row) for row in rows], dtype=np.int64))
    shutil.rmtree(parts)
    summary = {"documents": int(len(lengths)), "rows": len(rows),
               "padding_fraction": 1.0 - float(lengths.sum()) / (len(rows) * seq_length) if rows else 0.0}
    return job.seal(summary)["summary"]
