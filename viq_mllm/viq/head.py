"""The position-aware, head-wise quantization head (the release's "low branch"), and its code embedder.

Encode direction, per packed sequence of ``T`` patches (``C`` = ViT width, ``d`` = FSQ levels)::

    ViT tokens [T, C] -> LayerNorm without affine -> pre_blocks (ViT blocks, per-image attention)
      -> expand MLP C -> 4C -> 4C, viewed as 4 sub-tokens per patch      [4T, C]  (patch p: rows 4p..4p+3)
      -> subtoken_mlp C -> C -> C
      -> rope_blocks: sub-code slot k is attention head k over the image's patches, 2D golden RoPE
      -> project_in C -> d -> FSQ                                         codes [4T, d], indices [4T]
      -> CodeEmbedder: project_out d -> C, merge 4 sub-tokens (4C -> 4C -> C), MLP + residual MLPs, affine
      -> x_low [T, C]   (the per-patch feature the LLM's projector sees)

``CodeEmbedder`` is the same module object inside the head, so ``embed(indices)`` reproduces the encoder's
``x_low`` exactly. With ``quantizer="proximal"`` (stage 2-1) the RoPE blocks and FSQ are replaced by the
L-infinity bottleneck (``proximal.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from viq_mllm.viq.config import ViQConfig
from viq_mllm.viq.fsq import FSQ
from viq_mllm.viq.proximal import ProximalBottleneck
from viq_mllm.viq.rope2d import grid_angles, rotate
from viq_mllm.viq.vit import Block, Mlp, varlen_attention


class HeadwiseRoPEAttention(nn.Module):
    """Each of the 4 sub-code slots is one attention head over the patches of its image (shared qkv)."""

    def __init__(self, dim: int, inner: int, slots: int):
        super().__init__()
        self.slots = slots
        self.decrease_dim = nn.Linear(dim, inner) if dim != inner else nn.Identity()
        self.qkv = nn.Linear(inner, 3 * inner)
        self.proj = nn.Linear(inner, inner)
        self.increase_dim = nn.Linear(inner, dim) if dim != inner else nn.Identity()

    def forward(self, x: torch.Tensor, cu_patches: torch.Tensor, rope: tuple) -> torch.Tensor:
        """``x [4T, C]``, ``rope`` = cos and sin of the angles ``[T, 4, inner/2]`` -> ``[4T, C]``."""
        patches = x.shape[0] // self.slots
        q, k, v = self.qkv(self.decrease_dim(x)).view(patches, self.slots, 3, -1).unbind(2)
        q, k = rotate(q, *rope), rotate(k, *rope)
        out = varlen_attention(q, k, v, cu_patches).reshape(x.shape[0], -1)
        return self.increase_dim(self.proj(out))


class HeadwiseRoPEBlock(nn.Module):
    def __init__(self, dim: int, inner: int, slots: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = HeadwiseRoPEAttention(dim, inner, slots)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim)

    def forward(self, x, cu_patches, rope):
        x = x + self.attn(self.norm1(x), cu_patches, rope)
        return x + self.mlp(self.norm2(x))


class ResidualMlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, hidden)

    def forward(self, x):
        return x + self.mlp(self.norm(x))


class PostQuant(nn.Module):
    """4 sub-tokens -> one patch feature: merge MLP (4C -> 4C -> C), then ``layers`` = [MLP C -> C -> C,
    residual MLPs ...] (the release's "resualmlp-light"), then a learned affine."""

    def __init__(self, dim: int, slots: int, resmlps: int):
        super().__init__()
        self.slots = slots
        self.merge = Mlp(slots * dim, slots * dim, dim)
        self.layers = nn.ModuleList([Mlp(dim, dim), *(ResidualMlp(dim, 2 * dim) for _ in range(resmlps))])
        self.affine_weight = nn.Parameter(torch.ones(dim))
        self.affine_bias = nn.Parameter(torch.zeros(dim))

    def forward(self, sub: torch.Tensor) -> torch.Tensor:
        """``[4T, C] -> [T, C]``."""
        x = self.merge(sub.reshape(sub.shape[0] // self.slots, -1))
        for layer in self.layers:
            x = layer(x)
        return x * self.affine_weight + self.affine_bias


class CodeEmbedder(nn.Module):
    """FSQ indices -> per-patch features, identical to the encoder's ``x_low`` (the paper's code embedder)."""

    def __init__(self, fsq: FSQ, dim: int, post: PostQuant):
        super().__init__()
        self.fsq = fsq
        self.project_out = nn.Linear(fsq.dim, dim)
        self.post = post

    def from_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Normalised codes ``[4T, d]`` -> ``[T, C]``."""
        return self.post(self.project_out(codes.to(self.project_out.weight.dtype)))

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices ``[4T]`` (4 per patch, patch-major) -> ``[T, C]``."""
        if indices.numel() % 4:
            raise ValueError(f"expected 4 codes per patch, got {indices.numel()} codes")
        return self.from_codes(self.fsq.indices_to_codes(indices.reshape(-1)))


@dataclass
class HeadOutput:
    features: torch.Tensor  # x_low [T, C]
    indices: Optional[torch.Tensor]  # [4T] with FSQ, None with the proximal bottleneck
    codes: Optional[torch.Tensor]  # normalised FSQ codes [4T, d] (straight-through gradient)


class QuantHead(nn.Module):
    def __init__(self, cfg: ViQConfig):
        super().__init__()
        c, slots = cfg.width, cfg.subtokens
        self.cfg = cfg
        self.pre_blocks = nn.ModuleList(Block(c, cfg.heads, cfg.mlp_hidden) for _ in range(cfg.pre_blocks))
        self.expand = Mlp(c, slots * c, slots * c)
        self.subtoken_mlp = Mlp(c, c)
        post = PostQuant(c, slots, cfg.post_resmlps)
        if cfg.quantizer == "fsq":
            self.rope_blocks = nn.ModuleList(
                HeadwiseRoPEBlock(c, cfg.head_rope_dim, slots) for _ in range(cfg.rope_blocks)
            )
            self.project_in = nn.Linear(c, len(cfg.fsq_levels))
            self.embedder = CodeEmbedder(FSQ(cfg.fsq_levels), c, post)
        else:
            self.bottleneck = ProximalBottleneck(c, cfg.proximal_width)
            self.post = post

    def forward(self, tokens: torch.Tensor, cu_patches: torch.Tensor, grids: list[tuple[int, int]]) -> HeadOutput:
        if self.cfg.quantizer == "proximal":
            return HeadOutput(self.post(self.bottleneck(self._subtokens(tokens, cu_patches))), None, None)
        codes, indices = self.quantize(tokens, cu_patches, grids)
        return HeadOutput(self.embedder.from_codes(codes), indices, codes)

    def quantize(self, tokens: torch.Tensor, cu_patches: torch.Tensor, grids: list[tuple[int, int]]):
        """ViT tokens ``[T, C]`` -> (normalised FSQ codes ``[4T, d]``, indices ``[4T]``); what ``encode`` needs,
        without the code embedder."""
        sub = self._subtokens(tokens, cu_patches)
        if self.rope_blocks:
            angles = torch.cat([grid_angles(r, c, self.cfg.subtokens, self.cfg.head_rope_dim) for r, c in grids])
            angles = angles.to(sub.device)
            rope = (torch.cos(angles), torch.sin(angles))
            for block in self.rope_blocks:
                sub = block(sub, cu_patches, rope)
        return self.embedder.fsq(self.project_in(sub))

    def _subtokens(self, tokens: torch.Tensor, cu_patches: torch.Tensor) -> torch.Tensor:
        """Normalise, pre-blocks, 1 -> 4 expansion: ``[T, C] -> [4T, C]``."""
        x = F.layer_norm(tokens, tokens.shape[-1:], eps=1e-6)
        for block in self.pre_blocks:
            x = block(x, cu_patches)
        return self.subtoken_mlp(self.expand(x).reshape(x.shape[0] * self.cfg.subtokens, -1))
