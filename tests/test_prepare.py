"""``viq-mllm prepare``: prepared rows equal the in-memory path's rows document for document, the files are
byte-identical across runs and after an interrupted run, inputs that differ are refused, and a VLM run on prepared
data gives the losses of a run on the shards."""

import hashlib

import pytest
import torch
from conftest import VLM, train_vlm_cli

from megatron_ext.data import prepared
from megatron_ext.data.prepared import PreparedMismatch, PreparedRows, prepare
from viq_mllm.data.multimodal import documents_from_shards
from viq_mllm.data.packing import collate, pack
from viq_mllm.data.shards import CodeShards
from viq_mllm.recipe import load_recipe
from viq_mllm.vocab.tokenizer import MultimodalTokenizer

SEQ = 256


def run_prepare(assets, out, seq_length=SEQ, **kwargs):
    return prepare(assets["shards"], assets["vocab"], out, "pretrain", seq_length, show_progress=False, **kwargs)


def digests(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize("group, one_per_row, seq", [(16, False, SEQ), (1, True, 1024)])
def test_prepared_rows_equal_the_in_memory_rows(vlm_assets, tmp_path, group, one_per_row, seq):
    tokenizer = MultimodalTokenizer.from_dir(vlm_assets["vocab"])
    docs = documents_from_shards(CodeShards(vlm_assets["shards"]), tokenizer, "pretrain", group)
    expected = pack(docs, seq, one_per_row=one_per_row)
    run_prepare(vlm_assets, tmp_path / "p", seq, group=group, pack=not one_per_row)
    rows = PreparedRows(tmp_path / "p")
    assert len(rows) == len(expected)
    for ours, theirs in zip(rows, expected):
        assert [len(d) for d in ours.documents] == [len(d) for d in theirs.documents]
        for a, b in zip(ours.documents, theirs.documents):
            assert a.image == b.image and a.image is not None
            for name in ("tokens", "visual", "codes", "loss_mask"):
                assert torch.equal(getattr(a, name), getattr(b, name)), name
    for key, value in collate(list(rows)).items():
        reference = collate(expected)[key]
        assert value == reference if key == "images" else torch.equal(value, reference), key
    assert rows.padding_fraction == pytest.approx(1 - sum(r.used for r in expected) / (len(expected) * seq))


def test_reruns_and_an_interrupted_run_give_byte_identical_files(vlm_assets, tmp_path, monkeypatch):
    first = run_prepare(vlm_assets, tmp_path / "a")
    files = digests(tmp_path / "a")
    assert {"tokens.bin", "tokens.idx", "codes.bin", "rows.npy", "prepared.json"} <= set(files)
    assert run_prepare(vlm_assets, tmp_path / "a") == first and digests(tmp_path / "a") == files  # cached

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed after the parts")

    monkeypatch.setattr(prepared, "_finish", killed)
    with pytest.raises(KeyboardInterrupt):
        run_prepare(vlm_assets, tmp_path / "b")
    parts = tmp_path / "b" / "parts"
    (parts / "part-00001.done").unlink()  # as if killed while writing shard 1
    (parts / "part-00001.tokens.bin").write_bytes(b"half a part")
    monkeypatch.undo()
    run_prepare(vlm_assets, tmp_path / "b")
    assert digests(tmp_path / "b") == files and not parts.exists()


def test_data_prepared_for_another_recipe_is_refused_naming_the_field(vlm_assets, tmp_path):
    run_prepare(vlm_assets, tmp_path / "p")
    rows = PreparedRows(tmp_path / "p")
    rows.check(seq_length=SEQ, task="pretrain", group=16)
    with pytest.raises(PreparedMismatch, match="prepared with seq_length=256, this run expects 512"):
        rows.check(seq_length=512)
    with pytest.raises(FileNotFoundError, match="run `viq-mllm prepare`"):
        PreparedRows(tmp_path)


@pytest.mark.e2e
def test_a_vlm_run_on_prepared_data_gives_the_losses_of_a_run_on_the_shards(vlm_assets, tmp_path):
    """The prepared run also builds its micro-batches in two DataLoader workers; the reference in this process."""
    seq = load_recipe(VLM, [f"data.vocab={vlm_assets['vocab']}"]).model.seq_length
    prepare(vlm_assets["shards"], vlm_assets["vocab"], tmp_path / "prepared", "pretrain", seq, show_progress=False)
    steps = ["train.steps=4", "train.warmup_steps=1", "checkpoint.every=0"]
    on_shards = train_vlm_cli(tmp_path / "shards_run", vlm_assets, *steps)
    on_prepared = train_vlm_cli(tmp_path / "prepared_run", vlm_assets, *steps, "data.workers=2",
                                f"data.sources=[{{path: {tmp_path / 'prepared'}}}]")
    assert [r["step"] for r in on_prepared] == [1, 2, 3, 4]
    for a, b in zip(on_prepared, on_shards):
        assert a["loss"] == b["loss"] and a["real_tokens"] == b["real_tokens"]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_loader_yields_the_micro_batches_of_the_step_whatever_the_workers(vlm_assets, tmp_path, workers):
    """Against ``PackedDataset.micro_batches`` (built in this process, step by step), also from a resumed step."""
    from viq_mllm.data.loader import MicroBatchLoader
    from viq_mllm.data.multimodal import PackedDataset, PackedSource

    run_prepare(vlm_assets, tmp_path / "p")
    dataset = PackedDataset([PackedSource(PreparedRows(tmp_path / "p"), 1.0)], seed=3)
    shape = dict(global_batch=8, micro_batch=2, dp_rank=1, dp_size=2)
    loader = MicroBatchLoader(dataset, **shape, workers=workers)
    for step in (0, 1, 2, 5, 6):
        ours = list(loader(step))
        reference = list(dataset.micro_batches(step, 8, 2, 1, 2))
        assert len(ours) == len(reference) == 2
        for a, b in zip(ours, reference):
            assert a.keys() == b.keys()
            assert all(a[k] == b[k] if k == "images" else torch.equal(a[k], b[k]) for k in a), step


@pytest.mark.e2e
def test_two_ranks_prepare_the_same_files_as_one(vlm_assets, tmp_path):
    from conftest import viq_mllm

    run_prepare(vlm_assets, tmp_path / "one")
    viq_mllm("prepare", "--shards", str(vlm_assets["shards"]), "--vocab", str(vlm_assets["vocab"]),
             "--seq-length", str(SEQ), "--out", str(tmp_path / "two"), "--nproc", "2")
    assert digests(tmp_path / "two") == digests(tmp_path / "one")
