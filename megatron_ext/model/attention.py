"""Core attention through ``torch.nn.functional.scaled_dot_product_attention``, packed sequences included.

megatron-core's local ``DotProductAttention`` materialises the score matrix with baddbmm + masked_fill + softmax
(most of a tiny model's CPU step: docs/benchmarks.md) and refuses packed sequences. This drop-in replacement (plugged into the
layer spec's ``core_attention`` slot) calls SDPA and accepts ``PackedSeqParams(qkv_format="thd")``: the packed
row attends causally *within* each document only, via a block-diagonal causal mask built from ``cu_seqlens``.

Shapes (per tensor-parallel rank, ``np`` query heads, ``ng`` key/value groups, ``hn`` head dim):

- ``sbhd``: query ``[s, b, np, hn]``, key/value ``[s, b, ng, hn]`` -> ``[s, b, np * hn]``
- ``thd``:  query ``[t, np, hn]``,    key/value ``[t, ng, hn]``    -> ``[t, np * hn]``

Example: ``cu_seqlens = [0, 3, 5]`` packs documents of 3 and 2 tokens; token 3 (first of document 2)
attends only to itself, never to tokens 0-2.

On CUDA in bf16/fp16 without attention dropout, packed rows go through torch's flash ``varlen_attn`` instead:
the dense ``[t, t]`` mask would cost ``t^2`` FLOPs and memory (SDPA's fused kernels take no mask with GQA, so at
16K positions the step would fall back to the math kernel), where per-document attention costs
``sum(len_i^2)``: the cost the paper's packed training pays, and the one the FLOP model predicts.

With ``rope_theta`` set (the local spec builds the GPT with ``position_embedding_type="none"``), it also applies
the rotary embedding to query and key: the same rotation as megatron's ``apply_rotary_pos_emb`` (non-interleaved
halves, positions restarting at every document of a packed row), with one cos/sin table per sequence layout
(for a packed row shared by all layers of the step, as is its mask: :class:`LayoutMemo`), and half-width tables
instead of megatron's per-call ``cos``/``sin`` of broadcast ``[s, 1, 1, d]`` frequencies, ``rotate_half`` and
concatenations (several times slower per call on CPU).
"""

from __future__ import annotations

import inspect
import weakref
from functools import lru_cache
from typing import Any, Callable, Hashable, Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.dot_product_attention import DotProductAttention

from viq_mllm.rotary import rotate_pair


def positions_of(cu_seqlens: Optional[torch.Tensor], total: int, device) -> torch.Tensor:
    """Token positions: ``0..total-1``, or restarting at each document of a packed row (``cu_seqlens``)."""
    positions = torch.arange(total, device=device)
    if cu_seqlens is None:
        return positions
    doc = torch.searchsorted(cu_seqlens[1:].contiguous().to(positions.dtype), positions, right=True)
    return positions - cu_seqlens.to(positions.dtype)[doc.clamp_max(cu_seqlens.numel() - 1)]


class LayoutMemo:
    """Values derived from one packed layout, computed once per ``cu_seqlens`` tensor and shared by all layers.

    megatron hands every layer of a micro-batch the same ``PackedSeqParams``, hence the same ``cu_seqlens`` tensor,
    so the tensor's identity (held weakly: a freed tensor never matches a new one at its address) and its version
    counter (bumped by any in-place edit) stand for its contents. Comparing contents instead would read them back
    from the device, one host synchronisation per layer on a GPU; computing per layer would rebuild the rotary
    tables and the ``[t, t]`` block mask in every layer.

    Example: ``memo.get(cu, "mask", lambda: block_causal_mask(cu, t))`` builds the mask in the first layer and
    returns the same tensor to the others; the next micro-batch's ``cu`` starts afresh.
    """

    def __init__(self):
        self._ref, self._version, self._values = None, None, {}

    def get(self, cu_seqlens: torch.Tensor, name: Hashable, compute: Callable[[], Any]) -> Any:
        if self._ref is None or self._ref() is not cu_seqlens or self._version != cu_seqlens._version:
            self._ref, self._version, self._values = weakref.ref(cu_seqlens), cu_seqlens._version, {}
        if name not in self._values:
            self._values[name] = compute()
        return self._values[name]


_LAYOUTS = LayoutMemo()


class RopeTables:
    """``(cos, sin)`` of ``positions x inv_freq`` (``[t, d/2]``, fp32 angles): per packed layout, shared by all
    layers (:class:`LayoutMemo`); for unpacked sequences, kept for the last length seen."""

    def __init__(self, dim: int, theta: float):
        self.dim, self.theta = dim, theta
        self.inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
        self._key, self._tables = None, None

    def __call__(self, cu_seqlens: Optional[torch.Tensor], total: int, dtype: torch.dtype, device) -> tuple:
        if cu_seqlens is not None:
            return _LAYOUTS.get(cu_seqlens, ("rope", self.dim, self.theta, total, dtype, str(device)),
                                lambda: self._compute(cu_seqlens, total, dtype, device))
        key = (total, dtype, str(device))
        if key != self._key:
            self._key, self._tables = key, self._compute(None, total, dtype, device)
        return self._tables

    def _compute(self, cu_seqlens: Optional[torch.Tensor], total: int, dtype: torch.dtype, device) -> tuple:
        angles = positions_of(cu_seqlens, total, device).float()[:, None] * self.inv_freq.to(device)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def block_causal_mask(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """``[total, total]`` bool, True where query i may attend key j: same document and j <= i.

    Positions past ``cu_seqlens[-1]`` (row padding) form their own causal block, so they never touch documents.
    """
    positions = torch.arange(total, device=cu_seqlens.device)
    doc = torch.searchsorted(cu_seqlens[1:].contiguous().to(positions.dtype), positions, right=True)
    same_doc = doc[:, None] == doc[None, :]
    causal = torch.ones(total, total, dtype=torch.bool, device=cu_seqlens.device).tril()
    return same_doc & causal


@lru_cache(maxsize=1)
def _flash_varlen():
    """torch's flash ``varlen_attn`` and the keywords this torch names causality and GQA with (2.10 took
    ``is_causal``, later versions ``window_size``; ``enable_gqa`` came later still); None where it is absent."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    names = inspect.signature(varlen_attn).parameters
    causal = {"window_size": (-1, 0)} if "window_size" in names else {"is_causal": True}
    return varlen_attn, causal, "enable_gqa" in names


def packed_uses_flash(query: torch.Tensor, dropout: float) -> bool:
    """Whether a packed row takes the flash varlen kernel (CUDA, half precision, no dropout, a head size flash
    attention takes) or the dense mask."""
    half = query.dtype in (torch.bfloat16, torch.float16)
    head = query.shape[-1] % 8 == 0 and query.shape[-1] <= 256
    return query.is_cuda and half and head and dropout == 0 and bool(_flash_varlen())


def _varlen_bounds(cu_seqlens: torch.Tensor, total: int, device) -> tuple[torch.Tensor, int]:
    """The kernel's int32 document bounds, row padding past ``cu_seqlens[-1]`` as one more document, and the longest
    document (two host synchronisations, once per layout)."""
    cu = cu_seqlens.to(device=device, dtype=torch.int32)
    if int(cu[-1]) < total:
        cu = torch.cat([cu, cu.new_tensor([total])])
    return cu, int((cu[1:] - cu[:-1]).max())


def varlen_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                            scale: Optional[float]) -> torch.Tensor:
    """Causal attention within each document of a packed row with flash ``varlen_attn`` (CUDA, bf16/fp16).

    ``q [t, np, hn]``, ``k``/``v [t, ng, hn]`` -> ``[t, np * hn]``. Row padding past ``cu_seqlens[-1]`` is one more
    document, as in :func:`block_causal_mask`.
    """
    varlen_attn, causal, takes_gqa = _flash_varlen()
    total = q.shape[0]
    cu, longest = _LAYOUTS.get(cu_seqlens, ("varlen", total, str(q.device)),
                               lambda: _varlen_bounds(cu_seqlens, total, q.device))
    groups = {"enable_gqa": True} if takes_gqa else {}
    if not takes_gqa and k.shape[1] != q.shape[1]:
        k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], 1) for x in (k, v))
    q, k, v = (x.contiguous() for x in (q, k, v))
    out = varlen_attn(q, k, v, cu, cu, longest, longest, scale=scale, **causal, **groups)
    return out.reshape(total, -1)


class SDPACoreAttention(DotProductAttention):
    """``DotProductAttention`` with the same constructor (plus ``rope_theta``), computing attention with SDPA."""

    def __init__(self, *args, rope_theta: Optional[float] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.rope = RopeTables(self.config.kv_channels, rope_theta) if rope_theta else None

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type=None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise NotImplementedError("attention_bias is not supported by SDPACoreAttention")
        dropout = self.attention_dropout.p if self.training else 0.0
        if dropout > 0 and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return self._attend(query, key, value, attention_mask, packed_seq_params, dropout)
        return self._attend(query, key, value, attention_mask, packed_seq_params, dropout)

    def _rotary(self, query, key, cu, position_dim: int):
        """Rotate query and key, whose positions run along ``position_dim``: 0 for thd ``[t, heads, hn]``, 2 for
        ``[b, heads, s, hn]``. The rotation writes a fresh contiguous tensor, so the latter reaches SDPA with each
        head's rows in order rather than megatron's ``[s, b, heads, hn]`` seen through a permute (faster for SDPA's
        CPU kernels at small sizes)."""
        if self.rope is None:
            return query, key
        cos, sin = self.rope(cu, query.shape[position_dim], query.dtype, query.device)
        shape = cos.shape[:1] + (1,) * (query.dim() - position_dim - 2) + cos.shape[1:]  # [t, 1, d/2] or [s, d/2]
        cos, sin = cos.view(shape), sin.view(shape)
        return rotate_pair(query, key, cos, sin)

    def _attend(self, query, key, value, attention_mask, packed_seq_params, dropout):
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            cu = packed_seq_params.cu_seqlens_q_padded
            cu = packed_seq_params.cu_seqlens_q if cu is None else cu
            total = query.shape[0]
            query, key = self._rotary(query, key, cu, 0)
            if packed_uses_flash(query, dropout):
                return varlen_causal_attention(query, key, value, cu, self.softmax_scale)
            mask = _LAYOUTS.get(cu, ("mask", total), lambda: block_causal_mask(cu, total))
            q, k, v = (x.permute(1, 0, 2).unsqueeze(0) for x in (query, key, value))  # [1, heads, t, hn]
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, scale=self.softmax_scale, enable_gqa=True
            )
            return out[0].permute(1, 0, 2).reshape(total, -1)
        seq, batch = query.shape[:2]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, heads, s, hn]
        q, k = self._rotary(q, k, None, 2)
        if attention_mask is None:
            out = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=dropout, scale=self.softmax_scale, enable_gqa=True
            )
        else:  # megatron masks are True where attention is *not* allowed
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=~attention_mask, dropout_p=dropout, scale=self.softmax_scale, enable_gqa=True
            )
        return out.permute(2, 0, 1, 3).reshape(seq, batch, -1)
