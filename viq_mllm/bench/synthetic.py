"""Synthetic captioned shapes for tests and benchmarks: images -> tiny ViQ tokenizer -> code shards ->
SentencePiece -> extended vocabulary. Real data is the demo's job; this is small, fast and deterministic."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from viq_mllm import artifact
from viq_mllm.jobs.tokenize import run_tokenize
from viq_mllm.data.shards import KIND, SHARD_FORMAT, SHARD_NAME, CodeImage, CodeSample, write_shard
from viq_mllm.viq import ViQTokenizer
from viq_mllm.vocab.extend import extend_vocab
from viq_mllm.vocab.text_tokenizers import train_sentencepiece

COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}


def make_captioned_shapes(folder: Path, images: int = 40, seed: int = 0) -> list[str]:
    """``imgNNN.png`` (coloured squares and circles, 96-160 px wide) with sidecar captions ``imgNNN.txt``."""
    import numpy as np
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    captions = []
    for i in range(images):
        colour, shape = list(COLORS)[i % 4], ("square", "circle")[(i // 4) % 2]
        image = Image.new("RGB", (96 + 32 * (i % 3), 96), (255, 255, 255))
        x = int(rng.integers(5, 30))
        (ImageDraw.Draw(image).rectangle if shape == "square" else ImageDraw.Draw(image).ellipse)(
            [x, x, x + 50, x + 50], fill=COLORS[colour])
        image.save(folder / f"img{i:03d}.png")
        captions.append(f"A {colour} {shape}.")
        (folder / f"img{i:03d}.txt").write_text(captions[-1])
    return captions


def make_vlm_assets(root: Path, images: int = 40, seed: int = 0) -> dict:
    """Synthetic captioned shapes -> tiny ViQ tokenizer -> code shards -> SentencePiece -> extended vocab."""

    folder = root / "images"
    captions = make_captioned_shapes(folder, images, seed)
    viq = ViQTokenizer.from_config("tiny", preset="2k", seed=seed).save_pretrained(root / "viq")
    run_tokenize(viq, folder, root / "shards", shard_size=16, show_progress=False)
    sp = train_sentencepiece(captions * 10, root / "text.model", 300)
    extend_vocab(sp, viq, root / "vocab")
    return {"root": root, "viq": root / "viq", "shards": root / "shards", "vocab": root / "vocab", "sp": sp}


def make_code_shards(root: Path, samples: int, grid: tuple[int, int] = (24, 24), shard_size: int = 1000,
                     seed: int = 0) -> dict:
    """``samples`` random code grids (a 384 px image's 24 x 24 patches by default) with short captions, written as
    a code-shard set of the tiny 2k tokenizer, and its extended vocabulary: data at scale without encoding any
    image (for benchmarks of the data path)."""
    viq = ViQTokenizer.from_config("tiny", preset="2k", seed=seed)
    viq_dir = viq.save_pretrained(root / "viq")
    rng = np.random.default_rng(seed)
    words = [f"{c} {s}" for c in COLORS for s in ("square", "circle", "star", "cloud")]
    made_from = {"viq_fingerprint": viq.fingerprint, "sources": f"random codes, seed {seed}, {samples} x {grid}"}
    stage = artifact.Staging.begin(root / "shards", artifact.Spec(KIND, SHARD_FORMAT, made_from,
                                                                  {"shard_size": shard_size}))
    records = []
    for shard, first in enumerate(range(0, samples, shard_size)):
        batch = [CodeSample(f"s{i:09d}", [CodeImage(rng.integers(0, 2304, (*grid, 4), dtype=np.uint16), (384, 384))],
                            "synthetic", {"caption": f"A {words[i % len(words)]} number {i % 97}."})
                 for i in range(first, min(first + shard_size, samples))]
        with stage.open(SHARD_NAME.format(shard)) as f:
            write_shard(f, batch)
        records.append({"name": SHARD_NAME.format(shard), "samples": len(batch), "inputs": len(batch)})
    stage.seal({"viq_fingerprint": viq.fingerprint, "inputs": samples, "samples": samples, "skipped": 0,
                "shards": records})
    sp = train_sentencepiece([f"A {w} number {n}." for w in words for n in range(97)], root / "text.model", 400)
    extend_vocab(sp, viq_dir, root / "vocab")
    return {"root": root, "viq": viq_dir, "shards": root / "shards", "vocab": root / "vocab"}
