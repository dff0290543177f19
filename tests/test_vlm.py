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
    assert single[-1]["loss"] < single[0]["loss"] - 1.0  # from ~8 (a uniform guess over the vocabulary): it learns
    for ours, ref in zip(rows, single):
        assert abs(ours["loss"] - ref["loss"]) / ref["loss"] < 1e-3, (ours, ref)


@pytest.mark.e2e
def test_visual_mode_is_layout_independent_and_resumes_exactly(vlm_assets, tmp_path):
    """train.trainable=visual at TP=2 (the table split over two ranks: text rows on both) and over two data-parallel
    ranks with the distributed optimizer (its state sharded) gives the single process's losses (1e-3: reductions
    in another order, fp32); stopped after 3 steps and resumed, the single process's to 1e-6."""
    visual = [*STEPS, "train.trainable=visual", "train.lr=3e-3", "train.decay_steps=6", "checkpoint.every=3"]
    alone = train_vlm_cli(tmp_path / "alone", vlm_assets, *visual)
    assert alone[-1]["loss"] < alone[0]["loss"] - 0.1, "the visual rows alone must still learn"
    for name, layout in (("tp2", ["parallel.tp=2"]), ("dp2", ["parallel.distributed_optimizer=true"])):
        rows = train_vlm_cli(tmp_path / name, vlm_assets, *visual, *layout, nproc=2)
        for ours, ref in zip(rows, alone, strict=True):
            assert abs(ours["loss"] - ref["loss"]) / ref["loss"] < 1e-3, (name, ours, ref)
    train_vlm_cli(tmp_path / "resumed", vlm_assets, *visual, "train.steps=3")
    resumed = train_vlm_cli(tmp_path / "resumed", vlm_assets, *visual)
    assert [abs(a["loss"] - b["loss"]) < 1e-6 for a, b in zip(resumed, alone, strict=True)] == [True] * 6


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
    # 1 nat in 10 steps: the random tiny LM starts near ln(vocabulary) and memorises the few captions; a mode whose
    # visual input or gradient were cut would still learn the captions' words, but not as fast as this
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0
    # packing the small documents leaves under half of a row as padding; more means the packer broke
    assert all(0 <= r["padding_fraction"] < 0.5 and r["real_tokens"] <= r["tokens"] for r in rows)


@pytest.mark.e2e
def test_sft_supervises_only_the_answers_and_learns(vlm_assets, tmp_path):
    rows = train_vlm_cli(tmp_path / "run", vlm_assets, *STEPS, "train.steps=10", "data.task=sft",
                         "model.seq_length=512")
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0  # 1 nat in 10 steps: as above, on the answers alone
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


def test_visual_mode_trains_only_the_added_rows_and_the_visual_module(vlm_assets, megatron_single):
    """train.trainable=visual on the tiny VLM (tied embedding): after three updates every text row of the table
    and every other GPT parameter is bit for bit where it started, while the code rows and the slot vectors moved;
    the frozen parameters have no optimizer state; the gradient norm is over the trainable gradients only."""
    from megatron_ext.training.loop import build_trainer, forward_backward, optimizer_step
    from megatron_ext.vlm.build import build_vlm, vocab_record
    from megatron_ext.vlm.model import vlm_forward_step
    from viq_mllm.data.multimodal import documents_from_shards
    from viq_mllm.data.packing import collate, pack
    from viq_mllm.data.shards import CodeShards
    from viq_mllm.recipe import load_recipe
    from viq_mllm.vocab.tokenizer import MultimodalTokenizer

    recipe = load_recipe(VLM, [*vlm_overrides(vlm_assets), "train.trainable=visual", "train.lr=1e-2",
                               "train.warmup_steps=0", "train.global_batch_size=1", "train.micro_batch_size=1"])
    assert recipe.model.tie_embeddings
    tokenizer = MultimodalTokenizer.from_dir(vlm_assets["vocab"])
    text = tokenizer.vocab.text_size
    model = build_vlm(recipe.model, recipe.parallel, tokenizer, megatron_single, recipe.train.seed)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = build_trainer(recipe, megatron_single, model, vocab_record(recipe, tokenizer), packed=True)
    trained = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert trained == {id(p) for name, p in model.named_parameters()
                       if name.startswith("visual.") or name.endswith("word_embeddings.weight")}
    docs = documents_from_shards(CodeShards(vlm_assets["shards"]), tokenizer, "pretrain", 16)
    for step in range(3):
        batch = collate(pack(docs[step * 4:(step + 1) * 4], recipe.model.seq_length))
        forward_backward(trainer, iter([{k: v for k, v in batch.items() if k != "images"}]), vlm_forward_step)
        table = model.gpt.embedding.word_embeddings.weight
        visual_grads = [p.main_grad for name, p in model.named_parameters() if name.startswith("visual.")]
        expected = torch.cat([table.main_grad[text:].flatten(), *[g.flatten() for g in visual_grads]]).norm()
        assert table.main_grad[:text].abs().sum() > 0  # the text rows do get gradients, to be kept from them
        applied, norm = optimizer_step(trainer)
        assert applied and norm == pytest.approx(float(expected), rel=1e-5)
    for name, p in model.named_parameters():
        if name.endswith("word_embeddings.weight"):
            assert torch.equal(p[:text], before[name][:text])
            assert not torch.equal(p[text:], before[name][text:])
        elif name.startswith("visual."):
            assert not torch.equal(p, before[name]), name
        else:
            assert torch.equal(p, before[name]), name
