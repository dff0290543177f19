"""Artifacts: every folder the stack writes is published one way, and every reader checks it the same way.

A job writes into a staging sibling ``NAME.partial/`` and then *seals* it: ``manifest.json`` is written into it
and the folder is renamed to ``NAME`` in one step, so a reader sees a whole folder or none (a job killed with
``kill -9`` leaves only the staging folder, which the next run resumes or discards). The manifest says what made
the folder and what it holds::

    {"kind": "code-shards", "schema": 1,                    what it is, and the layout version of that kind
     "made_from": {"viq_fingerprint": "9c1f...", ...},      fingerprints of its inputs
     "options": {"shard_size": 1000, ...},                  the options that shape its bytes
     "versions": {"viq-mllm": "0.1.0", "torch": ..., ...},  the producing software
     "files": {"codes-00000.tar": {"bytes": 81920, "sha256": "..."}, ...},
     "summary": {...}}                                      the kind's own record (counts, sizes)

A job asked to write a folder that exists compares the manifest with what it is asked now (:func:`check_reuse`):
the same ``kind``, ``schema``, ``made_from`` and ``options`` -> the folder is reused (or resumed); anything else is
refused with both values shown, or, with ``overwrite``, redone. Readers call :func:`verify` before they trust a
folder: every listed file present at its recorded size (cheap, always), and with ``full`` its sha256 too.

Checksums of files the stack writes itself are computed while writing (:meth:`Staging.open`); files written by
another library (megatron's ``dist_checkpointing``, safetensors, ``save_pretrained``) are hashed when the folder is
sealed, straight after they were written, so from the page cache.

    >>> stage = Staging.begin(Path("out"), Spec("vocabulary", 1, {"viq": "9c1f"}, {}))
    >>> with stage.open("vocab.json") as f:
    ...     f.write(b"{}")
    >>> stage.seal({"size": 3})   # out/ now holds vocab.json and manifest.json
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import BinaryIO, Iterator, Optional

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
PARTIAL = ".partial"
_BLOCK = 1 << 20


class ArtifactError(ValueError):
    """A folder that cannot be trusted for what it is asked: another kind, other inputs, or damaged files."""


class StaleArtifact(ArtifactError):
    """A folder made from other inputs or options than the job asks for now."""


class DamagedArtifact(ArtifactError):
    """A folder whose files differ from its manifest (missing, truncated, or changed)."""


@dataclass(frozen=True)
class Spec:
    """What a job is asked to produce: the identity a folder's manifest must match to be reused."""

    kind: str
    schema: int
    made_from: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)

    def key(self) -> str:
        """A short hash of the spec: the name under which partial work of this exact job is kept."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True, default=str).encode()).hexdigest()[:16]


@lru_cache(maxsize=1)
def versions() -> dict[str, str]:
    """The producing software (read from package metadata, so nothing heavy is imported)."""
    found = {"python": sys.version.split()[0]}
    for package in ("viq-mllm", "torch", "megatron-core", "transformers"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return found


class _HashingWriter:
    """A binary file that hashes what passes through it (``tarfile`` and ``json`` write through this)."""

    def __init__(self, raw: BinaryIO):
        self.raw, self.digest, self.size = raw, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.raw.write(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self.raw.flush()


def file_record(path: Path) -> dict:
    """``{"bytes", "sha256"}`` of a file already on disk."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            digest.update(block)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def write_atomic(path: Path, data: bytes) -> dict:
    """Write ``data`` to ``path`` through a temporary name; returns its file record."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def read_manifest(folder: Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{folder}: no {MANIFEST}; it was not written by viq-mllm (or by a version before "
                            "manifests): write it again")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise DamagedArtifact(f"{path}: unreadable ({error})") from None


def kind_of(folder: Path) -> Optional[str]:
    """The kind a folder's manifest declares; None when it has no readable manifest."""
    try:
        return read_manifest(folder).get("kind") if (Path(folder) / MANIFEST).is_file() else None
    except DamagedArtifact:
        return None


def _differences(found: dict, spec: Spec) -> list[str]:
    asked = asdict(spec)
    out = []
    for section in ("kind", "schema", "made_from", "options"):
        have, want = found.get(section), asked[section]
        if isinstance(want, dict) and isinstance(have, dict):
            out += [f"{section}.{k}: the folder has {have.get(k)!r}, asked {want.get(k)!r}"
                    for k in sorted(set(have) | set(want)) if have.get(k) != want.get(k)]
        elif have != want:
            out.append(f"{section}: the folder has {have!r}, asked {want!r}")
    return out


def check_reuse(folder: Path, spec: Spec, overwrite: bool = False, hint: str = "") -> Optional[dict]:
    """The manifest of ``folder`` if it was made by exactly ``spec`` (reuse it), None if it must be written. A
    folder made otherwise (or holding no manifest) is refused, naming every difference, unless ``overwrite``."""
    folder = Path(folder)
    if not folder.exists():
        return None
    if not (folder / MANIFEST).is_file():
        if overwrite:
            return None
        raise StaleArtifact(f"{folder} exists but holds no {MANIFEST} (not written by this version of viq-mllm); "
                            f"choose another folder{hint or ' or remove it'}")
    try:
        found = read_manifest(folder)
    except DamagedArtifact:
        if overwrite:
            return None
        raise
    differences = _differences(found, spec)
    if not differences:
        return found
    if overwrite:
        log.warning("%s was made from other inputs; redoing it (%s)", folder, "; ".join(differences))
        return None
    raise StaleArtifact(f"{folder} was made from other inputs than asked now: " + "; ".join(differences)
                        + f"; write into another folder{hint or ' or remove it'}")


def verify(folder: Path, full: bool = False, kind: Optional[str] = None, hashed: tuple[str, ...] = ()) -> dict:
    """Check ``folder`` against its manifest; returns the manifest. Sizes always, sha256 with ``full`` (or only of
    the small files named in ``hashed``, read next); files the manifest does not list are reported too (nothing in
    a published folder is unaccounted for)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if kind is not None and manifest.get("kind") != kind:
        raise ArtifactError(f"{folder} holds {manifest.get('kind')!r}, expected {kind!r}")
    problems = []
    for name, record in sorted(manifest["files"].items()):
        path = folder / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif path.stat().st_size != record["bytes"]:
            problems.append(f"{name}: {path.stat().st_size} bytes, the manifest says {record['bytes']}")
        elif (full or name in hashed) and file_record(path)["sha256"] != record["sha256"]:
            problems.append(f"{name}: sha256 differs from the manifest (the file changed after it was written)")
    listed = set(manifest["files"]) | {MANIFEST}
    problems += [f"{name}: not in the manifest" for name in files_in(folder) if name not in listed]
    if problems:
        raise DamagedArtifact(f"{folder} is damaged: " + "; ".join(problems))
    return manifest


def find(folder: Path) -> list[Path]:
    """``folder`` and every folder below it that holds a manifest (published artifacts, not staging ones)."""
    folder = Path(folder)
    return sorted(p.parent for p in folder.rglob(MANIFEST) if not any(q.name.endswith(PARTIAL) for q in p.parents))


def steps(root: Path) -> list[Path]:
    """The published ``step_NNNNNNNN`` folders under ``root``, oldest first (no staging or set-aside ones)."""
    if not Path(root).is_dir():
        return []
    return sorted(p for p in Path(root).glob("step_*") if p.is_dir() and p.name[5:].isdigit())


def files_in(folder: Path) -> list[str]:
    """Every file below ``folder``, as sorted relative paths."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


class Staging:
    """The folder a job writes before it is published (``NAME.partial``), and the checksums gathered so far."""

    def __init__(self, final: Path, spec: Spec):
        self.final, self.spec = Path(final), spec
        self.path = self.final.with_name(self.final.name + PARTIAL)
        self.records: dict[str, dict] = {}

    @classmethod
    def begin(cls, final: Path, spec: Spec, fresh: bool = True) -> "Staging":
        """Start writing ``final``. ``fresh`` discards partial work left by an earlier run (a job that resumes
        unit by unit passes False and keeps it; see :class:`ShardedJob`). Sealing replaces ``final``, so a folder
        there that is not one of ours of the same kind (a user's model or images) is refused now, untouched."""
        stage = cls(final, spec)
        foreign = stage.final.exists() and any(stage.final.iterdir()) and kind_of(stage.final) != spec.kind
        if foreign:
            raise StaleArtifact(f"{stage.final} exists and is not a {spec.kind} folder written by viq-mllm (it "
                                "would be replaced); choose another folder, or remove it yourself")
        if fresh:
            shutil.rmtree(stage.path, ignore_errors=True)
        stage.path.mkdir(parents=True, exist_ok=True)
        return stage

    @contextmanager
    def open(self, name: str) -> Iterator[_HashingWriter]:
        """A binary file in the staging folder, hashed while written and renamed into place when closed."""
        path = self.path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as raw:
            writer = _HashingWriter(raw)
            yield writer
        os.replace(tmp, path)
        self.records[name] = {"bytes": writer.size, "sha256": writer.digest.hexdigest()}

    def write_json(self, name: str, data: dict) -> None:
        with self.open(name) as f:
            f.write(json.dumps(data, indent=1, sort_keys=True).encode())

    def seal(self, summary: Optional[dict] = None, records: Optional[dict[str, dict]] = None) -> dict:
        """Write the manifest and publish the folder atomically (replacing an older one); returns the manifest.
        ``records``: checksums gathered elsewhere (by other ranks); any other file is hashed now."""
        known = {**self.records, **(records or {})}
        files = {name: known.get(name) or file_record(self.path / name)
                 for name in files_in(self.path) if name != MANIFEST}
        manifest = {**asdict(self.spec), "versions": versions(), "files": files, "summary": summary or {}}
        write_atomic(self.path / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
        old = self.final.with_name(self.final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if self.final.exists():
            os.replace(self.final, old)
        os.replace(self.path, self.final)
        shutil.rmtree(old, ignore_errors=True)
        log.debug("published %s (%s, %d files)", self.final, self.spec.kind, len(files))
        return manifest


class ShardedJob:
    """Units of one artifact split over ranks, resumable unit by unit: rank ``r`` of ``world`` owns units
    ``r, r + world, ...``; a finished unit leaves ``.units/unit-NNNNN.json`` (its files' checksums and summary,
    under the job's :meth:`Spec.key`), so a rerun of the same job skips it and a job with other inputs redoes it.
    Rank 0 waits for every unit, then seals the staging folder with all records."""

    UNITS = ".units"

    def __init__(self, final: Path, spec: Spec, count: int, rank: int = 0, world: int = 1):
        self.stage = Staging.begin(final, spec, fresh=False)
        self.count, self.rank, self.world, self.key = count, rank, world, spec.key()
        (self.stage.path / self.UNITS).mkdir(exist_ok=True)

    @property
    def path(self) -> Path:
        return self.stage.path

    def _record_path(self, unit: int) -> Path:
        return self.stage.path / self.UNITS / f"unit-{unit:05d}.json"

    def record(self, unit: int) -> Optional[dict]:
        """The unit's record if it was finished by this same job and its files are whole, else None."""
        path = self._record_path(unit)
        if not path.is_file():
            return None
        record = json.loads(path.read_text())
        whole = all((self.path / n).is_file() and (self.path / n).stat().st_size == r["bytes"]
                    for n, r in record["files"].items())
        return record if record.get("key") == self.key and whole else None

    def todo(self) -> list[int]:
        """This rank's units that are not finished yet."""
        return [u for u in range(self.rank, self.count, self.world) if self.record(u) is None]

    def finish_unit(self, unit: int, files: dict[str, dict], summary: dict) -> None:
        """Mark ``unit`` finished; ``files``: the checksums of what it wrote (its files must be in place)."""
        data = json.dumps({"key": self.key, "files": files, "summary": summary}, sort_keys=True).encode()
        write_atomic(self._record_path(unit), data)

    def gather(self, timeout_s: float = 86400.0, poll_s: float = 1.0) -> list[dict]:
        """Every unit's record, waiting for the other ranks (on a shared filesystem) up to ``timeout_s``."""
        deadline = time.time() + timeout_s
        while True:
            records = [self.record(u) for u in range(self.count)]
            if all(r is not None for r in records):
                return records
            if time.time() > deadline:
                missing = [u for u, r in enumerate(records) if r is None]
                raise TimeoutError(f"{self.path}: units {missing[:10]} were not finished by the other ranks")
            time.sleep(poll_s)

    def seal(self, summary: dict, files: Optional[dict[str, dict]] = None) -> dict:
        """Publish: drop the unit records and, when ``files`` (the checksums of what the folder keeps, e.g. the
        units' own files) is given, every other file not written through :meth:`Staging.open`; then seal."""
        shutil.rmtree(self.path / self.UNITS)
        if files is not None:
            for name in files_in(self.path):
                if name not in files and name not in self.stage.records:
                    (self.path / name).unlink()
        return self.stage.seal(summary, files)
