"""The SigLIP2 vision transformer at native resolution, on packed sequences of several images.

Images of different sizes are packed into one token sequence ``[sum(N_i), C]`` with ``cu_seqlens`` marking
where each image starts; every linear layer runs once over the whole pack and attention stays inside each
image (:func:`varlen_attention`). Module names follow timm's ``VisionTransformer`` (``patch_embed.proj``,
``blocks.N.attn.qkv``, ``attn_pool.latent``, ...) so SigLIP2 state dicts map with prefix renames only.

Example: two images of 2x4 and 4x4 patches -> tokens ``[8 + 16, C]``, ``cu_seqlens = [0, 8, 24]``.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import nn

from viq_mllm.viq.config import ViQConfig


def cu_seqlens_of(lengths: list[int], device=None) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.long, device=device)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Bidirectional attention within each segment. ``q, k, v: [T, heads, d]`` -> ``[T, heads, d]``.

    Segments of equal length run as one batched SDPA call (no T x T mask, no wasted FLOPs across images).
    """
    bounds = cu_seqlens.tolist()
    groups: dict[int, list[int]] = defaultdict(list)
    for i in range(len(bounds) - 1):
        groups[bounds[i + 1] - bounds[i]].append(i)
    pieces: list[torch.Tensor] = [q.new_empty(0)] * (len(bounds) - 1)
    for length, members in groups.items():
        def stack(x):
            return torch.stack([x[bounds[i] : bounds[i] + length] for i in members]).transpose(1, 2)

        out = F.scaled_dot_product_attention(stack(q), stack(k), stack(v)).transpose(1, 2)
        for j, i in enumerate(members):
            pieces[i] = out[j]
    return torch.cat(pieces)


def resize_positions(table: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A learned ``[1, G*G, C]`` table resized bilinearly (align_corners=False) to ``rows x cols`` -> ``[rows*cols, C]``.

    Returned unchanged when the grid is ``G x G``.
    """
    g = int(round(table.shape[1] ** 0.5))
    grid = table.view(1, g, g, -1).permute(0, 3, 1, 2)
    if (rows, cols) != (g, g):
        grid = F.interpolate(grid.float(), size=(rows, cols), mode="bilinear", align_corners=False)
    return grid[0].permute(1, 2, 0).reshape(rows * cols, -1).to(table.dtype)


def positions_for(table: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
    """The resized position table of every image of a pack, ``[sum(rows * cols), C]``; each distinct grid is
    resized once."""
    resized = {grid: resize_positions(table, *grid) for grid in dict.fromkeys(grids)}
    return torch.cat([resized[grid] for grid in grids])


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, out: int | None = None, gelu: str = "exact"):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, out or dim)
        self.approximate = "tanh" if gelu == "tanh" else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).view(x.shape[0], 3, self.heads, -1).unbind(1)
        return self.proj(varlen_attention(q, k, v, cu_seqlens).reshape(x.shape[0], -1))


class Block(nn.Module):
    """Pre-LN transformer block (LayerNorm eps 1e-6, qkv bias, no LayerScale)."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int, gelu: str = "exact"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp_hidden, gelu=gelu)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cu_seqlens)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, width: int, patch: int):
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(3, width, kernel_size=patch, stride=patch)

    def forward(self, pixels: list[torch.Tensor]) -> torch.Tensor:
        """List of ``[3, H, W]`` -> ``[sum(N_i), C]``; one matmul for the whole pack (same as the conv)."""
        p = self.patch
        flat = [
            img.unfold(1, p, p).unfold(2, p, p).permute(1, 2, 0, 3, 4).reshape(-1, 3 * p * p) for img in pixels
        ]
        weight = self.proj.weight.reshape(self.proj.out_channels, -1)
        return F.linear(torch.cat(flat).to(weight.dtype), weight, self.proj.bias)


class AttentionPool(nn.Module):
    """timm's ``AttentionPoolLatent`` (MAP head): one learned query attends over an image's tokens."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int, gelu: str = "exact"):
        super().__init__()
        self.heads = heads
        self.latent = nn.Parameter(torch.randn(1, 1, dim) * dim**-0.5)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp_hidden, gelu=gelu)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """``[T, C]`` packed -> ``[num_images, C]``."""
        bounds = cu_seqlens.tolist()
        q = self.q(self.latent[0]).view(1, self.heads, -1).transpose(0, 1)  # [heads, 1, d]
        k, v = self.kv(x).view(x.shape[0], 2, self.heads, -1).unbind(1)
        pooled = []
        for a, b in zip(bounds[:-1], bounds[1:]):
            out = F.scaled_dot_product_attention(q, k[a:b].transpose(0, 1), v[a:b].transpose(0, 1))
            pooled.append(out.transpose(0, 1).reshape(1, -1))
        y = self.proj(torch.cat(pooled))
        return y + self.mlp(self.norm(y))


class VisionTransformer(nn.Module):
    """SigLIP2 trunk with a resizable position table. ``forward`` returns the raw last-block output."""

    def __init__(self, cfg: ViQConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg.width, cfg.patch)
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.pos_grid * cfg.pos_grid, cfg.width) * 0.02)
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads, cfg.mlp_hidden, cfg.vit_gelu) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width, eps=1e-6)
        self.attn_pool = AttentionPool(cfg.width, cfg.heads, cfg.mlp_hidden, cfg.vit_gelu)

    def forward(self, pixels: list[torch.Tensor], grids: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """List of ``[3, H, W]`` (sides multiples of 16) -> (tokens ``[sum(N_i), C]``, cu_seqlens)."""
        x = self.patch_embed(pixels) + positions_for(self.pos_embed, grids)
        cu = cu_seqlens_of([r * c for r, c in grids], device=x.device)
        for block in self.blocks:
            x = block(x, cu)
        return x, cu

    def pooled(self, tokens: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """Final LayerNorm + MAP head: one vector per image (the distillation target / student vector)."""
        return self.attn_pool(self.norm(tokens), cu_seqlens)
