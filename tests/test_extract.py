"""Offline code extraction: bad inputs reported and skipped, awkward ones encoded, kill -9 then rerun gives
byte-identical shards, shards refuse a different tokenizer."""

import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT
from PIL import Image

from viq_mllm.jobs.tokenize import run_tokenize
from viq_mllm.data.shards import CodeShards, FingerprintMismatch, read_shard
from viq_mllm.viq import ViQTokenizer


@pytest.fixture(scope="module")
def viq_dir(tmp_path_factory):
    return ViQTokenizer.from_config("tiny", preset="4k", seed=0).save_pretrained(tmp_path_factory.mktemp("v") / "viq")


def _save(image: Image.Image, path, **kw):
    image.save(path, **kw)
    return path


@pytest.fixture(scope="module")
def messy_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("messy")
    rng = np.random.default_rng(0)
    rgb = lambda h, w: Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))  # noqa: E731
    good = {
        "photo.jpg": _save(rgb(120, 160), root / "photo.jpg"),
        "rgba.png": _save(Image.new("RGBA", (64, 48), (255, 0, 0, 128)), root / "rgba.png"),
        "gray.png": _save(Image.new("L", (50, 70), 90), root / "gray.png"),
        "cmyk.jpg": _save(Image.new("CMYK", (64, 64), (10, 200, 30, 0)), root / "cmyk.jpg"),
        "deep16.png": _save(Image.fromarray(rng.integers(0, 65535, (40, 40), dtype=np.uint16)), root / "deep16.png"),
        "tiny.png": _save(rgb(3, 3), root / "tiny.png"),
        "panorama.png": _save(rgb(60, 2000), root / "panorama.png"),
        "sub/palette.gif": _save(Image.new("P", (32, 32)), (root / "sub").mkdir() or root / "sub" / "palette.gif"),
    }
    exif = Image.Exif()
    exif[0x0112] = 6
    good["rotated.jpg"] = _save(rgb(40, 100), root / "rotated.jpg", exif=exif.tobytes())
    (root / "photo.txt").write_text("A random photo.\nsecond line ignored\n")
    (root / "empty.png").write_bytes(b"")
    (root / "notes.png").write_text("this is not an image")
    buf = io.BytesIO()
    rgb(200, 200).save(buf, format="JPEG")
    (root / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    _save(Image.new("1", (3000, 3000)), root / "bomb.png")
    return root


def test_bad_inputs_are_reported_and_awkward_ones_encoded(viq_dir, messy_folder, tmp_path):
    manifest = run_tokenize(viq_dir, messy_folder, tmp_path / "out", shard_size=4, max_source_pixels=4_000_000,
                            show_progress=False, allow_no_text=True)
    report = json.loads((tmp_path / "out" / "report.json").read_text())["skipped"]
    reasons = {item["source"]: item["reason"] for item in report}
    assert set(reasons) == {"empty.png", "notes.png", "truncated.jpg", "bomb.png"}
    assert "file is empty" in reasons["empty.png"]
    assert "cannot decode image" in reasons["notes.png"] and "cannot decode image" in reasons["truncated.jpg"]
    assert "exceeds the limit of 4000000" in reasons["bomb.png"]
    assert manifest["inputs"] == 13 and manifest["skipped"] == 4 and manifest["samples"] == 9
    shards = CodeShards(tmp_path / "out", expected_fingerprint=ViQTokenizer.from_pretrained(viq_dir).fingerprint)
    samples = {s.source: s for s in shards}
    assert set(samples) == {"photo.jpg", "rgba.png", "gray.png", "cmyk.jpg", "deep16.png", "tiny.png",
                            "panorama.png", "sub/palette.gif", "rotated.jpg"}
    for sample in samples.values():
        rows, cols, four = sample.codes.shape
        assert rows % 2 == 0 and cols % 2 == 0 and four == 4 and sample.codes.dtype == np.uint16
        assert int(sample.codes.max()) < 4096
    assert samples["photo.jpg"].text == {"caption": "A random photo."}
    assert samples["rotated.jpg"].images[0].source_size == (100, 40)
    assert samples["panorama.png"].images[0].grid[1] > 4 * samples["panorama.png"].images[0].grid[0]
    # the codes are the tokenizer's own encode of the same file
    direct = ViQTokenizer.from_pretrained(viq_dir).encode([messy_folder / "photo.jpg"])[0]
    assert np.array_equal(samples["photo.jpg"].codes, direct.numpy())
    assert manifest["code_bytes"] * 20 < manifest["pixel_bytes"]


def test_shards_refuse_another_tokenizer(viq_dir, messy_folder, tmp_path):
    run_tokenize(viq_dir, messy_folder, tmp_path / "out", shard_size=50, show_progress=False, allow_no_text=True)
    other = ViQTokenizer.from_config("tiny", preset="4k", seed=1).fingerprint
    with pytest.raises(FingerprintMismatch) as err:
        CodeShards(tmp_path / "out", expected_fingerprint=other)
    mine = ViQTokenizer.from_pretrained(viq_dir).fingerprint
    assert mine in str(err.value) and other in str(err.value)


def test_webdataset_reads_our_shards(viq_dir, messy_folder, tmp_path):
    import webdataset as wds

    run_tokenize(viq_dir, messy_folder, tmp_path / "out", shard_size=50, show_progress=False, allow_no_text=True)
    ours = list(read_shard(tmp_path / "out" / "codes-00000.tar"))
    theirs = list(wds.WebDataset(str(tmp_path / "out" / "codes-00000.tar"), shardshuffle=False))
    assert [s["__key__"] for s in theirs] == [s.key for s in ours]
    assert np.array_equal(np.load(io.BytesIO(theirs[0]["0.codes.npy"])), ours[0].codes)


def test_jsonl_and_tar_inputs(viq_dir, tmp_path):
    import tarfile

    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "a.png")
    (tmp_path / "data.jsonl").write_text(json.dumps({"image": "a.png", "caption": "A square."}) + "\n" +
                                         json.dumps({"image": "missing.png", "caption": "Gone."}) + "\n")
    manifest = run_tokenize(viq_dir, tmp_path / "data.jsonl", tmp_path / "j", show_progress=False)
    assert manifest["samples"] == 1 and manifest["skipped"] == 1
    records = [json.loads(line) for line in (tmp_path / "data.jsonl").read_text().splitlines()]
    (tmp_path / "data.json").write_text(json.dumps(records))  # the same records as one JSON list
    run_tokenize(viq_dir, tmp_path / "data.json", tmp_path / "l", show_progress=False)
    (from_lines,), (from_list,) = CodeShards(tmp_path / "j"), CodeShards(tmp_path / "l")
    assert from_lines.text == from_list.text and np.array_equal(from_lines.codes, from_list.codes)
    with tarfile.open(tmp_path / "in.tar", "w") as tar:
        tar.add(tmp_path / "a.png", arcname="k1.png")
        info = tarfile.TarInfo("k1.txt")
        info.size = 9
        tar.addfile(info, io.BytesIO(b"A square."))
    manifest = run_tokenize(viq_dir, tmp_path / "in.tar", tmp_path / "t", show_progress=False)
    (sample,) = CodeShards(tmp_path / "t")
    assert sample.text == {"caption": "A square."}
    from viq_mllm.data.sources import TarMember

    # the recorded location reads back the raw image bytes (what the continuous baseline decodes)
    assert TarMember.from_locator(sample.images[0].path).read() == (tmp_path / "a.png").read_bytes()


def _many_images(root, count):
    rng = np.random.default_rng(1)
    root.mkdir()
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (96 + i, 128, 3), dtype=np.uint8)).save(root / f"img{i:03d}.png")
    return root


@pytest.mark.e2e
def test_kill_9_then_rerun_gives_identical_shards(viq_dir, tmp_path):
    images = _many_images(tmp_path / "images", 120)
    args = ["tokenize", "--viq", str(viq_dir), "--input", str(images), "--shard-size", "3", "--allow-no-text"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    subprocess.run([sys.executable, "-m", "viq_mllm", *args, "--out", str(tmp_path / "straight")], check=True,
                   env=env, cwd=ROOT, capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "viq_mllm", *args, "--out", str(killed)], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (tmp_path / "killed.partial" / ".units" / "unit-00003.json").exists() and time.time() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "manifest.json").exists(), "the job finished before it was killed"
    subprocess.run([sys.executable, "-m", "viq_mllm", *args, "--out", str(killed)], check=True, env=env, cwd=ROOT,
                   capture_output=True)
    straight = sorted(p.name for p in (tmp_path / "straight").glob("codes-*.tar"))
    assert straight == sorted(p.name for p in killed.glob("codes-*.tar")) and len(straight) == 40
    for name in straight:
        assert (tmp_path / "straight" / name).read_bytes() == (killed / name).read_bytes(), name
    assert not list(killed.glob("*.tmp")) and not (tmp_path / "killed.partial").exists()


@pytest.mark.e2e
def test_two_ranks_split_the_shards_and_agree_with_one(viq_dir, tmp_path):
    images = _many_images(tmp_path / "images", 10)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    outs = {}
    for nproc in ("0", "2"):
        outs[nproc] = tmp_path / f"n{nproc}"
        subprocess.run([sys.executable, "-m", "viq_mllm", "tokenize", "--viq", str(viq_dir), "--input", str(images),
                        "--out", str(outs[nproc]), "--shard-size", "3", "--workers", "1", "--nproc", nproc,
                        "--allow-no-text"],
                       check=True, env=env, cwd=ROOT, capture_output=True)
    one, two = (json.loads((outs[n] / "manifest.json").read_text()) for n in ("0", "2"))
    assert one["files"] == two["files"]
    assert two["summary"]["samples"] == 10 and len(two["summary"]["shards"]) == 4
