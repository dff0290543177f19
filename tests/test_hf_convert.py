"""HF <-> megatron conversion on tiny random Llama and Qwen2 models: logits equal HF's at TP=1 and TP=2, the
gradients and the updated weights of a training step equal HF's (stepped by torch's reference AdamW), and
hf -> mcore -> hf reproduces every tensor exactly."""

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, viq_mllm

from viq_mllm.vocab.ids import padded_vocab_size

LOGITS = textwrap.dedent(
    """
    import sys, torch
    from pathlib import Path
    from megatron.core import tensor_parallel
    from megatron_ext.model.gpt import gpt_from_checkpoint
    from megatron_ext.training.parallel import init_distributed, shutdown

    ckpt, tp, tokens_file, out = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    layout = init_distributed(tp, 1, 0)
    gpt, meta = gpt_from_checkpoint(ckpt, layout, seed=99)  # the seed must not matter: weights are loaded
    tokens = torch.load(tokens_file)
    with torch.no_grad():
        logits = gpt(tokens, torch.arange(tokens.shape[1])[None].expand_as(tokens), None)
    full = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
    if layout.rank == 0:
        torch.save(full[..., : meta.vocab.text_size], out)
    shutdown()
    """
)

STEP = textwrap.dedent(
    """
    import json, sys, torch
    from pathlib import Path
    from megatron_ext.convert.hf import apply, mappings, shapes_of
    from megatron_ext.model.gpt import gpt_from_checkpoint
    from megatron_ext.training.parallel import init_distributed, shutdown
    from megatron_ext.training.loop import build_trainer, forward_backward, optimizer_step
    from viq_mllm.recipe import ModelSection, recipe_from_dict

    ckpt, tokens_file, train, out = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
    layout = init_distributed(1, 1, 0)
    gpt, meta = gpt_from_checkpoint(ckpt, layout)
    tokens = torch.load(tokens_file)
    b, s = tokens.shape[0], tokens.shape[1] - 1
    recipe = recipe_from_dict({"run": {"dir": "-"}, "model": meta.model.model_dump(), "train": {
        "steps": 1, "micro_batch_size": b, "global_batch_size": b, **train}})
    trainer = build_trainer(recipe, layout, gpt.train(), meta.vocab)
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(b, s),
             "position_ids": torch.arange(s).expand(b, s)}
    forward_backward(trainer, iter([batch]))  # the DDP gradient buffer: mean loss over the supervised tokens
    grads = {name: p.main_grad.clone() for name, p in trainer.model.module.named_parameters()}
    optimizer_step(trainer)
    weights = {name: p.detach().clone() for name, p in trainer.model.module.named_parameters()}
    ctx = shapes_of(meta.model, meta.vocab.text_size)
    torch.save({"grads": apply(mappings(ctx), grads, ctx, "to_hf"),
                "weights": apply(mappings(ctx), weights, ctx, "to_hf"),
                "fused": [g["fused"] for g in trainer.optimizer.param_groups]}, out)
    shutdown()
    """
)
# One optimizer step whose update depends on the gradient's size: clipping active (the tiny model's gradient norm
# is ~1), and eps near the clipped gradients' magnitude, so Adam's first step is not just lr * sign(g).
STEP_TRAIN = {"lr": 1e-2, "min_lr": 1e-2, "weight_decay": 0.1, "adam_beta1": 0.9, "adam_beta2": 0.95, "adam_eps": 1e-4,
              "clip_grad": 0.05}

CASES = {
    "llama-untied": ("llama", dict(tie_word_embeddings=False)),
    "llama-tied": ("llama", dict(tie_word_embeddings=True)),
    "qwen2": ("qwen2", dict(tie_word_embeddings=False, rope_theta=1000000.0)),
}


def tiny_hf(kind: str, extra: dict, path):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = {**dict(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6), **extra}
    torch.manual_seed(0)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    with torch.no_grad():  # random norms and biases, so a wrong mapping of them cannot hide
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.5 + (1 if "norm" in name else 0))
    model.eval().save_pretrained(str(path))
    return model


def our_logits(ckpt, tp: int, tokens: torch.Tensor, work) -> torch.Tensor:
    """The text-vocabulary logits of a megatron checkpoint, computed at ``tp`` (torchrun) in a fresh process."""
    work.mkdir(parents=True, exist_ok=True)
    torch.save(tokens, work / "tokens.pt")
    (work / "logits.py").write_text(LOGITS)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={tp}",
                    str(work / "logits.py"), str(ckpt), str(tp), str(work / "tokens.pt"), str(work / "logits.pt")],
                   check=True, cwd=ROOT, capture_output=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return torch.load(work / "logits.pt")


@pytest.fixture(scope="module", params=list(CASES))
def converted(request, tmp_path_factory):
    kind, extra = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    model = tiny_hf(kind, extra, root / "hf")
    viq_mllm("convert", "hf-to-mcore", "--input", str(root / "hf"), "--output", str(root / "mcore"), "--tp", "2")
    return root, model


@pytest.mark.e2e
@pytest.mark.parametrize("tp", [1, 2])
def test_logits_equal_hf(converted, tp):
    root, model = converted
    tokens = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(1))
    ours = our_logits(root / "mcore", tp, tokens, root / f"tp{tp}")
    with torch.no_grad():
        theirs = model(tokens).logits
    assert ours.shape == theirs.shape
    rel = (ours - theirs).abs().max() / theirs.abs().max()
    # fp32, the same weights through other kernels (SDPA vs eager, fused QKV); a wrong mapping is O(1)
    assert rel < 1e-4, rel


@pytest.fixture(scope="module")
def stepped(converted):
    """One megatron training step (forward, backward, clipping, AdamW) of the converted model: its gradients and
    updated weights in HF names, and the ``fused`` flag of each optimizer group."""
    root, model = converted
    tokens = torch.randint(0, 300, (2, 21), generator=torch.Generator().manual_seed(2))
    torch.save(tokens, root / "step_tokens.pt")
    (root / "step.py").write_text(STEP)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                    str(root / "step.py"), str(root / "mcore"), str(root / "step_tokens.pt"), json.dumps(STEP_TRAIN),
                    str(root / "step.pt")],
                   check=True, cwd=ROOT, capture_output=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return model, tokens, torch.load(root / "step.pt")


def hf_loss(model, tokens: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
    """HF's mean next-token loss with megatron's semantics: the softmax runs over the padded vocabulary, whose
    output rows (``padding``, ``[padded - 300, h]``, zeros in a converted model) are trained parameters too."""
    hidden = model.model(tokens[:, :-1]).last_hidden_state  # eval mode: no dropout in either model
    logits = torch.cat([model.lm_head(hidden), hidden @ padding.t()], dim=-1)
    return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())


def padding_rows(model) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.zeros(padded_vocab_size(300) - 300, model.config.hidden_size))


def assert_close_per_tensor(ours: dict, theirs: dict, tol: float) -> None:
    assert set(ours) == set(theirs)
    for name, expected in theirs.items():
        rel = (ours[name] - expected).abs().max() / expected.abs().max()
        assert rel < tol, (name, rel)


@pytest.mark.e2e
def test_training_step_gradients_equal_hf(stepped):
    """Every weight's gradient (SwiGLU, RoPE, fused QKV, tied or untied embeddings, biases) after our megatron
    training step, read from the DDP buffer it accumulates into, equals HF's for the same mean loss."""
    model, tokens, ours = stepped
    model.zero_grad()
    hf_loss(model, tokens, padding_rows(model)).backward()
    assert_close_per_tensor(ours["grads"], {name: p.grad for name, p in model.named_parameters()}, 1e-4)


@pytest.mark.e2e
def test_optimizer_step_equals_torch_reference_adamw(stepped):
    """The weights after one step (megatron's clipping by the global norm, padded rows included; weight decay on
    matrices only; the fused AdamW kernel apex_free selects) equal HF's model stepped by torch's single-tensor
    AdamW with the same hyper-parameters."""
    model, tokens, ours = stepped
    assert ours["fused"] and all(ours["fused"])
    hf, padding = copy.deepcopy(model), padding_rows(model)
    hf.zero_grad(set_to_none=True)
    params = [*hf.parameters(), padding]
    reference = torch.optim.AdamW(
        [{"params": [p for p in params if p.dim() > 1], "weight_decay": STEP_TRAIN["weight_decay"]},
         {"params": [p for p in params if p.dim() == 1], "weight_decay": 0.0}],
        lr=STEP_TRAIN["lr"], betas=(STEP_TRAIN["adam_beta1"], STEP_TRAIN["adam_beta2"]), eps=STEP_TRAIN["adam_eps"],
        foreach=False, fused=False)
    hf_loss(hf, tokens, padding).backward()
    assert torch.nn.utils.clip_grad_norm_(params, STEP_TRAIN["clip_grad"]) > 2 * STEP_TRAIN["clip_grad"]
    reference.step()
    before = dict(model.named_parameters())
    updates = {name: ours["weights"][name] - before[name].detach() for name in ours["weights"]}
    assert_close_per_tensor(updates, {name: (p - before[name]).detach() for name, p in hf.named_parameters()}, 1e-3)


@pytest.mark.e2e
def test_round_trip_reproduces_every_tensor(converted):
    from safetensors.torch import load_file

    root, model = converted
    viq_mllm("convert", "mcore-to-hf", "--input", str(root / "mcore"), "--output", str(root / "back"))
    back = load_file(str(root / "back" / "model.safetensors"))
    original = {k: v for k, v in model.state_dict().items()
                if not (model.config.tie_word_embeddings and k == "lm_head.weight")}
    assert set(back) == set(original)
    for key, tensor in original.items():
        assert torch.equal(back[key], tensor), key


def test_unmapped_tensor_is_an_error(tmp_path):
    from megatron_ext.convert.hf import ConversionError, Shapes, apply, mappings

    ctx = Shapes(layers=1, heads=4, groups=2, head_dim=16, vocab=300, padded_vocab=1024, qkv_bias=False, tied=True)
    model = tiny_hf("llama", dict(tie_word_embeddings=True, num_hidden_layers=1), tmp_path / "hf")
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    with pytest.raises(ConversionError, match="unmapped tensors: \\['model.layers.0.self_attn.rotary_emb.inv_freq'\\]"):
        apply(mappings(ctx), state, ctx, "to_mcore")
    del state["model.layers.0.self_attn.rotary_emb.inv_freq"], state["model.norm.weight"]
    with pytest.raises(ConversionError, match="missing tensor model.norm.weight"):
        apply(mappings(ctx), state, ctx, "to_mcore")


@pytest.mark.e2e
def test_real_smollm2_greedy_generation_matches_hf(smollm2, tmp_path):
    """Greedy continuations of the converted checkpoint (``viq-mllm generate``'s decoding, in this process) equal
    HF's ``generate`` token for token."""
    from megatron_ext.training.parallel import shutdown
    from megatron_ext.vlm.inference import greedy_text, load_text_model

    folder, model, tokenizer = smollm2
    viq_mllm("convert", "hf-to-mcore", "--input", str(folder), "--output", str(tmp_path / "mcore"))
    prompts = ["The capital of France is", "def fibonacci(n):", "Water boils at"]
    try:
        gpt, meta = load_text_model(tmp_path / "mcore")
        with torch.no_grad():
            ours = [greedy_text(gpt, tokenizer(p).input_ids, 12, tokenizer.eos_token_id, meta.vocab.text_size)
                    for p in prompts]
    finally:
        shutdown()
    for prompt, mine in zip(prompts, ours):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            theirs = model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:].tolist()
        if tokenizer.eos_token_id in theirs:
            theirs = theirs[: theirs.index(tokenizer.eos_token_id)]
        assert mine == theirs, (prompt, tokenizer.decode(mine), tokenizer.decode(theirs))


@pytest.mark.e2e
def test_a_model_trained_here_exports_to_hf_with_equal_logits(tmp_path):
    """No hf_config in a checkpoint trained from scratch: the exported config is rebuilt from model.json (the tiny
    recipe has qkv biases: Qwen2) and HF's own implementation must give our logits."""
    from conftest import train_tiny
    from transformers import AutoModelForCausalLM

    train_tiny(tmp_path / "run", "train.steps=2", "train.warmup_steps=1", "checkpoint.every=2")
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000002"
    viq_mllm("convert", "mcore-to-hf", "--input", str(ckpt), "--output", str(tmp_path / "hf"))
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    assert type(model).__name__ == "Qwen2ForCausalLM" and model.config.vocab_size == 257
    tokens = torch.randint(0, 257, (2, 24), generator=torch.Generator().manual_seed(2))
    ours = our_logits(ckpt, 1, tokens, tmp_path / "ours")
    with torch.no_grad():
        theirs = model(tokens).logits
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max() / theirs.abs().max() < 1e-4  # as above: other fp32 kernels, not other weights


@pytest.mark.parametrize("qkv_bias, tied", [(True, True), (False, False)])
def test_rebuilt_hf_config_reads_back_as_the_same_model(qkv_bias, tied):
    from megatron_ext.convert.hf import hf_config, model_section
    from viq_mllm.recipe import ModelSection

    model = ModelSection(num_layers=3, hidden_size=96, ffn_hidden_size=256, num_attention_heads=6, num_query_groups=2,
                         seq_length=512, rope_theta=500000.0, norm_eps=1e-5, qkv_bias=qkv_bias, tie_embeddings=tied)
    assert model_section(hf_config(model, 1000)) == model
