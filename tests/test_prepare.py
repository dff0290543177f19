"""``viq-mllm prepare``: prepared rows equal the in-memory path's rows document for document, the files are
byte-identical across runs and after an interrupted run, inputs that differ are refused, and a VLM run on prepared
data gives the losses of a run on the shards."""

import hashlib

import pytest
import torch
from conftest import VLM, train_vlm_cli

from megatron_ext.data.prepared import PreparedMismatch, PreparedRows
from megatron_ext.jobs import prepare as prepare_job
from megatron_ext.jobs.prepare import prepare
from viq_mllm.data.multimodal import documents_from_shards
from viq_mllm.data.shards import CodeShards
from viq_mllm.recipe import load_recipe
from viq_mllm.vocab.tokenizer import MultimodalTokenizer

SEQ = 256


def run_prepare(assets, out, seq_length=SEQ, **kwargs):
    return prepare(assets["shards"], assets["vocab"], out, "pretrain", seq_length, show_progress=False, **kwargs)


def digests(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize("group, one_per_row, seq, align", [(16, False, SEQ, 1), (1, True, 1024, 1), (16, False, SEQ, 16)])
def test_prepared_files_and_rows_equal_independent_references(vlm_assets, tmp_path, group, one_per_row, seq, align):
    """The files, read with megatron-core's own ``IndexedDataset`` (not our reader), hold the documents built in
    memory, in shard order; the rows are the textbook first-fit-decreasing of their aligned lengths
    (``scanned_first_fit_decreasing``, not ``row_documents``); ``PreparedRows`` serves exactly those."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from test_layout_packing import scanned_first_fit_decreasing

    from viq_mllm.data.packing import aligned

    tokenizer = MultimodalTokenizer.from_dir(vlm_assets["vocab"])
    docs = documents_from_shards(CodeShards(vlm_assets["shards"]), tokenizer, "pretrain", group)
    run_prepare(vlm_assets, tmp_path / "p", seq, group=group, pack=not one_per_row, pack_align=align)
    files = {f: IndexedDataset(str(tmp_path / "p" / f)) for f in ("tokens", "loss_mask", "visual", "codes", "images")}
    assert len(files["tokens"]) == len(docs)
    for i, doc in enumerate(docs):
        assert files["tokens"][i].tolist() == doc.tokens.tolist()
        assert files["visual"][i].astype(bool).tolist() == doc.visual.tolist()
        assert files["loss_mask"][i].tolist() == doc.loss_mask.int().tolist()
        assert files["codes"][i].reshape(-1, group).tolist() == doc.codes.tolist()
        assert files["images"][i].tobytes().decode().split("\n")[:-1] == doc.images
    lengths = [aligned(len(d), align) for d in docs]
    expected = [[i] for i in range(len(docs))] if one_per_row else \
        [sorted(b) for b in scanned_first_fit_decreasing(lengths, seq)]
    rows = PreparedRows(tmp_path / "p")
    assert len(rows) == len(expected)
    for row, members in zip(rows, expected):
        assert [d.tokens.tolist() for d in row.documents] == [docs[i].tokens.tolist() for i in members]
        assert row.align == align and row.used == sum(lengths[i] for i in members) <= seq
    real = sum(len(d) for d in docs)
    assert rows.padding_fraction == pytest.approx(1 - real / (len(expected) * seq))


def test_reruns_and_an_interrupted_run_give_byte_identical_files(vlm_assets, tmp_path, monkeypatch):
    first = run_prepare(vlm_assets, tmp_path / "a")
    files = digests(tmp_path / "a")
    assert {"tokens.bin", "tokens.idx", "codes.bin", "rows.npy", "manifest.json"} <= set(files)
    assert run_prepare(vlm_assets, tmp_path / "a") == first and digests(tmp_path / "a") == files  # cached

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed after the parts")

    monkeypatch.setattr(prepare_job, "_finish", killed)
    with pytest.raises(KeyboardInterrupt):
        run_prepare(vlm_assets, tmp_path / "b")
    parts = tmp_path / "b.partial" / "parts"
    (tmp_path / "b.partial" / ".units" / "unit-00001.json").unlink()  # as if killed while writing shard 1
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


def llava_records(images) -> list:
    """LLaVA-style records: one image, two images, text-only, and four that must be reported and skipped."""
    ask = lambda question, answer: [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]  # noqa: E731
    return [
        {"id": "one", "image": f"{images}/img000.png", "conversations": ask("<image>\nWhat shape?", "A square.")},
        {"id": "two", "image": [f"{images}/img001.png", f"{images}/img002.png"],
         "conversations": ask("Is <image> the same as <image>?", "No.")},
        {"id": "text", "conversations": ask("Say hi.", "Hi.")},
        {"id": "mismatch", "image": f"{images}/img003.png", "conversations": ask("<image> or <image>?", "One.")},
        {"id": "lost", "image": [f"{images}/img004.png", f"{images}/gone.png"], "conversations": ask("<image><image>", "?")},
        {"id": "bad-image-field", "image": 7, "conversations": ask("<image>", "?")},
        "not an object",
    ]


def test_llava_json_with_several_and_no_images_is_tokenized_and_prepared(vlm_assets, tmp_path):
    """Tokenize -> prepare (SFT) on LLaVA JSON: the skipped records are named with their reason; each image's codes
    are the tokenizer's own encode of its file; prepared documents equal the in-memory ones, image blocks and
    source images in placeholder order."""
    import json

    from viq_mllm.jobs.tokenize import run_tokenize
    from viq_mllm.data.layout import IMAGE_PLACEHOLDER
    from viq_mllm.viq import ViQTokenizer

    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "llava.json").write_text(json.dumps(llava_records("images")))
    manifest = run_tokenize(vlm_assets["viq"], tmp_path / "meta" / "llava.json", tmp_path / "shards",
                            image_root=vlm_assets["root"], show_progress=False)
    assert manifest["inputs"] == 7 and manifest["samples"] == 3 and manifest["skipped"] == 4
    reasons = [r["reason"] for r in json.loads((tmp_path / "shards" / "report.json").read_text())["skipped"]]
    assert "(id mismatch): 2 <image> placeholder(s) for 1 image(s)" in reasons[0]
    assert "(id lost): image 1 (" in reasons[1] and "gone.png" in reasons[1]
    assert "'image' must be a path or a list of paths" in reasons[2] and "expected a JSON object" in reasons[3]

    samples = {s.source.split("(id ")[1][:-1]: s for s in CodeShards(tmp_path / "shards")}
    assert {k: len(s.images) for k, s in samples.items()} == {"one": 1, "two": 2, "text": 0}
    files = [vlm_assets["root"] / "images" / f"img00{i}.png" for i in (1, 2)]
    direct = ViQTokenizer.from_pretrained(vlm_assets["viq"]).encode(files)
    for image, file, codes in zip(samples["two"].images, files, direct):
        assert image.path == str(file.resolve()) and (image.codes == codes.numpy()).all()

    tokenizer = MultimodalTokenizer.from_dir(vlm_assets["vocab"])
    expected = documents_from_shards(CodeShards(tmp_path / "shards"), tokenizer, "sft", 16)
    prepare(tmp_path / "shards", vlm_assets["vocab"], tmp_path / "p", "sft", SEQ, show_progress=False)
    rows = PreparedRows(tmp_path / "p")
    ours = sorted((d for r in rows for d in r.documents), key=lambda d: d.tokens.tolist())
    for a, b in zip(ours, sorted(expected, key=lambda d: d.tokens.tolist()), strict=True):
        assert a.images == b.images and all(torch.equal(getattr(a, n), getattr(b, n))
                                            for n in ("tokens", "visual", "codes", "loss_mask"))
    starts = {len(d.images): int((d.tokens == tokenizer.vocab.special("image_start")).sum()) for d in ours}
    assert starts == {0: 0, 1: 1, 2: 2}
    two = next(d for d in ours if len(d.images) == 2)
    words = tokenizer.text.decode([t for t in two.tokens.tolist() if t < tokenizer.vocab.text_size])
    assert IMAGE_PLACEHOLDER not in words and "the same as" in words


@pytest.mark.e2e
def test_kill_9_mid_prepare_then_rerun_gives_byte_identical_files(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT

    from viq_mllm.bench.synthetic import make_code_shards

    assets = make_code_shards(tmp_path / "data", samples=4000, shard_size=20)  # 200 shards: time to kill
    run_prepare(assets, tmp_path / "straight", seq_length=1024)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "viq_mllm", "prepare", "--shards", str(assets["shards"]),
                             "--vocab", str(assets["vocab"]), "--seq-length", "1024", "--out", str(killed)],
                            env={**os.environ, "PYTHONWARNINGS": "ignore"}, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    staging = tmp_path / "killed.partial"
    while not (staging / ".units" / "unit-00003.json").exists() and time.time() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not killed.exists(), "prepare finished before it was killed"
    assert (staging / "parts").is_dir()
    run_prepare(assets, killed, seq_length=1024)
    assert digests(killed) == digests(tmp_path / "straight") and not staging.exists()


def test_prepared_sft_data_of_another_chat_template_is_refused(vlm_assets, tmp_path, monkeypatch):
    """The chat layout shapes an SFT document's ids, so a folder prepared under another template is refused, not
    resumed (the vocabulary, the shards and every other option being the same)."""
    from viq_mllm.artifact import StaleArtifact
    from viq_mllm.vocab import text_tokenizers

    prepare(vlm_assets["shards"], vlm_assets["vocab"], tmp_path / "p", "sft", SEQ, show_progress=False)
    monkeypatch.setattr(text_tokenizers, "DEFAULT_CHAT_TEMPLATE", "{% for m in messages %}{{ m['content'] }}"
                        "{{ eos_token }}{% endfor %}")
    with pytest.raises(StaleArtifact, match="chat_layout"):
        prepare(vlm_assets["shards"], vlm_assets["vocab"], tmp_path / "p", "sft", SEQ, show_progress=False)
