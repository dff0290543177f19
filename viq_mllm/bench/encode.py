"""``viq-mllm bench encode``: ViQ encode throughput and peak memory, packed vs one image at a time.

Each (architecture, image size) runs in a fresh process where the two modes alternate round by round (medians
reported), so machine noise hits both alike; peak resident memory (weights included) is sampled per mode, and on
CUDA the peak of allocated GPU memory too. Images have mixed aspect ratios at about ``size**2`` pixels; random
weights (speed does not depend on them). Packed = one ``encode(images)`` call (packs of up to 2048 patches, the
default); one-by-one = ``encode([image])`` per image. On CPU so400m runs a quarter of the images, one round.
"""

from __future__ import annotations

import statistics
import sys
import threading
import time

import numpy as np

from viq_mllm import launch
from viq_mllm.bench.report import publish, write_json
from viq_mllm.console import Parser, markdown_table, plain

ASPECTS = (1.0, 4 / 3, 3 / 4, 16 / 9, 9 / 16, 1.0, 2.0, 0.5)


def _images(size: int, count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(count):
        aspect = ASPECTS[i % len(ASPECTS)]
        h, w = int(size / aspect**0.5), int(size * aspect**0.5)
        out.append(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    return out


class PeakRss:
    """Samples this process's resident memory every 2 ms in a thread; ``peak`` is the max seen (bytes)."""

    def __init__(self):
        import psutil

        self._proc, self.peak, self._stop = psutil.Process(), 0, threading.Event()

    def __enter__(self):
        self.base = self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def measure(arch: str, size: int, count: int, rounds: int) -> list[dict]:
    """Packed and one-by-one alternate round by round in this one process; medians are reported."""
    import torch  # here: only the measuring child imports torch (the parent starts one child per cell)

    from viq_mllm.viq import ViQTokenizer  # noqa: E402 (with torch, for the same reason)

    torch.manual_seed(0)
    tok = ViQTokenizer.from_config(arch, image_base=size, max_pixels=4 * size * size)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok.to(device)  # codes come back to the CPU inside encode, which synchronises the device
    images = _images(size, count)
    modes = {
        "packed": lambda: tok.encode(images),
        "single": lambda: [tok.encode([image])[0] for image in images],
    }
    tok.encode(images[:2])
    times: dict[str, list[float]] = {m: [] for m in modes}
    peaks: dict[str, int] = {m: 0 for m in modes}
    gpu_peaks: dict[str, int] = {m: 0 for m in modes}
    for _ in range(rounds):
        for mode, run in modes.items():
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            with PeakRss() as rss:
                began = time.perf_counter()
                codes = run()
                times[mode].append(time.perf_counter() - began)
            peaks[mode] = max(peaks[mode], rss.peak)
            if device == "cuda":
                gpu_peaks[mode] = max(gpu_peaks[mode], torch.cuda.max_memory_allocated())
    patches = sum(c.shape[0] * c.shape[1] for c in codes)
    params = sum(p.numel() for p in tok.parameters()) / 1e6
    return [{"arch": arch, "size": size, "mode": mode, "images": count, "patches": patches,
             "images_per_s": count / statistics.median(times[mode]), "rounds": rounds,
             "peak_rss_mb": peaks[mode] / 2**20, "peak_gpu_mb": gpu_peaks[mode] / 2**20, "params_m": params,
             "threads": torch.get_num_threads(),
             "device": torch.cuda.get_device_name() if device == "cuda" else "cpu"}
            for mode in modes]


def _run_worker(arch: str, size: int, count: int, rounds: int) -> list[dict]:
    """A fresh process per (arch, size), so one measurement's memory does not inflate the next."""
    return launch.call("viq_mllm.bench.encode:measure", arch, size, count, rounds)


def format_table(rows: list[dict]) -> str:
    by_key = {(r["arch"], r["size"], r["mode"]): r for r in rows}
    peaks = ["peak_rss_mb"] + (["peak_gpu_mb"] if any(r["peak_gpu_mb"] for r in rows) else [])
    table = []
    for arch, size in dict.fromkeys((r["arch"], r["size"]) for r in rows):
        p, o = by_key[(arch, size, "packed")], by_key[(arch, size, "single")]
        table.append([arch, f"{p['params_m']:.0f}M", str(size), str(p["images"]), f"{p['images_per_s']:.2f}",
                      f"{o['images_per_s']:.2f}", f"{p['images_per_s'] / o['images_per_s']:.2f}x"]
                     + [f"{r[key]:.0f}" for key in peaks for r in (p, o)])
    names = {"peak_rss_mb": "peak RSS MB", "peak_gpu_mb": "peak GPU MB"}
    return markdown_table(["arch", "params", "px", "images", "packed img/s", "one-by-one img/s", "packed / one"]
                          + [f"{names[key]} {mode}" for key in peaks for mode in ("packed", "one")], table)


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="viq-mllm bench encode", description=plain(__doc__))
    parser.add_argument("--archs", nargs="+", default=["tiny", "so400m"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[256, 512])
    parser.add_argument("--images", type=int, default=16,
                        help="images per measurement (so400m on CPU uses a quarter)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (so400m on CPU: 1)")
    parser.add_argument("--out", default="runs/bench_encode")
    args = parser.parse_args(argv)
    import torch

    rows = []
    for arch in args.archs:
        full = arch == "tiny" or torch.cuda.is_available()
        count = args.images if full else max(args.images // 4, 2)
        for size in args.sizes:
            rows.extend(_run_worker(arch, size, count, args.rounds if full else 1))
            print(f"  {arch} {size}px: " + ", ".join(f"{r['mode']} {r['images_per_s']:.2f} img/s" for r in rows[-2:]),
                  flush=True)
            write_json(args.out, "bench_encode.json", {"rows": rows})  # a run stopped part-way keeps these
    publish(args.out, "bench_encode.json", {"rows": rows}, format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
