"""Image sources for offline code extraction, listed in a deterministic order.

- a folder: every image file below it (sorted paths); a caption is read from a sidecar ``stem.txt`` (first
  line) when present (the layout of the tuxpaint stamps and of many scraped sets);
- LLaVA-style ``.json`` (a list) or ``.jsonl`` (one per line) records, as LLaVA-Pretrain, LLaVA-Instruct,
  ShareGPT4V and LLaVA-OneVision ship them: ``{"id": ..., "image": path or [paths] (or absent: text-only),
  "conversations": [{"from": "human", "value": "<image>\n..."}, {"from": "gpt", "value": ...}]}`` or ``"caption"``
  instead of conversations; paths relative to ``image_root`` (default: the file's folder). A record that is not
  such an object is kept with its ``problem`` (reported and skipped by ``tokenize``, never fatal);
- webdataset shards: a ``.tar`` file or a folder of them, samples grouped by key, the image under an image
  extension and the text under ``txt`` (caption) or ``json``.

Each record's ``key`` is its index in this order, so shard assignment and sample keys never depend on timing.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

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


Image = Union[Path, TarMember]


@dataclass
class SourceRecord:
    index: int
    images: list[Image]  # none for a text-only record
    source: str  # human-readable origin, used in reports
    text: dict = field(default_factory=dict)
    problem: Optional[str] = None  # why the record cannot be used, found while listing

    @property
    def key(self) -> str:
        return f"{self.index:09d}"


def list_sources(src: str | Path, image_root: str | Path | None = None) -> list[SourceRecord]:
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"--input {src}: does not exist")
    if src.is_file() and src.suffix in (".json", ".jsonl"):
        return _from_records(src, Path(image_root) if image_root is not None else src.parent)
    if src.is_file() and src.suffix == ".tar":
        return _from_tars([src])
    if src.is_dir():
        tars = sorted(src.glob("*.tar"))
        if tars and not any(p.suffix.lower() in IMAGE_EXTENSIONS for p in src.iterdir()):
            return _from_tars(tars)
        return _from_folder(src)
    raise ValueError(f"--input {src}: expected a folder, a LLaVA-style .json / .jsonl file or webdataset .tar shards")


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
        records.append(SourceRecord(i, [path], str(path.relative_to(root)), text))
    return records


def _from_records(path: Path, image_root: Path) -> list[SourceRecord]:
    if path.suffix == ".json":
        try:
            items = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"--input {path}: not valid JSON ({err})") from None
        if not isinstance(items, list):
            raise ValueError(f"--input {path}: expected a JSON list of records, found {type(items).__name__}")
        numbered = [(f"{path.name}[{i}]", item) for i, item in enumerate(items)]
    else:
        lines = path.read_text(encoding="utf-8").splitlines()
        numbered = [(f"{path.name}:{n}", _json_or_error(line)) for n, line in enumerate(lines, 1) if line.strip()]
    return [_record(i, where, item, image_root) for i, (where, item) in enumerate(numbered)]


def _json_or_error(line: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        return ValueError(f"not valid JSON ({err})")


def _record(index: int, where: str, item, image_root: Path) -> SourceRecord:
    """One LLaVA-style record; what is wrong with it goes to ``problem``."""
    if isinstance(item, ValueError):
        return SourceRecord(index, [], where, problem=f"{where}: {item}")
    if not isinstance(item, dict):
        return SourceRecord(index, [], where, problem=f"{where}: expected a JSON object, found {type(item).__name__}")
    if "id" in item:
        where = f"{where} (id {item['id']})"
    image = item.get("image", [])
    paths = [image] if isinstance(image, str) else image
    text = {k: item[k] for k in ("caption", "conversations") if k in item}
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        return SourceRecord(index, [], where, text, f"{where}: 'image' must be a path or a list of paths")
    if not text:
        return SourceRecord(index, [], where, text, f"{where}: no 'conversations' or 'caption'")
    return SourceRecord(index, [image_root / p for p in paths], where, text)


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
                records.append(SourceRecord(len(records), [member], f"{tar_path.name}:{member.name}",
                                            texts.get(key, {})))
    return records


def sources_fingerprint(records: list[SourceRecord]) -> str:
    """A hash of what ``tokenize`` reads: every record's key, text and image locations, with each file's size and
    modification time (hashing the images' bytes would read a 100k-image set twice; a replaced file changes its
    size or time)."""
    digest = hashlib.sha256()
    stamps: dict[Path, tuple[int, int]] = {}
    for record in records:
        images = []
        for image in record.images:
            path = Path(image.tar if isinstance(image, TarMember) else image)
            if path not in stamps:
                stat = path.stat() if path.is_file() else None
                stamps[path] = (stat.st_size, stat.st_mtime_ns) if stat else (-1, -1)
            images.append([str(image), *stamps[path]])
        item = [record.key, record.source, record.text, images, record.problem]
        digest.update(json.dumps(item, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]
