"""The prepared training format: a code-shard set turned once into memory-mapped documents and cached packing.

``viq-mllm prepare`` writes, into ``OUT``, one megatron-core indexed dataset (``.bin`` / ``.idx``, the format of
Megatron-LM's ``preprocess_data.py``) per document field, one sequence per document:

=============  ======  =====================================================================
file prefix    dtype   per document
=============  ======  =====================================================================
``tokens``     int32   the ids of its positions (a visual position holds its first code's id)
``loss_mask``  uint8   1 where the next id is supervised
``visual``     uint8   1 at visual positions
``codes``      int32   the ``G`` code ids of each visual position, flattened
``images``     uint8   its image blocks' source locators (UTF-8, each ended by a line break)
=============  ======  =====================================================================

and the packing, computed once: ``rows.npy`` (the documents of every row, concatenated) and ``row_offsets.npy``.
``prepared.json`` is written last and holds the hash of every input (the shards' checksums, the vocabulary
fingerprint, task, sequence length, group, truncation, packing): a run on the same inputs finds it and does nothing,
and training refuses prepared data whose inputs differ from its recipe's. Shards are prepared one by one into
``parts/`` (split over ranks under torchrun), each part kept once complete, so an interrupted run resumes; every
file is a pure function of the inputs, so reruns are byte-identical.

Training maps the files and builds a row's documents when the row is read (:class:`PreparedRows`): memory grows
with the index (a few bytes per document), not with the data.

    >>> rows = PreparedRows("prepared/captions")        # what data.sources=[{path: prepared/captions}] reads
    >>> rows[0].used <= rows.seq_length                 # rows[i]: a Row of Documents, as packing.pack makes
    True
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from viq_mllm.console import progress
from viq_mllm.data.layout import Document
from viq_mllm.data.multimodal import sample_document
from viq_mllm.data.packing import Row, fit, row_documents
from viq_mllm.data.shards import CodeShards, read_shard
from viq_mllm.vocab.tokenizer import MultimodalTokenizer

FORMAT = 2
PREPARED = "prepared.json"
FIELDS = {"tokens": np.int32, "loss_mask": np.uint8, "visual": np.uint8, "codes": np.int32, "images": np.uint8}


class PreparedMismatch(ValueError):
    """Prepared data made from other inputs than the run's recipe names."""


def inputs_of(shards: CodeShards, tokenizer: MultimodalTokenizer, task: str, seq_length: int, group: int,
              truncate: bool, pack: bool) -> dict:
    """Everything the prepared files depend on; its hash is the cache key."""
    return {"format": FORMAT, "shards": [s["sha256"] for s in shards.manifest["shards"]],
            "viq_fingerprint": shards.manifest["viq_fingerprint"], "vocab_fingerprint": tokenizer.vocab.fingerprint,
            "task": task, "seq_length": seq_length, "group": group, "truncate": truncate, "pack": pack}


def key_of(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def prepare(shards_dir: str | Path, vocab_dir: str | Path, out: str | Path, task: str, seq_length: int,
            group: int = 16, truncate: bool = False, pack: bool = True, rank: int = 0, world: int = 1,
            show_progress: bool = True) -> dict:
    """Prepare ``shards_dir`` into ``out`` (see the module); returns ``prepared.json``'s record."""
    shards, tokenizer, out = CodeShards(shards_dir), MultimodalTokenizer.from_dir(vocab_dir), Path(out)
    inputs = inputs_of(shards, tokenizer, task, seq_length, group, truncate, pack)
    key = key_of(inputs)
    if (out / PREPARED).is_file() and json.loads((out / PREPARED).read_text())["key"] == key:
        return json.loads((out / PREPARED).read_text())
    parts = out / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    mine = [s for s in range(len(shards.shards)) if s % world == rank and not _part_done(parts, s, key)]
    bar = progress(len(mine), desc="prepare", unit="shard", disable=not (show_progress and rank == 0))
    for s in mine:
        _prepare_part(shards, s, tokenizer, task, seq_length, group, truncate, parts, key)
        bar.update(1)
    bar.close()
    if rank != 0:
        return {}
    _wait_for_parts(parts, len(shards.shards), key)
    return _finish(out, parts, len(shards.shards), inputs, key, seq_length, pack)


def _part_name(shard: int) -> str:
    return f"part-{shard:05d}"


def _part_done(parts: Path, shard: int, key: str) -> bool:
    marker = parts / f"{_part_name(shard)}.done"
    return marker.is_file() and marker.read_text() == key


def _prepare_part(shards: CodeShards, shard: int, tokenizer: MultimodalTokenizer, task: str, seq_length: int,
                  group: int, truncate: bool, parts: Path, key: str) -> None:
    """One shard's documents into ``parts/part-NNNNN.<field>.{bin,idx}``, then its completion marker."""
    prefix = parts / _part_name(shard)
    builders = {f: IndexedDatasetBuilder(f"{prefix}.{f}.bin.tmp", dtype=dtype) for f, dtype in FIELDS.items()}
    for sample in read_shard(shards.shards[shard]):
        name = f"{shards.shards[shard].name}: sample {sample.key}"
        doc = fit(sample_document(shards.directory, sample, tokenizer, task, group), seq_length, truncate, name)
        for field, values in _fields(doc).items():
            builders[field].add_item(torch.from_numpy(values))
            builders[field].end_document()
    for field, builder in builders.items():
        builder.finalize(f"{prefix}.{field}.idx.tmp")
        for ext in ("bin", "idx"):
            os.replace(f"{prefix}.{field}.{ext}.tmp", f"{prefix}.{field}.{ext}")
    (parts / f"{_part_name(shard)}.done").write_text(key)


def _fields(doc: Document) -> dict[str, np.ndarray]:
    return {"tokens": doc.tokens.numpy().astype(np.int32), "loss_mask": doc.loss_mask.numpy().astype(np.uint8),
            "visual": doc.visual.numpy().astype(np.uint8), "codes": doc.codes.reshape(-1).numpy().astype(np.int32),
            "images": np.frombuffer(_locators(doc.images).encode(), dtype=np.uint8).copy()}


def _locators(images: list) -> str:
    """One line per image block, each ended by a line break; a block whose source was not recorded is an empty
    line."""
    if any("\n" in (path or "") for path in images):
        raise ValueError(f"an image path holds a line break, which the prepared format cannot store: {images}")
    return "".join(f"{path or ''}\n" for path in images)


def _wait_for_parts(parts: Path, count: int, key: str, timeout_s: float = 86400) -> None:
    deadline = time.time() + timeout_s
    while not all(_part_done(parts, s, key) for s in range(count)):
        if time.time() > deadline:
            raise TimeoutError(f"{parts}: other ranks did not finish their parts")
        time.sleep(1.0)


def _finish(out: Path, parts: Path, count: int, inputs: dict, key: str, seq_length: int, pack: bool) -> dict:
    """Merge the parts, pack once, write ``prepared.json`` last, drop the parts."""
    gc.freeze()  # megatron's add_index runs gc.collect() per part: seconds each over a process holding torch
    try:
        for field, dtype in FIELDS.items():
            builder = IndexedDatasetBuilder(str(out / f"{field}.bin"), dtype=dtype)
            for s in range(count):
                builder.add_index(str(parts / f"{_part_name(s)}.{field}"))
            builder.finalize(str(out / f"{field}.idx"))
    finally:
        gc.unfreeze()
    tokens = IndexedDataset(str(out / "tokens"))
    lengths = np.array(tokens.sequence_lengths, dtype=np.int64)  # a copy: the index is unmapped with ``tokens``
    del tokens
    rows = row_documents(lengths.tolist(), seq_length, one_per_row=not pack)
    np.save(out / "rows.npy", np.array([d for row in rows for d in row], dtype=np.int64))
    np.save(out / "row_offsets.npy", np.cumsum([0] + [len(row) for row in rows], dtype=np.int64))
    record = {"key": key, "inputs": inputs, "documents": int(len(lengths)), "rows": len(rows),
              "padding_fraction": 1.0 - float(lengths.sum()) / (len(rows) * seq_length)}
    tmp = out / f"{PREPARED}.tmp"
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
    os.replace(tmp, out / PREPARED)
    shutil.rmtree(parts)
    return record


def _open(prefix: Path) -> IndexedDataset:
    """Memory-mapped, unless the data file is empty (no document has an image), which cannot be mapped."""
    return IndexedDataset(str(prefix), mmap=prefix.with_suffix(".bin").stat().st_size > 0)


class PreparedRows(Sequence):
    """The packed rows of a prepared directory, each built from the memory-mapped files when read."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if not (self.directory / PREPARED).is_file():
            raise FileNotFoundError(f"{self.directory}: no {PREPARED}; run `viq-mllm prepare` into it first")
        self.record = json.loads((self.directory / PREPARED).read_text())
        self.inputs = self.record["inputs"]
        self.seq_length, self.group = self.inputs["seq_length"], self.inputs["group"]
        self.padding_fraction = self.record["padding_fraction"]
        self._fields = {f: _open(self.directory / f) for f in FIELDS}
        self._rows = np.load(self.directory / "rows.npy", mmap_mode="r")
        self._offsets = np.load(self.directory / "row_offsets.npy", mmap_mode="r")

    def check(self, **expected) -> None:
        """Refuse data prepared from other inputs than ``expected`` (fields of :func:`inputs_of`)."""
        for name, value in expected.items():
            if self.inputs[name] != value:
                raise PreparedMismatch(f"{self.directory} was prepared with {name}={self.inputs[name]!r}, this run "
                                       f"expects {value!r}; run `viq-mllm prepare` again for this recipe")

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index: int) -> Row:
        first, last = int(self._offsets[index]), int(self._offsets[index + 1])
        return Row([self._document(int(d)) for d in self._rows[first:last]], self.seq_length)

    def _document(self, index: int) -> Document:
        field = {name: dataset[index] for name, dataset in self._fields.items()}
        return Document(torch.from_numpy(field["tokens"].astype(np.int64)),
                        torch.from_numpy(field["visual"].astype(bool)),
                        torch.from_numpy(field["codes"].astype(np.int64)).reshape(-1, self.group),
                        torch.from_numpy(field["loss_mask"].astype(np.float32)),
                        [path or None for path in field["images"].tobytes().decode().split("\n")[:-1]])
