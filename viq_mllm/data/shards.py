"""Code shards (docs/concepts.md): webdataset tar files of ViQ codes, written byte-for-byte reproducibly.

One shard ``codes-00003.tar`` holds, per sample with key ``000001234`` (the input's global index) and for each of
its images ``i`` (none for a text-only sample, several for a multi-image conversation)::

    000001234.json         {"source": "...", "text": {...},
                            "images": [{"grid": [h, w], "source_size": [H, W],
                                        "path": "/abs/path.png" or "/abs/images.tar::key.jpg"}, ...]}
    000001234.0.codes.npy  uint16 array (h, w, 4): image 0's code grid
    000001234.1.codes.npy  ...

The folder is an artifact (:mod:`viq_mllm.artifact`): ``manifest.json`` holds the ViQ tokenizer's fingerprint,
the inputs' fingerprint, the options, every shard's checksum and the summary (counts, sizes, per-shard records);
``report.json`` lists the skipped inputs and why. :class:`CodeShards` refuses to feed a model whose fingerprint
differs, and a shard whose size or checksum differs from the manifest.

Tar members have fixed metadata (mtime 0, uid/gid 0, sorted keys), so the same codes give the same bytes.
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator, Optional

import numpy as np

from viq_mllm import artifact
from viq_mllm.artifact import MANIFEST

KIND = "code-shards"
SHARD_FORMAT = 2  # the artifact's schema; 2: a list of images per sample (1: one image per sample, no longer read)
SHARD_NAME = "codes-{:05d}.tar"
REPORT = "report.json"


class FingerprintMismatch(ValueError):
    """Shards made by one ViQ tokenizer fed to a model expecting another."""


@dataclass
class CodeImage:
    codes: np.ndarray  # (h, w, 4) uint16
    source_size: tuple[int, int]
    path: Optional[str] = None  # where the source image is: a file path, or "shard.tar::member" (baseline reads it)

    @property
    def grid(self) -> tuple[int, int]:
        return int(self.codes.shape[0]), int(self.codes.shape[1])


@dataclass
class CodeSample:
    key: str
    images: list[CodeImage]  # in the order of the text's ``<image>`` placeholders; empty for text-only samples
    source: str
    text: dict = field(default_factory=dict)  # {"caption": ...} or {"conversations": [...]}

    @property
    def codes(self) -> np.ndarray:
        """The code grid of a one-image sample (the common case of caption data)."""
        if len(self.images) != 1:
            raise ValueError(f"sample {self.key} ({self.source}) has {len(self.images)} images, not one")
        return self.images[0].codes


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = len(data), 0, 0o644, 0, 0, "", ""
    tar.addfile(info, io.BytesIO(data))


def encode_sample(sample: CodeSample) -> list[tuple[str, bytes]]:
    images, members = [], []
    for i, image in enumerate(sample.images):
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(image.codes, dtype=np.uint16), allow_pickle=False)
        members.append((f"{sample.key}.{i}.codes.npy", buf.getvalue()))
        record = {"grid": list(image.grid), "source_size": list(image.source_size)}
        images.append(record if image.path is None else {**record, "path": image.path})
    meta = {"images": images, "source": sample.source, "text": sample.text}
    return [(f"{sample.key}.json", json.dumps(meta, sort_keys=True, ensure_ascii=False).encode()), *members]


def write_shard(file: BinaryIO, samples: list[CodeSample]) -> None:
    """Write ``samples`` as one tar into ``file`` (sorted by key, fixed member metadata: the same codes give the
    same bytes)."""
    with tarfile.open(fileobj=file, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in sorted(samples, key=lambda s: s.key):
            for name, data in encode_sample(sample):
                _member(tar, name, data)


def read_shard(path: Path) -> Iterator[CodeSample]:
    with tarfile.open(path) as tar:
        members: dict[str, dict[str, bytes]] = {}
        for member in tar.getmembers():
            key, _, ext = member.name.partition(".")
            members.setdefault(key, {})[ext] = tar.extractfile(member).read()
    for key in sorted(members):
        parts = members[key]
        meta = json.loads(parts["json"])
        images = [CodeImage(np.load(io.BytesIO(parts[f"{i}.codes.npy"]), allow_pickle=False),
                            tuple(image["source_size"]), image.get("path"))
                  for i, image in enumerate(meta["images"])]
        yield CodeSample(key, images, meta["source"], meta["text"])


class CodeShards:
    """A shard set written by ``viq-mllm tokenize``: checks its manifest (every shard present at its size; with
    ``verify``, every checksum) and the ViQ tokenizer's fingerprint before anything is read."""

    def __init__(self, directory: str | Path, expected_fingerprint: str | None = None, verify: bool = True):
        self.directory = Path(directory)
        if not (self.directory / MANIFEST).is_file():
            raise FileNotFoundError(f"{self.directory}: no {MANIFEST}; is this the output of `viq-mllm tokenize`?")
        manifest = artifact.verify(self.directory, full=verify, kind=KIND)
        if manifest["schema"] != SHARD_FORMAT:
            raise ValueError(f"{self.directory}: code shards of format {manifest['schema']}, this version reads "
                             f"format {SHARD_FORMAT}; run `viq-mllm tokenize` again into a new folder")
        self.summary = manifest["summary"]
        self.fingerprint = manifest["made_from"]["viq_fingerprint"]
        if expected_fingerprint is not None and self.fingerprint != expected_fingerprint:
            raise FingerprintMismatch(
                f"{self.directory}: shards were made by ViQ tokenizer {self.fingerprint}, but this model expects "
                f"{expected_fingerprint}; re-tokenize with the right tokenizer or point the recipe at it"
            )
        self.shards = [self.directory / s["name"] for s in self.summary["shards"]]
        self.checksums = [manifest["files"][s["name"]]["sha256"] for s in self.summary["shards"]]

    def __iter__(self) -> Iterator[CodeSample]:
        for path in self.shards:
            yield from read_shard(path)

    def __len__(self) -> int:
        return sum(s["samples"] for s in self.summary["shards"])
