"""Shared helpers: run the real ``viq-mllm`` command in a subprocess (torchrun for N > 1) and read its metrics."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "tiny_text_cpu.yaml")
QUIET = ["log.wandb=disabled", "log.tensorboard=false", "log.progress=false"]


def viq_mllm(*args: str, timeout: int = 300, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "viq_mllm", *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"viq-mllm {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def train_tiny(run_dir: Path, *overrides: str, nproc: int = 0) -> list[dict]:
    from viq_mllm.metrics import read_metrics

    launch = ["--nproc", str(nproc)] if nproc else []
    viq_mllm("train", TINY, *launch, f"run.dir={run_dir}", *QUIET, *overrides)
    return read_metrics(run_dir)


@pytest.fixture
def tiny(tmp_path):
    return lambda name, *overrides, nproc=0: train_tiny(tmp_path / name, *overrides, nproc=nproc)


VLM = str(ROOT / "recipes" / "vlm_tiny_pretrain.yaml")
COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}


def make_vlm_assets(root: Path, images: int = 40, seed: int = 0) -> dict:
    """Synthetic captioned shapes -> tiny ViQ tokenizer -> code shards -> SentencePiece -> extended vocab."""
    import numpy as np
    from PIL import Image, ImageDraw

    from viq_mllm.data.extract import run_tokenize
    from viq_mllm.viq import ViQTokenizer
    from viq_mllm.vocab.extend import extend_vocab
    from viq_mllm.vocab.text_tokenizers import train_sentencepiece

    folder = root / "images"
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
    viq = ViQTokenizer.from_config("tiny", preset="2k", seed=seed).save_pretrained(root / "viq")
    run_tokenize(viq, folder, root / "shards", shard_size=16, show_progress=False)
    sp = train_sentencepiece(captions * 10, root / "text.model", 300)
    extend_vocab(sp, viq, root / "vocab")
    return {"root": root, "viq": root / "viq", "shards": root / "shards", "vocab": root / "vocab", "sp": sp}


def vlm_overrides(assets: dict) -> list[str]:
    return [f"data.sources=[{{path: {assets['shards']}}}]", f"data.vocab={assets['vocab']}",
            f"model.visual.viq={assets['viq']}"]


@pytest.fixture(scope="session")
def vlm_assets(tmp_path_factory):
    return make_vlm_assets(tmp_path_factory.mktemp("vlm_assets"))


def train_vlm_cli(run_dir: Path, assets: dict, *overrides: str, nproc: int = 0) -> list[dict]:
    from viq_mllm.metrics import read_metrics

    launch = ["--nproc", str(nproc)] if nproc else []
    viq_mllm("train", VLM, *launch, f"run.dir={run_dir}", *QUIET, *vlm_overrides(assets), *overrides)
    return read_metrics(run_dir)
