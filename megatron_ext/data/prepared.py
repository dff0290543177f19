"""The prepared training format: a code-shard set turned once into memory-mapped documents and cached packing.

``viq-mllm prepare`` (``megatron_ext.jobs.prepare``) writes, into ``OUT``, one megatron-core indexed dataset (``.bin`` / ``.idx``, the format of
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

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset

from viq_mllm import artifact
from viq_mllm.data.layout import Document
from viq_mllm.data.packing import Row

KIND = "prepared"
FORMAT = 3  # the artifact's schema; 3: token and code ids in megatron's dtype for the vocabulary (2: always int32)
#: per-document fields and their dtypes; ``None``: megatron's choice for the vocabulary's ids
#: (``DType.optimal_dtype``: uint16 below 65,500 ids, else int32), what its own readers assume
FIELDS = {"tokens": None, "loss_mask": np.uint8, "visual": np.uint8, "codes": None, "images": np.uint8}
PARTS = "parts"


class PreparedMismatch(ValueError):
    """Prepared data made from other inputs than the run's recipe names."""


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
        """Refuse data prepared from other inputs than ``expected`` (fields of ``megatron_ext.jobs.prepare.spec_of``)."""
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
