"""The fault suite: every ordinary mistake and damage docs/reliability.md lists, each asserting the refusal (with
what it names) or the correct result. Nothing here may pass silently: a fault that is not caught fails its test.

The kill -9 cases live beside the jobs they kill (test_extract, test_prepare, test_resume); the group-16 export fed
as a plain LM in test_vlm_hf."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
from conftest import QUIET, TINY, viq_mllm
from PIL import Image

from viq_mllm import artifact
from viq_mllm.jobs.tokenize import run_tokenize
from viq_mllm.viq import ViQTokenizer


def digests(folder) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Six captioned images and one without a caption."""
    root = tmp_path_factory.mktemp("faults") / "images"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(7):
        Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)).save(root / f"img{i}.png")
        if i != 6:
            (root / f"img{i}.txt").write_text(f"Picture number {i}.")
    return root


@pytest.fixture(scope="module")
def two_tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("viq")
    return [ViQTokenizer.from_config("tiny", preset="2k", seed=s).save_pretrained(root / f"viq{s}") for s in (0, 1)]


def tokenize(viq, images, out, **kw):
    return run_tokenize(viq, images, out, shard_size=3, show_progress=False, **kw)


def test_a_rerun_with_another_tokenizer_is_refused_or_redone_as_a_fresh_run(images, two_tokenizers, tmp_path):
    """The old behaviour kept the old shards and stamped the new fingerprint on them."""
    first, second = two_tokenizers
    tokenize(first, images, tmp_path / "out")
    with pytest.raises(artifact.StaleArtifact) as refused:
        tokenize(second, images, tmp_path / "out")
    fingerprints = [ViQTokenizer.from_pretrained(v).fingerprint for v in (first, second)]
    assert all(f in str(refused.value) for f in fingerprints) and "made_from.viq_fingerprint" in str(refused.value)
    tokenize(second, images, tmp_path / "out", overwrite=True)
    tokenize(second, images, tmp_path / "fresh")
    assert digests(tmp_path / "out") == digests(tmp_path / "fresh")


@pytest.mark.parametrize("change", ["input", "max_source_pixels"])
def test_a_rerun_with_other_inputs_or_options_is_refused(images, two_tokenizers, tmp_path, change):
    tokenize(two_tokenizers[0], images, tmp_path / "out")
    if change == "input":
        other = tmp_path / "more"
        shutil.copytree(images, other)
        Image.new("RGB", (32, 32)).save(other / "extra.png")
        (other / "extra.txt").write_text("One more.")
        kwargs, named = {"src": other}, "made_from.sources"
    else:
        kwargs, named = {"src": images, "max_source_pixels": 1000}, "options.max_source_pixels: the folder has"
    with pytest.raises(artifact.StaleArtifact, match=named):
        run_tokenize(two_tokenizers[0], kwargs.pop("src"), tmp_path / "out", shard_size=3, show_progress=False,
                     **kwargs)


def test_a_same_rerun_reuses_the_folder_untouched(images, two_tokenizers, tmp_path):
    first = tokenize(two_tokenizers[0], images, tmp_path / "out")
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()}
    assert tokenize(two_tokenizers[0], images, tmp_path / "out") == first
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()} == before


def test_an_uncaptioned_image_is_skipped_at_tokenize_with_its_reason(images, two_tokenizers, tmp_path):
    summary = tokenize(two_tokenizers[0], images, tmp_path / "out")
    assert summary["samples"] == 6 and summary["skipped"] == 1
    (skipped,) = json.loads((tmp_path / "out" / "report.json").read_text())["skipped"]
    assert skipped["source"] == "img6.png" and "no caption or conversations" in skipped["reason"]
    assert tokenize(two_tokenizers[0], images, tmp_path / "kept", allow_no_text=True)["samples"] == 7


def test_prepare_refuses_shards_of_another_tokenizer_than_the_vocabulary(vlm_assets, images, two_tokenizers,
                                                                         tmp_path):
    from megatron_ext.jobs.prepare import prepare
    from viq_mllm.data.shards import FingerprintMismatch

    tokenize(two_tokenizers[1], images, tmp_path / "shards")
    with pytest.raises(FingerprintMismatch, match="the vocabulary was extended for ViQ tokenizer"):
        prepare(tmp_path / "shards", vlm_assets["vocab"], tmp_path / "p", "pretrain", 256, show_progress=False)
    assert not (tmp_path / "p").exists() and not (tmp_path / "p.partial").exists()


@pytest.fixture(scope="module")
def prepared_dir(vlm_assets, tmp_path_factory):
    from megatron_ext.jobs.prepare import prepare

    out = tmp_path_factory.mktemp("prepared") / "p"
    prepare(vlm_assets["shards"], vlm_assets["vocab"], out, "pretrain", 256, show_progress=False)
    return out


def test_a_truncated_prepared_file_is_named_when_opened(prepared_dir, tmp_path):
    from megatron_ext.data.prepared import PreparedRows

    damaged = tmp_path / "p"
    shutil.copytree(prepared_dir, damaged)
    data = (damaged / "codes.bin").read_bytes()
    (damaged / "codes.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(artifact.DamagedArtifact, match=f"codes.bin: {len(data) // 2} bytes, the manifest says "
                                                       f"{len(data)}"):
        PreparedRows(damaged)


def test_prepared_ids_use_megatrons_dtype_and_read_back_through_megatron(prepared_dir, vlm_assets):
    """megatron-core's readers assume uint16 below 65,500 ids: the files must be written so."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDataset

    from viq_mllm.vocab import Vocab

    vocab = Vocab.load(vlm_assets["vocab"])
    tokens = IndexedDataset(str(prepared_dir / "tokens"))
    assert tokens.index.dtype == DType.optimal_dtype(vocab.size) == np.uint16
    assert 0 < int(tokens[0].max()) < vocab.size


def test_malformed_yaml_is_one_line_naming_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: 3\n   lr: 1\n")
    proc = viq_mllm("train", str(bad), check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert f"{bad}:3:" in proc.stderr and "malformed YAML" in proc.stderr
    proc = viq_mllm("train", TINY, "train.lr=[1", check=False)
    assert proc.returncode == 2 and "override 'train.lr=[1'" in proc.stderr and proc.stderr.count("\n") == 1


@pytest.mark.e2e
def test_a_diverging_run_stops_non_zero_and_no_checkpoint_holds_the_bad_state(tmp_path):
    """lr 1e12: step 1's update is finite but leaves parameters whose loss is NaN from step 2 on. The run stops at
    the fourth consecutive skip (max_nan_skips 3) with exit 2, naming the step; the checkpoint written after step 1
    holds those parameters and is set aside, so a rerun does not resume from it."""
    from viq_mllm.metrics import read_metrics

    run = tmp_path / "run"
    proc = viq_mllm("train", TINY, f"run.dir={run}", "train.steps=8", "train.lr=1e12", "train.warmup_steps=0",
                    "train.min_lr=0", "checkpoint.every=1", *QUIET, check=False)
    assert proc.returncode == 2
    assert "step 5: loss nan" in proc.stderr and "4 consecutive steps were not finite" in proc.stderr
    rows = read_metrics(run)
    assert [r["skipped"] for r in rows] == [False, True, True, True]
    assert not (run / "checkpoints" / "latest").exists()
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000001.nonfinite"]


@pytest.mark.e2e
def test_a_flipped_byte_in_any_checkpoint_file_is_refused_on_resume(tmp_path):
    run = tmp_path / "run"
    steps = ["train.steps=2", "train.warmup_steps=0", "checkpoint.every=2", *QUIET]
    viq_mllm("train", TINY, f"run.dir={run}", *steps)
    ckpt = run / "checkpoints" / "step_00000002"
    viq_mllm("verify", str(ckpt))
    for name in sorted(artifact.read_manifest(ckpt)["files"]):
        victim = ckpt / name
        original = victim.read_bytes()
        flipped = bytearray(original)
        flipped[len(flipped) // 2] ^= 0x01
        victim.write_bytes(bytes(flipped))
        proc = viq_mllm("train", TINY, f"run.dir={run}", *steps[1:], "train.steps=3", check=False)
        victim.write_bytes(original)
        assert proc.returncode == 2, name
        assert f"{name}: sha256 differs from the manifest" in proc.stderr, name
    damaged = viq_mllm("verify", str(run), check=False)
    assert damaged.returncode == 0 and "1 of 1 folders intact" in damaged.stdout


def test_verify_names_every_damaged_file(prepared_dir, tmp_path):
    folder = tmp_path / "p"
    shutil.copytree(prepared_dir, folder)
    good = viq_mllm("verify", str(folder))
    assert "ok" in good.stdout and "1 of 1 folders intact" in good.stdout
    data = bytearray((folder / "rows.npy").read_bytes())
    data[-1] ^= 0xFF
    (folder / "rows.npy").write_bytes(bytes(data))
    (folder / "loss_mask.idx").unlink()
    (folder / "stray.txt").write_text("?")
    bad = viq_mllm("verify", str(folder), check=False)
    assert bad.returncode == 1 and "0 of 1 folders intact" in bad.stdout
    for problem in ("loss_mask.idx: missing", "rows.npy: sha256 differs", "stray.txt: not in the manifest"):
        assert problem in bad.stdout
    quick = viq_mllm("verify", "--sizes-only", str(folder), check=False)
    assert "rows.npy" not in quick.stdout and "loss_mask.idx: missing" in quick.stdout


def test_a_staging_folder_left_by_a_kill_is_never_read_as_published(images, two_tokenizers, tmp_path):
    """A job killed before it sealed leaves only ``NAME.partial``: readers see no folder; a rerun resumes."""
    from viq_mllm.data.shards import CodeShards

    staging = tmp_path / "out.partial"
    staging.mkdir()
    (staging / "codes-00000.tar").write_bytes(b"half a shard")
    with pytest.raises(FileNotFoundError):
        CodeShards(tmp_path / "out")
    tokenize(two_tokenizers[0], images, tmp_path / "out")
    tokenize(two_tokenizers[0], images, tmp_path / "fresh")
    assert digests(tmp_path / "out") == digests(tmp_path / "fresh") and not staging.exists()


def test_extend_vocab_into_a_folder_of_other_tokenizers_is_refused(vlm_assets, two_tokenizers, tmp_path):
    from viq_mllm.vocab.extend import extend_vocab

    extend_vocab(vlm_assets["sp"], two_tokenizers[0], tmp_path / "vocab")
    with pytest.raises(artifact.StaleArtifact, match="made_from.viq_fingerprint"):
        extend_vocab(vlm_assets["sp"], two_tokenizers[1], tmp_path / "vocab")


def test_generate_says_why_it_produced_nothing(tmp_path):
    """A --prompt given to a model trained on captions: the reason names the task its run trained on."""
    import argparse

    import yaml

    from viq_mllm.cli.models import _why_nothing

    ckpt = tmp_path / "run" / "checkpoints" / "step_00000001"
    ckpt.mkdir(parents=True)
    (tmp_path / "run" / "recipe.yaml").write_text(yaml.safe_dump({"data": {"task": "pretrain"}}))
    asked = argparse.Namespace(checkpoint=str(ckpt), prompt="What is it?")
    assert "trained with data.task=pretrain" in _why_nothing(asked, [])
    assert "ended the text at its first token" in _why_nothing(asked, [])
    bare = argparse.Namespace(checkpoint=str(ckpt), prompt="")
    assert "3 ids that decode to blank text; nothing was generated" in _why_nothing(bare, [1, 2, 3])


def test_a_nan_gradient_with_a_finite_loss_changes_nothing(megatron_single):
    """megatron's own step applied NaN gradients (its clip factor is NaN, a no-op). Poisoned after a finite forward
    and backward, the update is skipped: parameters and LR schedule stay bit for bit; the same step unpoisoned
    moves the parameters."""
    import torch
    from conftest import micro_batches, tiny_trainer

    from megatron_ext.training.loop import forward_backward, optimizer_step

    trainer = tiny_trainer(megatron_single)

    def snapshot():
        return [p.detach().clone() for p in trainer.model.parameters()], trainer.scheduler.num_steps

    loss_sum, _, _, _ = forward_backward(trainer, iter(micro_batches(0)))
    assert torch.isfinite(torch.tensor(loss_sum))
    trainer.model.buffers[0].grad_data[0] = float("nan")
    before = snapshot()
    applied, norm = optimizer_step(trainer)
    after = snapshot()
    assert not applied and norm != norm
    assert all(torch.equal(a, b) for a, b in zip(before[0], after[0])) and before[1] == after[1]
    forward_backward(trainer, iter(micro_batches(0)))
    applied, norm = optimizer_step(trainer)
    assert applied and norm > 0 and trainer.scheduler.num_steps == before[1] + 1
    assert any(not torch.equal(a, p) for a, p in zip(before[0], trainer.model.parameters()))


def test_publishing_never_replaces_a_folder_that_is_not_its_own_kind(tmp_path):
    """An --out that is a user's folder (an HF model, images) is refused before anything is written, and left
    as it was; an empty folder, or one of the same kind, is written over."""
    user = tmp_path / "my_model"
    user.mkdir()
    (user / "config.json").write_text("{}")
    with pytest.raises(artifact.StaleArtifact, match="is not a hf-export folder written by viq-mllm"):
        artifact.Staging.begin(user, artifact.Spec("hf-export", 1))
    assert [p.name for p in user.iterdir()] == ["config.json"] and not (tmp_path / "my_model.partial").exists()
    (tmp_path / "empty").mkdir()
    for _ in range(2):  # an empty folder, then the export it became
        stage = artifact.Staging.begin(tmp_path / "empty", artifact.Spec("hf-export", 1))
        stage.write_json("config.json", {"a": 1})
        stage.seal()
    assert artifact.verify(tmp_path / "empty", full=True)["kind"] == "hf-export"
