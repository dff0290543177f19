"""The pair rotation of rotary position embeddings (RoPE), shared by the GPT's 1D RoPE
(``megatron_ext.model.attention``) and the ViQ head's golden-angle 2D RoPE (``viq_mllm.viq.rope2d``).

Channels ``i`` and ``i + d/2`` of the last dim form a pair (half-split, not interleaved) rotated by its angle:
``[x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin]``, with ``cos``/``sin`` broadcasting to ``x[..., :d/2]``.
Example: ``x [t, heads, 64]`` with ``cos, sin [t, 1, 32]`` (one angle per position and pair, shared by heads).
"""

from __future__ import annotations

import torch


class _Rotate(torch.autograd.Function):
    """The rotation of one or more tensors by the same angles; its backward is the rotation by the opposite angles.

    Writes each half of a fresh contiguous output with one multiply and one ``addcmul_`` (no temporaries, no
    concatenation) and saves only ``cos``/``sin``: on the strided query/key views of megatron's fused QKV output
    this is faster than the concatenating formula (docs/benchmarks.md). Query and key
    go through one node: one Python forward and backward instead of two, which a small model's step notices.
    """

    @staticmethod
    def forward(ctx, cos: torch.Tensor, sin: torch.Tensor, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.save_for_backward(cos, sin)
        return tuple(_Rotate.turn(x, cos, sin, 1.0) for x in xs)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return None, None, *(_Rotate.turn(g, cos, sin, -1.0) for g in grads)

    @staticmethod
    def turn(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        (x1, x2), (o1, o2) = x.chunk(2, dim=-1), out.chunk(2, dim=-1)
        torch.mul(x1, cos, out=o1).addcmul_(x2, sin, value=-sign)
        torch.mul(x2, cos, out=o2).addcmul_(x1, sin, value=sign)
        return out


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs ``(i, i + d/2)`` of ``x``'s last dim by the angles whose ``cos``/``sin`` are given, in
    ``x``'s dtype; differentiable in ``x`` (not in the angles)."""
    return _Rotate.apply(cos, sin, x)[0]


def rotate_pair(query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """:func:`rotate` of query and key by the same angles, as one autograd node. Returns (query, key)."""
    return _Rotate.apply(cos, sin, query, key)
