"""``viq-mllm bench tokenize``: images/s of the offline extraction job vs a one-image-at-a-time loop, and the
bytes of the codes vs the raw pixels and the source files.

For each image size: the tokenize job with 1 and 2 DataLoader workers (decode + preprocess in workers, packed
encode, shard writing) and a plain loop (``encode([image])`` per image, no shards), each timed from loading the
model to the last image, run twice in alternating order on the same PNG files (medians). Random weights of the ``tiny`` architecture.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from viq_mllm.bench.report import publish
from viq_mllm.console import Parser, markdown_table, plain
from viq_mllm.jobs.tokenize import run_tokenize
from viq_mllm.viq import ViQTokenizer


def make_images(folder: Path, count: int, size: int, seed: int = 0) -> list[Path]:
    """Photo-like PNGs (smooth gradients, shapes, noise) of about ``size``^2 pixels, mixed aspect ratios."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        aspect = (1.0, 4 / 3, 3 / 4, 16 / 9)[i % 4]
        w, h = int(size * aspect**0.5), int(size / aspect**0.5)
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([(xx * rng.uniform(0.2, 1)) % 256, (yy * rng.uniform(0.2, 1)) % 256,
                         ((xx + yy) * rng.uniform(0.1, 0.5)) % 256], -1)
        image = Image.fromarray(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(4):
            x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
            draw.ellipse([x, y, x + w // 5, y + h // 5], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        paths.append(folder / f"img{i:04d}.png")
        image.save(paths[-1])
    return paths


def one_by_one(viq_dir: Path, paths: list[Path]) -> float:
    began = time.perf_counter()  # model loading counted, as in the job
    model = ViQTokenizer.from_pretrained(viq_dir)
    for path in paths:
        model.encode([path])
    return len(paths) / (time.perf_counter() - began)


def job(viq_dir: Path, folder: Path, out: Path, workers: int, count: int) -> tuple[float, dict]:
    shutil.rmtree(out, ignore_errors=True)
    began = time.perf_counter()
    manifest = run_tokenize(viq_dir, folder, out, workers=workers, shard_size=max(count // 2, 1), show_progress=False,
                            allow_no_text=True)
    return count / (time.perf_counter() - began), manifest


def bench_size(root: Path, viq_dir: Path, size: int, count: int) -> dict:
    folder = root / f"images_{size}"
    paths = make_images(folder, count, size)
    rates: dict[str, list[float]] = {"loop": [], "job_1_worker": [], "job_2_workers": []}
    manifest = {}
    for _ in range(2):
        rates["loop"].append(one_by_one(viq_dir, paths))
        for workers, key in ((1, "job_1_worker"), (2, "job_2_workers")):
            rate, manifest = job(viq_dir, folder, root / f"out_{size}_{workers}", workers, count)
            rates[key].append(rate)
    row = {"size": size, "images": count, **{k: statistics.median(v) for k, v in rates.items()}}
    row.update(code_bytes=manifest["code_bytes"], pixel_bytes=manifest["pixel_bytes"],
               file_bytes=manifest["file_bytes"],
               shard_bytes=sum((root / f"out_{size}_2" / s["name"]).stat().st_size for s in manifest["shards"]))
    return row


def format_table(rows: list[dict]) -> str:
    return markdown_table(
        ["px", "images", "loop img/s", "job 1 worker img/s", "job 2 workers img/s", "codes / raw pixels",
         "codes / PNG files", "shards / PNG files"],
        [[str(r["size"]), str(r["images"]), f"{r['loop']:.1f}", f"{r['job_1_worker']:.1f}",
          f"{r['job_2_workers']:.1f}", f"1/{r['pixel_bytes'] / r['code_bytes']:.0f}",
          f"1/{r['file_bytes'] / r['code_bytes']:.0f}", f"1/{r['file_bytes'] / r['shard_bytes']:.1f}"] for r in rows])


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="viq-mllm bench tokenize", description=plain(__doc__))
    parser.add_argument("--sizes", nargs="+", type=int, default=[256, 512])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--out", default="runs/bench_tokenize")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for size in args.sizes:
            viq_dir = ViQTokenizer.from_config("tiny", image_base=size, max_pixels=4 * size * size).save_pretrained(
                root / f"viq_{size}")
            rows.append(bench_size(root, viq_dir, size, args.images))
    publish(args.out, "bench_tokenize.json", {"rows": rows}, format_table(rows))
    return 0
