"""The discrete VLM on packed multimodal sequences: isolation, parallel equivalence, resume, modes, refusals."""

import pytest
import torch
from conftest import VLM, train_vlm_cli, viq_mllm, vlm_overrides

STEPS = ["train.steps=6", "train.warmup_steps=2", "checkpoint.every=0"]


def test_document_logits_inside_a_packed_row_equal_alone(vlm_assets, megatron_single):
    from megatron_ext.vlm.model import packed_params
    from megatron_ext.vlm.build import build_vlm
    from viq_mllm.data.multimodal import documents_from_shards
    from viq_mllm.data.packing import collate, pack
    from viq_mllm.data.shards import CodeShards
    from viq_mllm.recipe import load_recipe
    from viq_mllm.vocab.tokenizer import MultimodalTokenizer

    recipe = load_recipe(VLM, vlm_overrides(vlm_assets))
    tokenizer = MultimodalTokenizer.from_dir(vlm_assets["vocab"])
    docs = documents_from_shards(CodeShards(vlm_assets["shards"]), tokenizer, "pretrain", 16)[:5]
    model = build_vlm(recipe.model, recipe.parallel, tokenizer, megatron_single, recipe.train.seed).eval()
    rows = pack(docs, 256)
    assert len(rows) == 1 and len(rows[0].documents) == 5
    batch = collate(rows)
    with torch.no_grad():
        packed = model(batch, packed_params(batch), labels=False)[0]
        start = 0
        for doc in rows[0].documents:
            alone = collate(pack([doc], len(doc)))
            logits = model(alone, packed_params(alone), labels=False)[0]
            torch.testing.assert_close(packed[start : start + len(doc)], logits, rtol=1e-4, atol=1e-4)
            start += len(doc)
        unisolated = dict(batch, cu_seqlens=torch.tensor([0, 256], dtype=torch.int32), max_seqlen=torch.tensor(256))
        leaky = model(unisolated, packed_params(unisolated), labels=False)[0]
    assert (leaky[len(rows[0].documents[0]) :] - packed[len(rows[0].documents[0]) :]).abs().max() > 1e-3


def test_aligned_packing_gives_every_document_the_losses_of_the_unaligned_packing(vlm_assets, megatron_single):
    """data.pack_align=16 (FP8's multiple) on the same documents: other rows, other offsets, padding inside each
    document's segment; every document's per-token losses equal the unaligned packing's (fp32; 1e-5: the same
    arithmetic per segment, summed in another order), and the padding is never a target."""
    import torch.nn.functional as F

    from megatron_ext.vlm.build import build_vlm
    from megatron_ext.vlm.model import packed_params
    from viq_mllm.data.multimodal import documents_from_shards
    from viq_mllm.data.packing import aligned, collate, pack
    from viq_mllm.data.shards import CodeShards
    from viq_mllm.recipe import load_recipe
    from viq_mllm.vocab.tokenizer import MultimodalTokenizer

    recipe = load_recipe(VLM, vlm_overrides(vlm_assets))
    tokenizer = MultimodalTokenizer.from_dir(vlm_assets["vocab"])
    docs = documents_from_shards(CodeShards(vlm_assets["shards"]), tokenizer, "pretrain", 16)[:12]
    model = build_vlm(recipe.model, recipe.parallel, tokenizer, megatron_single, recipe.train.seed).eval()

    def per_document_losses(align: int) -> dict[int, torch.Tensor]:
        rows = pack(docs, 256, align=align)
        batch = collate(rows)
        with torch.no_grad():
            logits = model(batch, packed_params(batch), labels=False)[0].float()
        losses, offset = {}, 0
        for row in rows:
            for doc in row.documents:
                token_losses = F.cross_entropy(logits[offset:offset + len(doc)], doc.labels, reduction="none")
                losses[next(i for i, d in enumerate(docs) if d is doc)] = token_losses * doc.loss_mask
                offset += aligned(len(doc), align)
            offset += row.seq_length - row.used
        assert batch["loss_mask"].sum() == sum(float(d.loss_mask.sum()) for d in docs)
        return losses

    plain, padded = per_document_losses(1), per_document_losses(16)
    assert any(len(d) % 16 for d in docs) and sorted(plain) == sorted(padded) == list(range(len(docs)))
    for index in plain:
        torch.testing.assert_close(padded[index], plain[index], rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def single(vlm_assets, tmp_path_factory):
    return train_vlm_cli(tmp_path_factory.mktemp("single") / "run", vlm_assets, *STEPS)


@pytest.mark.e2e
@pytest.mark.parametrize("layout", ["parallel.tp=2", "parallel.pp=2"])
def test_parallel_equals_single_process(vlm_assets, single, tmp_path, layout):
    rows = train_vlm_cli(tmp_path / "run", vlm_assets, *STEPS, layout, nproc=2)
    assert single[-1]["loss"] < single[0]["loss"] - 1.0
    for ours, ref in zip(rows, single):
        assert abs(ours["loss"] - ref["loss"]) / ref["loss"] < 1e-3, (ours, ref)


@pytest.mark.e2e
def test_stop_and_resume_is_exact(vlm_assets, single, tmp_path):
    common = ["train.decay_steps=6", "train.warmup_steps=2", "checkpoint.every=3"]
    train_vlm_cli(tmp_path / "run", vlm_assets, *common, "train.steps=3")
    resumed = train_vlm_cli(tmp_path / "run", vlm_assets, *common, "train.steps=6")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for ours, ref in zip(resumed, single):
        assert abs(ours["loss"] - ref["loss"]) < 1e-6


@pytest.mark.e2e
def test_tensor_parallel_bf16_checkpoint_resumes_exactly(vlm_assets, tmp_path):
    """The GPU VLM recipes' layout (TP=2, distributed optimizer, bf16): the visual module, replicated over the TP
    ranks, must checkpoint with one main replica, and the resumed run equal the uninterrupted one."""
    common = ["train.decay_steps=6", "train.warmup_steps=2", "parallel.tp=2", "parallel.distributed_optimizer=true",
              "train.precision=bf16"]
    straight = train_vlm_cli(tmp_path / "straight", vlm_assets, *common, "train.steps=6", nproc=2)
    train_vlm_cli(tmp_path / "run", vlm_assets, *common, "train.steps=3", "checkpoint.every=3", nproc=2)
    resumed = train_vlm_cli(tmp_path / "run", vlm_assets, *common, "train.steps=6", "checkpoint.every=3", nproc=2)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in straight], abs=1e-6)


@pytest.mark.e2e
@pytest.mark.parametrize("mode", [["model.visual.group=4", "model.seq_length=512"],
                                  ["model.visual.embedding=embedder"], ["model.visual.embedding=continuous"],
                                  ["model.visual.embedding=continuous", "model.visual.encoder_trained=false"]],
                         ids=["G4", "embedder", "continuous-trained", "continuous-frozen"])
def test_other_visual_modes_train(vlm_assets, tmp_path, mode):
    """One code per position (G = 1) is trained from a real LLM and checked against HF in test_vlm_hf.py."""
    rows = train_vlm_cli(tmp_path / "run", vlm_assets, *STEPS, "train.steps=10", *mode)
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0
    assert all(0 <= r["padding_fraction"] < 0.5 and r["real_tokens"] <= r["tokens"] for r in rows)


@pytest.mark.e2e
def test_sft_supervises_only_the_answers_and_learns(vlm_assets, tmp_path):
    rows = train_vlm_cli(tmp_path / "run", vlm_assets, *STEPS, "train.steps=10", "data.task=sft",
                         "model.seq_length=512")
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0
    from viq_mllm.data.multimodal import documents_from_shards
    from viq_mllm.data.shards import CodeShards
    from viq_mllm.vocab.tokenizer import MultimodalTokenizer

    tok = MultimodalTokenizer.from_dir(vlm_assets["vocab"])
    sft = documents_from_shards(CodeShards(vlm_assets["shards"]), tok, "sft", 16)
    pre = documents_from_shards(CodeShards(vlm_assets["shards"]), tok, "pretrain", 16)
    # an answer is the caption + end-of-turn: exactly the targets of the caption in pretraining, and none of
    # the question, the role headers or the image
    for a, b in zip(sft, pre):
        assert a.loss_mask.sum() == b.loss_mask.sum()
        targets = a.tokens[1:][a.loss_mask[:-1].bool()]
        assert targets.tolist() == b.tokens[1:][b.loss_mask[:-1].bool()].tolist()


@pytest.mark.e2e
def test_shards_of_another_tokenizer_are_refused_before_training(vlm_assets, tmp_path):
    from viq_mllm.viq import ViQTokenizer

    other = ViQTokenizer.from_config("tiny", preset="2k", seed=7).save_pretrained(tmp_path / "other_viq")
    proc = viq_mllm("train", VLM, f"run.dir={tmp_path / 'run'}", *vlm_overrides(vlm_assets),
                    f"model.visual.viq={other}", check=False)
    assert proc.returncode != 0
    assert "was extended for ViQ tokenizer" in proc.stderr and not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.e2e
def test_init_checkpoint_of_another_vocabulary_is_refused(vlm_assets, tmp_path):
    from conftest import train_tiny

    train_tiny(tmp_path / "text", "train.steps=2", "train.warmup_steps=1", "checkpoint.every=2")
    proc = viq_mllm("train", VLM, f"run.dir={tmp_path / 'run'}", *vlm_overrides(vlm_assets),
                    f"init.checkpoint={tmp_path / 'text' / 'checkpoints' / 'step_00000002'}", check=False)
    assert proc.returncode != 0
    assert "checkpoint text_fingerprint is 'bytes-utf8-v1', this run expects 'text-" in proc.stderr
