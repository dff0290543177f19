"""``viq-mllm tokenize``: offline ViQ code extraction into shards, resumable, deterministic, never stopped by
a bad image.

Inputs (``sources.py``) are numbered in a fixed order and cut into shards of ``shard_size``; rank ``r`` of
``world`` processes shards ``r, r + world, ...``. Images are decoded and preprocessed in DataLoader workers,
encoded in packs of up to ``max_tokens`` patches, and each shard is written atomically (``shards.py``). A rerun
skips shards whose completion record matches the tar, and rebuilds the others from scratch: after a crash or
``kill -9`` the result is byte-identical to an uninterrupted run.

Unreadable inputs (missing, empty, truncated, not an image, over the pixel limit) are skipped and listed with
their reason in ``report.json``; the summary line counts them.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from torch.utils.data import DataLoader, Dataset

from viq_mllm.console import progress
from viq_mllm.data.layout import placeholder_problem
from viq_mllm.data.shards import (MANIFEST, REPORT, SHARD_FORMAT, SHARD_NAME, CodeImage, CodeSample, sha256_of,
                                  write_shard)
from viq_mllm.data.sources import SourceRecord, TarMember, list_sources
from viq_mllm.viq import ViQTokenizer
from viq_mllm.viq.preprocess import ImageInputError, Preprocessed, load_image, preprocess


@dataclass
class Decoded:
    record: SourceRecord
    items: list[Preprocessed]  # one per image of the record
    error: Optional[str]
    file_bytes: int


class _Decode(Dataset):
    def __init__(self, records: list[SourceRecord], base: int, max_pixels: int, max_source_pixels: int):
        self.records, self.base, self.max_pixels, self.max_source_pixels = records, base, max_pixels, max_source_pixels

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Decoded:
        record = self.records[i]
        problem = record.problem or _placeholder_problem(record)
        if problem is not None:
            return Decoded(record, [], problem, 0)
        items, size = [], 0
        for image in record.images:
            try:
                raw = image.read() if isinstance(image, TarMember) else image
                size += len(raw) if isinstance(raw, bytes) else (raw.stat().st_size if raw.is_file() else 0)
                items.append(preprocess(load_image(raw, self.max_source_pixels), self.base, self.max_pixels))
            except ImageInputError as err:
                return Decoded(record, [], _named(str(err), image, record), 0)
            except Exception as err:  # an unforeseen decoder failure must not stop a 100k-image job
                return Decoded(record, [], _named(f"{image}: {type(err).__name__}: {err}", image, record), 0)
        return Decoded(record, items, None, size)


def _placeholder_problem(record: SourceRecord) -> Optional[str]:
    turns = record.text.get("conversations")
    problem = placeholder_problem(turns, len(record.images)) if turns else None
    return None if problem is None else f"{record.source}: {problem}"


def _named(reason: str, image, record: SourceRecord) -> str:
    """The reason with the image named as the report reads best: the record's source, and which of its images."""
    if len(record.images) == 1:
        return reason.replace(str(image), record.source)
    return f"{record.source}: " + reason.replace(f"{image}: ", f"image {record.images.index(image)} ({image}): ")


def shard_ranges(count: int, shard_size: int) -> list[range]:
    return [range(s, min(s + shard_size, count)) for s in range(0, count, shard_size)]


def _shard_done(out: Path, shard: int) -> bool:
    record_path = out / SHARD_NAME.format(shard).replace(".tar", ".json")
    tar_path = out / SHARD_NAME.format(shard)
    if not (record_path.is_file() and tar_path.is_file()):
        return False
    record = json.loads(record_path.read_text())
    return record.get("format") == SHARD_FORMAT and record["sha256"] == sha256_of(tar_path)


def _encode_shard(model: ViQTokenizer, records: list[SourceRecord], workers: int, max_tokens: int,
                  max_source_pixels: int, progress) -> tuple[list[CodeSample], list[dict], dict]:
    cfg = model.config
    loader = DataLoader(_Decode(records, cfg.image_base, cfg.max_pixels, max_source_pixels), batch_size=None,
                        num_workers=workers, collate_fn=lambda x: x)
    samples, skipped, stats = [], [], {"code_bytes": 0, "pixel_bytes": 0, "file_bytes": 0}
    pending: list[Decoded] = []

    def flush():
        codes = iter(model.encode_preprocessed([item for d in pending for item in d.items], max_tokens))
        for decoded in pending:
            images = []
            for item, image in zip(decoded.items, decoded.record.images):
                array = next(codes).numpy().astype(np.uint16)
                path = image.locator() if isinstance(image, TarMember) else str(Path(image).resolve())
                images.append(CodeImage(array, item.source_size, path))
                stats["code_bytes"] += array.nbytes
                stats["pixel_bytes"] += item.pixels[0].numel() * 3
            samples.append(CodeSample(decoded.record.key, images, decoded.record.source, decoded.record.text))
            stats["file_bytes"] += decoded.file_bytes
        progress(len(pending))
        pending.clear()

    for decoded in loader:
        if decoded.error is not None:
            skipped.append({"key": decoded.record.key, "source": decoded.record.source, "reason": decoded.error})
            progress(1)
            continue
        pending.append(decoded)
        if sum(item.grid[0] * item.grid[1] for d in pending for item in d.items) >= max_tokens:
            flush()
    if pending:
        flush()
    return samples, skipped, stats


def run_tokenize(viq_dir: str | Path, src: str | Path, out: str | Path, workers: int = 0, shard_size: int = 1000,
                 max_tokens: int = 2048, max_source_pixels: int = 64_000_000, rank: int = 0, world: int = 1,
                 show_progress: bool = True, image_root: str | Path | None = None) -> dict:
    """Tokenize ``src`` (``sources.py``; LLaVA-style paths relative to ``image_root``) into ``out``; returns the
    summary (the manifest when rank 0 finishes last)."""
    model = ViQTokenizer.from_pretrained(viq_dir)
    records = list_sources(src, image_root)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ranges = shard_ranges(len(records), shard_size)
    mine = [s for s in range(len(ranges)) if s % world == rank and not _shard_done(out, s)]
    todo = sum(len(ranges[s]) for s in mine)
    bar = _progress_bar(todo, show_progress and rank == 0)
    began = time.perf_counter()
    for shard in mine:
        samples, skipped, stats = _encode_shard(model, [records[i] for i in ranges[shard]], workers, max_tokens,
                                                max_source_pixels, bar.update if bar else (lambda n: None))
        info = write_shard(out / SHARD_NAME.format(shard), samples)
        info.update(name=SHARD_NAME.format(shard), inputs=len(ranges[shard]), skipped=skipped, **stats)
        _write_json(out / SHARD_NAME.format(shard).replace(".tar", ".json"), info)
    if bar:
        bar.close()
    elapsed = time.perf_counter() - began
    if rank != 0:
        return {}
    _wait_for_all(out, len(ranges))
    return _write_manifest(out, model, len(records), len(ranges), todo / elapsed if elapsed > 0 else 0.0)


def _progress_bar(total: int, show: bool):
    return progress(total, desc="tokenize", unit="sample") if show else None


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _wait_for_all(out: Path, shards: int, timeout_s: float = 86400) -> None:
    deadline = time.time() + timeout_s
    while not all((out / SHARD_NAME.format(s).replace(".tar", ".json")).is_file() for s in range(shards)):
        if time.time() > deadline:
            raise TimeoutError(f"{out}: other ranks did not finish their shards")
        time.sleep(1.0)


def _write_manifest(out: Path, model: ViQTokenizer, inputs: int, shards: int, samples_per_s: float) -> dict:
    records = [json.loads((out / SHARD_NAME.format(s).replace(".tar", ".json")).read_text()) for s in range(shards)]
    skipped = [item for r in records for item in r.pop("skipped")]
    totals = {k: sum(r[k] for r in records) for k in ("samples", "code_bytes", "pixel_bytes", "file_bytes")}
    manifest = {
        "format": SHARD_FORMAT,
        "viq_fingerprint": model.fingerprint,
        "viq_config": json.loads(model.config.to_json()),
        "codebook_size": model.head.embedder.fsq.codebook_size,
        "inputs": inputs,
        "skipped": len(skipped),
        **totals,
        "shards": [{k: r[k] for k in ("name", "samples", "sha256", "bytes", "inputs")} for r in records],
    }
    _write_json(out / MANIFEST, manifest)
    _write_json(out / REPORT, {"skipped": skipped})
    reasons: dict[str, int] = {}
    for item in skipped:
        kind = item["reason"].split(": ", 1)[-1].split(" (")[0]
        reasons[kind] = reasons.get(kind, 0) + 1
    size = (f"codes are 1/{totals['pixel_bytes'] / totals['code_bytes']:.0f} of the raw pixels"
            if totals["code_bytes"] else "no images")
    print(f"tokenized {totals['samples']} of {inputs} samples into {shards} shards in {out}; skipped "
          f"{len(skipped)} {reasons if reasons else ''}; {samples_per_s:.1f} samples/s; {size} (see {REPORT})")
    return manifest
