"""The prepared training format: a code-shard set turned once into memory-mapped documents and cached packing.

``viq-mllm prepare`` writes, into ``OUT``, one megatron-core indexed dataset (``.bin`` / ``.idx``, the format of
Megatron-LM's ``preprocess_data.py``) per document field, one sequence per document:

=============  ======  =====================================================================
file prefix    dtype   per document
=============  ======  =====================================================================
``tokens``     ids     the ids of its positions (a visual position holds its first code's id)
``loss_mask``  uint8   1 where the next id is supervised
``visual``     uint8   1 at visual positions
``codes``      ids     the ``G`` code ids of each visual position, flattened
``images``     uint8   its image blocks' source locators (UTF-8, each ended by a line break)
=============  ======  =====================================================================

where ``ids`` is megatron's dtype for the vocabulary (``DType.optimal_dtype``: uint16 below 65,500 ids, else
int32), what megatron-core's own readers assume; and the packing, computed once: ``rows.npy`` (the documents of
every row, concatenated) and ``row_offsets.npy``.

The folder is an artifact (:mod:`viq_mllm.artifact`): ``manifest.json`` holds the shards' checksums, the ViQ and
vocabulary fingerprints, task, sequence length, group, truncation and packing, and every file's checksum. A run
on the same inputs finds it and does nothing; other inputs are refused (or redone with ``overwrite``); training
refuses prepared data whose inputs differ from its recipe's, and a file whose size differs from the manifest.
``prepare`` first checks that the shards were made by the ViQ tokenizer the vocabulary was extended for. Shards
are prepared one by one into ``parts/`` (split over ranks under torchrun, :class:`~viq_mllm.artifact.ShardedJob`),
each part kept once complete, so an interrupted run resumes; every file is a pure function of the inputs, so
reruns are byte-identical.

Training maps the files and builds a row's documents when the row is read (:class:`PreparedRows`): memory grows
with the index (a few bytes per document), not with the data.

    >>> rows = PreparedRows("prepared/captions")        # what data.sources=[{path: prepared/captions}] reads
    >>> rows[0].used <= rows.seq_length                 # rows[i]: a Row of Documents, as packing.pack makes
    True
"""

from __future__ import annotations

import gc
import hashlib
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder

from viq_mllm import artifact
from viq_mllm.console import progress
from viq_mllm.data.layout import Document
from viq_mllm.data.multimodal import sample_document
from viq_mllm.data.packing import Row, fit, row_documents
from viq_mllm.data.shards import CodeShards, FingerprintMismatch, read_shard
from viq_mllm.vocab.tokenizer import MultimodalTokenizer

KIND = "prepared"
FORMAT = 3  # the artifact's schema; 3: token and code ids in megatron's dtype for the vocabulary (2: always int32)
#: per-document fields and their dtypes; ``None``: megatron's choice for the vocabulary's ids
#: (``DType.optimal_dtype``: uint16 below 65,500 ids, else int32), what its own readers assume
FIELDS = {"tokens": None, "loss_mask": np.uint8, "visual": np.uint8, "codes": None, "images": np.uint8}
PARTS = "parts"


class PreparedMismatch(ValueError):
    """Prepared data made from other inputs than the run's recipe names."""


def spec_of(shards: CodeShards, tokenizer: MultimodalTokenizer, task: str, seq_length: int, group: int,
            truncate: bool, pack: bool, pack_align: int = 1) -> artifact.Spec:
    """Everything the prepared files depend on: the artifact's identity."""
    made_from = {"shards": hashlib.sha256("".join(shards.checksums).encode()).hexdigest()[:16],
                 "viq_fingerprint": shards.fingerprint, "vocab_fingerprint": tokenizer.vocab.fingerprint}
    options = {"task": task, "seq_length": seq_length, "group": group, "truncate": truncate, "pack": pack,
               "pack_align": pack_align,
               "id_dtype": np.dtype(_id_dtype(tokenizer.vocab.size)).name}
    return artifact.Spec(KIND, FORMAT, made_from, options)


def _id_dtype(vocab_size: int):
    return DType.optimal_dtype(vocab_size)


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


def _open(prefix: Path) -> IndexedDataset:
    """Memory-mapped, unless the data file is empty (no document has an image), which cannot be mapped."""
    return IndexedDataset(str(prefix), mmap=prefix.with_suffix(".bin").stat().st_size > 0)


class PreparedRows(Sequence):
    """The packed rows of a prepared directory, each built from the memory-mapped files when read. Opening checks
    the manifest (kind, schema, every file at its recorded size: a truncated ``.bin`` is named here, before the
    first step); ``viq-mllm verify`` checks the checksums too."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if not (self.directory / artifact.MANIFEST).is_file():
            raise FileNotFoundError(f"{self.directory}: no {artifact.MANIFEST}; run `viq-mllm prepare` into it first")
        manifest = artifact.verify(self.directory, kind=KIND)
        if manifest["schema"] != FORMAT:
            raise ValueError(f"{self.directory}: prepared data of format {manifest['schema']}, this version reads "
                             f"format {FORMAT}; run `viq-mllm prepare` again into a new folder")
        self.inputs = {**manifest["made_from"], **manifest["options"]}
        self.seq_length, self.group, self.align = (self.inputs["seq_length"], self.inputs["group"],
                                                   self.inputs["pack_align"])
        self.padding_fraction = manifest["summary"]["padding_fraction"]
        self._fields = {f: _open(self.directory / f) for f in FIELDS}
        self._rows = np.load(self.directory / "rows.npy", mmap_mode="r")
        self._offsets = np.load(self.directory / "row_offsets.npy", mmap_mode="r")

    def check(self, **expected) -> None:
        """Refuse data prepared from other inputs than ``expected`` (fields of :func:`spec_of`)."""
        for name, value in expected.items():
            if self.inputs[name] != value:
                raise PreparedMismatch(f"{self.directory} was prepared with {name}={self.inputs[name]!r}, this run "
                                       f"expects {value!r}; run `viq-mllm prepare` again for this recipe")

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index: int) -> Row:
        first, last = int(self._offsets[index]), int(self._offsets[index + 1])
        return Row([self._document(int(d)) for d in self._rows[first:last]], self.seq_length, self.align)

    def _document(self, index: int) -> Document:
        field = {name: dataset[index] for name, dataset in self._fields.items()}
        return Document(torch.from_numpy(field["tokens"].astype(np.int64)),
                        torch.from_numpy(field["visual"].astype(bool)),
                        torch.from_numpy(field["codes"].astype(np.int64)).reshape(-1, self.group),
                        torch.from_numpy(field["loss_mask"].astype(np.float32)),
                        [path or None for path in field["images"].tobytes().decode().split("\n")[:-1]])
