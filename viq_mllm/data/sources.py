"""Image sources for offline code extraction, listed in a deterministic order.

- a folder: every image file below it (sorted paths); a caption is read from a sidecar ``stem.txt`` (first
  line) when present (the layout of the tuxpaint stamps and of many scraped sets);
- a ``.jsonl`` file: one ``{"image": path, "caption": ...}`` or ``{"image": path, "conversations": [...]}`` per
  line, paths relative to the file;
- webdataset shards: a ``.tar`` file or a folder of them, samples grouped by key, the image under an image
  extension and the text under ``txt`` (caption) or ``json``.

Each record's ``key`` is its index in this order, so shard assignment and sample keys never depend on timing.
"""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


@dataclass(frozen=True)
class TarMember:
    """An image inside a tar shard, read on demand (in a DataLoader worker)."""

    tar: Path
    name: str

    def read(self) -> bytes:
        with tarfile.open(self.tar) as tar:
            return tar.extractfile(self.name).read()

    def locator(self) -> str:
        """``/abs/shard.tar::member.jpg``: where a later reader (the continuous baseline) finds the image."""
        return f"{Path(self.tar).resolve()}::{self.name}"

    @classmethod
    def from_locator(cls, locator: str) -> "TarMember":
        tar, _, name = locator.partition("::")
        return cls(Path(tar), name)


@dataclass
class SourceRecord:
    index: int
    image: Union[Path, TarMember]
    source: str  # human-readable origin, used in reports
    text: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.index:09d}"


def list_sources(src: str | Path) -> list[SourceRecord]:
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"--input {src}: does not exist")
    if src.is_file() and src.suffix == ".jsonl":
        return _from_jsonl(src)
    if src.is_file() and src.suffix == ".tar":
        return _from_tars([src])
    if src.is_dir():
        tars = sorted(src.glob("*.tar"))
        if tars and not any(p.suffix.lower() in IMAGE_EXTENSIONS for p in src.iterdir()):
            return _from_tars(tars)
        return _from_folder(src)
    raise ValueError(f"--input {src}: expected a folder, a .jsonl file or webdataset .tar shards")


def _from_folder(root: Path) -> list[SourceRecord]:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    records = []
    for i, path in enumerate(files):
        sidecar = path.with_suffix(".txt")
        text = {}
        if sidecar.is_file():
            lines = sidecar.read_text(encoding="utf-8", errors="replace").strip().splitlines()
            if lines:
                text = {"caption": lines[0].strip()}
        records.append(SourceRecord(i, path, str(path.relative_to(root)), text))
    return records


def _from_jsonl(path: Path) -> list[SourceRecord]:
    records = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            image = item["image"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{path}:{line_no}: expected a JSON object with an 'image' field ({err})") from None
        text = {k: item[k] for k in ("caption", "conversations") if k in item}
        records.append(SourceRecord(len(records), path.parent / image, str(image), text))
    return records


def _from_tars(tars: list[Path]) -> list[SourceRecord]:
    records = []
    for tar_path in tars:
        samples: dict[str, dict[str, str]] = {}
        texts: dict[str, dict] = {}
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                if not member.isfile():
                    continue
                key, _, ext = member.name.partition(".")
                samples.setdefault(key, {})[ext.lower()] = member.name
                if ext == "txt":
                    texts[key] = {"caption": tar.extractfile(member).read().decode("utf-8", "replace").strip()}
                elif ext == "json" and key not in texts:
                    meta = json.loads(tar.extractfile(member).read())
                    texts[key] = {k: meta[k] for k in ("caption", "conversations") if k in meta}
        for key in sorted(samples):
            image_ext = next((e for e in samples[key] if f".{e}" in IMAGE_EXTENSIONS), None)
            if image_ext is not None:
                member = TarMember(tar_path, samples[key][image_ext])
                records.append(SourceRecord(len(records), member, f"{tar_path.name}:{member.name}", texts.get(key, {})))
    return records
