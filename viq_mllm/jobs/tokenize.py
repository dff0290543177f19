"""``viq-mllm tokenize``: offline ViQ code extraction into shards, resumable, deterministic, never stopped by
a bad image.

Inputs (:mod:`viq_mllm.data.sources`) are numbered in a fixed order and cut into shards of ``shard_size``; rank ``r`` of
``world`` processes shards ``r, r + world, ...``. Images are decoded and preprocessed in DataLoader workers,
encoded in packs of up to ``max_tokens`` patches. The output folder is an artifact written unit by unit
(:class:`viq_mllm.artifact.ShardedJob`, one unit per shard): a rerun keeps the shards this same job finished and
rebuilds the others, so after a crash or ``kill -9`` the result is byte-identical to an uninterrupted run; a rerun
with another tokenizer, other inputs or options is refused (or, with ``overwrite``, redone from scratch).

Unreadable inputs (missing, empty, truncated, not an image, over the pixel limit) and samples with no text to
train on are skipped and listed with their reason in ``report.json``; the summary line counts them.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from torch.utils.data import DataLoader, Dataset

from viq_mllm import artifact
from viq_mllm.console import progress
from viq_mllm.data.layout import placeholder_problem
from viq_mllm.data.shards import KIND, REPORT, SHARD_FORMAT, SHARD_NAME, CodeImage, CodeSample, write_shard
from viq_mllm.data.sources import SourceRecord, TarMember, list_sources, sources_fingerprint
from viq_mllm.viq import ViQTokenizer
from viq_mllm.viq.preprocess import ImageInputError, Preprocessed, load_image, preprocess

log = logging.getLogger(__name__)


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
                 show_progress: bool = True, image_root: str | Path | None = None, allow_no_text: bool = False,
                 overwrite: bool = False) -> dict:
    """Tokenize ``src`` (:mod:`viq_mllm.data.sources`; LLaVA-style paths relative to ``image_root``) into ``out``;
    returns the summary (rank 0; ``{}`` on the others).

    ``out`` made by this same job is reused as it is; made from other inputs or options it is refused (both values
    named), or redone with ``overwrite``. Samples without a caption or conversation are skipped and reported
    unless ``allow_no_text`` (codes for reconstruction, or text joined later)."""
    model = ViQTokenizer.from_pretrained(viq_dir)
    records = list_sources(src, image_root)
    if not allow_no_text:
        records = [_require_text(record) for record in records]
    spec = artifact.Spec(KIND, SHARD_FORMAT,
                         made_from={"viq_fingerprint": model.fingerprint, "sources": sources_fingerprint(records)},
                         options={"shard_size": shard_size, "max_tokens": max_tokens,
                                  "max_source_pixels": max_source_pixels, "allow_no_text": allow_no_text})
    found = artifact.check_reuse(Path(out), spec, overwrite, hint=" (or pass --overwrite to redo it)")
    if found is not None:
        log.info("%s is up to date (same tokenizer, inputs and options): nothing to do", out)
        return found["summary"]
    ranges = shard_ranges(len(records), shard_size)
    job = artifact.ShardedJob(Path(out), spec, len(ranges), rank, world)
    mine = job.todo()
    todo = sum(len(ranges[s]) for s in mine)
    bar = _progress_bar(todo, show_progress and rank == 0)
    began = time.perf_counter()
    for shard in mine:
        samples, skipped, stats = _encode_shard(model, [records[i] for i in ranges[shard]], workers, max_tokens,
                                                max_source_pixels, bar.update if bar else (lambda n: None))
        name = SHARD_NAME.format(shard)
        with job.stage.open(name) as f:
            write_shard(f, samples)
        job.finish_unit(shard, {name: job.stage.records[name]},
                        dict(name=name, samples=len(samples), inputs=len(ranges[shard]), skipped=skipped, **stats))
    if bar:
        bar.close()
    elapsed = time.perf_counter() - began
    if rank != 0:
        return {}
    units = job.gather()
    summary, skipped = _summary(model, [u["summary"] for u in units], len(records))
    job.stage.write_json(REPORT, {"skipped": skipped})
    job.seal(summary, {name: r for unit in units for name, r in unit["files"].items()})
    _say_done(out, summary, skipped, todo / elapsed if elapsed > 0 else 0.0)
    return summary


def _require_text(record: SourceRecord) -> SourceRecord:
    """The record, marked as a problem when it has images but no caption or conversation to train on."""
    if record.problem is None and not record.text:
        record.problem = (f"{record.source}: no caption or conversations (a sidecar .txt, 'caption' or "
                          "'conversations'); pass --allow-no-text to keep images without text")
    return record


def _progress_bar(total: int, show: bool):
    return progress(total, desc="tokenize", unit="sample") if show else None


def _summary(model: ViQTokenizer, units: list[dict], inputs: int) -> tuple[dict, list[dict]]:
    """The shard set's summary (counts, sizes, per-shard records) and the skipped inputs, from the units'."""
    skipped = [item for unit in units for item in unit["skipped"]]
    totals = {k: sum(u[k] for u in units) for k in ("samples", "code_bytes", "pixel_bytes", "file_bytes")}
    summary = {
        "viq_fingerprint": model.fingerprint,
        "viq_config": json.loads(model.config.to_json()),
        "codebook_size": model.head.embedder.fsq.codebook_size,
        "inputs": inputs,
        "skipped": len(skipped),
        **totals,
        "shards": [{k: u[k] for k in ("name", "samples", "inputs")} for u in units],
    }
    return summary, skipped


def _say_done(out: str | Path, summary: dict, skipped: list[dict], samples_per_s: float) -> None:
    reasons: dict[str, int] = {}
    for item in skipped:
        kind = item["reason"].split(": ", 1)[-1].split(" (")[0].split(";")[0]
        reasons[kind] = reasons.get(kind, 0) + 1
    size = (f"codes are 1/{summary['pixel_bytes'] / summary['code_bytes']:.0f} of the raw pixels"
            if summary["code_bytes"] else "no images")
    log.info("tokenized %d of %d samples into %d shards in %s; skipped %d %s; %.1f samples/s; %s (see %s)",
             summary["samples"], summary["inputs"], len(summary["shards"]), out, len(skipped),
             reasons if reasons else "", samples_per_s, size, REPORT)
