"""The SDPA core attention: packed (thd) rows attend within each document only, like separate runs."""

import math

import pytest
import torch
from conftest import TINY

from viq_mllm.recipe import load_recipe


def naive_block_causal(lengths, total):
    doc = []
    for i, n in enumerate(lengths):
        doc += [i] * n
    doc += [len(lengths)] * (total - len(doc))
    return torch.tensor([[doc[i] == doc[j] and j <= i for j in range(total)] for i in range(total)])


def test_block_causal_mask_matches_loops():
    from megatron_ext.model.attention import block_causal_mask

    lengths = [3, 1, 4]
    cu = torch.tensor([0, 3, 4, 8], dtype=torch.int32)
    assert torch.equal(block_causal_mask(cu, 10), naive_block_causal(lengths, 10))


def reference_attention(q, k, v):
    """Plain causal softmax attention for one document, [s, heads, d] with GQA by repetition."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(q.shape[-1])
    causal = torch.ones(q.shape[0], q.shape[0], dtype=torch.bool, device=q.device).tril()
    probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", probs, v).reshape(q.shape[0], -1)


def per_document(q, k, v, cu, total):
    """The reference per document of a packed row, row padding past ``cu[-1]`` being one more document."""
    bounds = cu.tolist() + ([total] if cu[-1] < total else [])
    return torch.cat([reference_attention(q[a:b], k[a:b], v[a:b]) for a, b in zip(bounds[:-1], bounds[1:])])


def core_attention(*overrides):
    """The tiny recipe's SDPA core attention, its shape changed by recipe ``overrides``."""
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_ext.model.attention import SDPACoreAttention
    from megatron_ext.model.gpt import transformer_config

    r = load_recipe(TINY, list(overrides))
    return SDPACoreAttention(transformer_config(r.model, r.parallel, r.train.precision), 1, AttnMaskType.causal, "self")


def test_thd_core_attention_equals_per_document(megatron_single):
    """Layout after layout, as in training: the mask cached for one ``cu_seqlens`` tensor never serves another,
    nor the same tensor edited in place."""
    from megatron.core.packed_seq_params import PackedSeqParams

    attn = core_attention()
    cu = torch.tensor([0, 5, 7, 14], dtype=torch.int32)
    torch.manual_seed(0)
    q, k, v = torch.randn(14, 4, 16), torch.randn(14, 2, 16), torch.randn(14, 2, 16)
    for step in ("first", "edited in place", "new tensor"):
        if step == "edited in place":
            cu.copy_(torch.tensor([0, 2, 11, 14]))
        if step == "new tensor":
            cu = torch.tensor([0, 9, 14], dtype=torch.int32)
        params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu)
        packed = attn(q, k, v, None, packed_seq_params=params)
        torch.testing.assert_close(packed, per_document(q, k, v, cu, 14), rtol=1e-5, atol=1e-6)


def test_layout_memo_computes_once_per_cu_seqlens_tensor():
    from megatron_ext.model.attention import LayoutMemo

    memo, calls = LayoutMemo(), []

    def compute():
        calls.append(None)
        return len(calls)

    cu = torch.tensor([0, 3, 8])
    assert memo.get(cu, "x", compute) == memo.get(cu, "x", compute) == 1  # every layer of a step: one computation
    assert memo.get(cu, "y", compute) == 2
    cu[1] = 4
    assert memo.get(cu, "x", compute) == 3  # the same tensor edited in place
    assert memo.get(cu.clone(), "x", compute) == 4  # equal contents, another tensor


def test_document_logits_in_packed_row_equal_alone(megatron_single):
    from megatron.core.packed_seq_params import PackedSeqParams

    from megatron_ext.model.gpt import build_gpt, transformer_config

    r = load_recipe(TINY)
    config = transformer_config(r.model, r.parallel, r.train.precision)
    gpt = build_gpt(config, r.model, r.parallel, 1024, megatron_single, 0)
    gpt.eval()
    torch.manual_seed(1)
    dev = gpt.embedding.word_embeddings.weight.device
    docs = [torch.randint(0, 256, (n,)).to(dev) for n in (9, 4, 11)]
    cu = torch.tensor([0, 9, 13, 24], dtype=torch.int32, device=dev)
    tokens = torch.cat(docs)[None]
    positions = torch.cat([torch.arange(len(d), device=dev) for d in docs])[None]
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=11, max_seqlen_kv=11)
    with torch.no_grad():
        packed = gpt(tokens, positions, None, packed_seq_params=params)[0]
        alone = torch.cat([gpt(d[None], torch.arange(len(d), device=dev)[None], None)[0] for d in docs])
        naive = gpt(tokens, torch.arange(24, device=dev)[None], None)[0]
    torch.testing.assert_close(packed, alone, rtol=1e-4, atol=1e-5)
    assert (naive[9:] - alone[9:]).abs().max() > 1e-2, "without isolation the later documents would differ"


def test_flash_varlen_glue_pads_and_repeats_groups(monkeypatch):
    """CPU check of what varlen_causal_attention hands the kernel: row padding as one more document, key/value
    groups repeated where this torch's kernel takes no GQA flag, the longest document as max length."""
    import megatron_ext.model.attention as attention

    seen = {}

    def kernel(q, k, v, cu_q, cu_k, max_q, max_k, scale, is_causal):
        seen.update(cu=cu_q.tolist(), longest=max_q, kv_heads=k.shape[1])
        assert is_causal and torch.equal(cu_q, cu_k) and max_q == max_k
        return per_document(q, k, v, cu_q, q.shape[0]).view_as(q)

    monkeypatch.setattr(attention, "_flash_varlen", lambda: (kernel, {"is_causal": True}, False))
    torch.manual_seed(0)
    q, k, v = torch.randn(12, 4, 8), torch.randn(12, 2, 8), torch.randn(12, 2, 8)
    cu = torch.tensor([0, 3, 9], dtype=torch.int32)
    out = attention.varlen_causal_attention(q, k, v, cu, None)
    assert seen == {"cu": [0, 3, 9, 12], "longest": 6, "kv_heads": 4}
    torch.testing.assert_close(out, per_document(q, k, v, cu, 12))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash varlen attention is a CUDA kernel")
def test_flash_varlen_core_attention_equals_per_document_on_cuda(megatron_single):
    """On CUDA in bf16 a packed row takes the flash varlen kernel: outputs and gradients match the fp32
    per-document reference on the same bf16 inputs, row padding included."""
    from megatron.core.packed_seq_params import PackedSeqParams

    from megatron_ext.model.attention import packed_uses_flash

    attn = core_attention("model.hidden_size=256")  # 4 heads of 64: the head size the tensors below have
    cu = torch.tensor([0, 37, 40, 130], dtype=torch.int32, device="cuda")
    torch.manual_seed(0)
    q, k, v = (torch.randn(136, h, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for h in (4, 2, 2))
    assert packed_uses_flash(q, 0.0)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=90, max_seqlen_kv=90)
    packed = attn(q, k, v, None, packed_seq_params=params)
    ref_inputs = [x.detach().float().requires_grad_() for x in (q, k, v)]
    expected = per_document(*ref_inputs, cu.cpu(), 136)
    # bf16 inputs against an fp32 reference: bf16's 2^-8 rounding of outputs of size ~1 is 4e-3; 2e-2 for the
    # softmax's accumulation, 5e-2 for the gradients' two more matrix products
    torch.testing.assert_close(packed.float(), expected, rtol=2e-2, atol=2e-2)
    weights = torch.randn_like(expected)
    grads = torch.autograd.grad((packed.float() * weights).sum(), (q, k, v))
    expected_grads = torch.autograd.grad((expected * weights).sum(), ref_inputs)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got.float(), want, rtol=5e-2, atol=5e-2)
