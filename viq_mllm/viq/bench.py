"""``viq-mllm bench encode``: ViQ encode throughput and peak memory, packed vs one image at a time.

Each (architecture, image size, mode) runs in a fresh process, so its peak resident memory (weights included)
is its own. Images have mixed aspect ratios at about ``size**2`` pixels; random weights (speed does not depend
on them). Packed = one ``encode(images)`` call (one pack); one-by-one = ``encode([image])`` per image.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ASPECTS = (1.0, 4 / 3, 3 / 4, 16 / 9, 9 / 16, 1.0, 2.0, 0.5)


def _images(size: int, count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(count):
        aspect = ASPECTS[i % len(ASPECTS)]
        h, w = int(size / aspect**0.5), int(size * aspect**0.5)
        out.append(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    return out


def measure(arch: str, size: int, mode: str, count: int) -> dict:
    """Runs inside the worker process."""
    import torch

    from viq_mllm.viq import ViQTokenizer

    torch.manual_seed(0)
    tok = ViQTokenizer.from_config(arch, image_base=size, max_pixels=4 * size * size)
    images = _images(size, count)
    warm = images[:1]
    tok.encode(warm)
    began = time.perf_counter()
    if mode == "packed":
        codes = tok.encode(images, max_tokens=10**9)
    else:
        codes = [tok.encode([image])[0] for image in images]
    elapsed = time.perf_counter() - began
    patches = sum(c.shape[0] * c.shape[1] for c in codes)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"arch": arch, "size": size, "mode": mode, "images": count, "patches": patches,
            "images_per_s": count / elapsed, "seconds": elapsed, "peak_rss_mb": peak_mb,
            "params_m": sum(p.numel() for p in tok.parameters()) / 1e6, "threads": torch.get_num_threads()}


def _run_worker(arch: str, size: int, mode: str, count: int) -> dict:
    cmd = [sys.executable, "-m", "viq_mllm.viq.bench", "--worker", arch, str(size), mode, str(count)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def format_table(rows: list[dict]) -> str:
    lines = ["| arch | params | px | images | packed img/s | one-by-one img/s | packed / one | peak MB packed | "
             "peak MB one |", "|---|---|---|---|---|---|---|---|---|"]
    by_key = {(r["arch"], r["size"], r["mode"]): r for r in rows}
    for arch, size in dict.fromkeys((r["arch"], r["size"]) for r in rows):
        p, o = by_key[(arch, size, "packed")], by_key[(arch, size, "single")]
        lines.append(f"| {arch} | {p['params_m']:.0f}M | {size} | {p['images']} | {p['images_per_s']:.2f} | "
                     f"{o['images_per_s']:.2f} | {p['images_per_s'] / o['images_per_s']:.2f}x | "
                     f"{p['peak_rss_mb']:.0f} | {o['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="viq-mllm bench encode", description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", nargs="+", default=["tiny", "so400m"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[256, 512])
    parser.add_argument("--images", type=int, default=16, help="images per measurement (so400m uses a quarter)")
    parser.add_argument("--out", default="runs/bench_encode")
    args = parser.parse_args(argv)
    rows = []
    for arch in args.archs:
        count = args.images if arch == "tiny" else max(args.images // 4, 2)
        for size in args.sizes:
            for mode in ("packed", "single"):
                rows.append(_run_worker(arch, size, mode, count))
                print(f"  {arch} {size}px {mode}: {rows[-1]['images_per_s']:.2f} img/s", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_encode.json").write_text(json.dumps({"rows": rows}, indent=2))
    print(format_table(rows))
    print(f"wrote {out / 'bench_encode.json'}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--worker":
        print(json.dumps(measure(sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5]))))
    else:
        sys.exit(main())
