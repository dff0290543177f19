"""The 2x2 pooling projector into the LLM (the release's ``OryxMLPv2`` with ``REGIONAL_POOL=2x``).

Per image, ``x_low [h, w, C]``:

1. ``proj1``: Linear C -> D.
2. Normalised depth-wise pooling: each 2x2 window's 4 vectors ``v_i`` are scored from ``[v_i ; mean(v)]``
   (Linear 2D -> D, GELU, Linear D -> D); a softmax over the 4 positions, per channel, weights the sum.
3. GELU, ``proj2``: Linear D -> D.
4. A learned ``image_newline`` after every row of windows; ``image_begin`` first, ``image_end`` last.

An ``h x w`` grid (both even) gives ``(h/2)(w/2) + h/2 + 2`` LLM positions; e.g. 16 x 16 patches -> 74.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def visual_positions(rows: int, cols: int) -> int:
    return (rows // 2) * (cols // 2) + rows // 2 + 2


class PoolingProjector(nn.Module):
    def __init__(self, vision_dim: int, llm_dim: int, with_markers: bool = True):
        super().__init__()
        self.proj1 = nn.Linear(vision_dim, llm_dim)
        self.score = nn.Sequential(nn.Linear(2 * llm_dim, llm_dim), nn.GELU(), nn.Linear(llm_dim, llm_dim))
        self.proj2 = nn.Linear(llm_dim, llm_dim)
        self.with_markers = with_markers
        if with_markers:
            std = llm_dim**-0.5
            self.image_newline = nn.Parameter(torch.randn(llm_dim) * std)
            self.image_begin = nn.Parameter(torch.randn(llm_dim) * std)
            self.image_end = nn.Parameter(torch.randn(llm_dim) * std)

    def pool_windows(self, windows: torch.Tensor) -> torch.Tensor:
        """``[..., 4, C]`` (the 4 patches of each 2x2 window, row-major) -> ``[..., D]``."""
        x = self.proj1(windows)
        mean = x.mean(dim=-2, keepdim=True).expand_as(x)
        weights = self.score(torch.cat([x, mean], dim=-1)).softmax(dim=-2)
        return self.proj2(F.gelu((weights * x).sum(dim=-2)))

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        """``[h, w, C]`` -> ``[h/2, w/2, D]`` (no markers)."""
        h, w, c = features.shape
        if h % 2 or w % 2:
            raise ValueError(f"2x2 pooling needs an even patch grid, got {h} x {w}")
        windows = features.view(h // 2, 2, w // 2, 2, c).permute(0, 2, 1, 3, 4).reshape(h // 2, w // 2, 4, c)
        return self.pool_windows(windows)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``[h, w, C]`` -> ``[(h/2)(w/2) + h/2 + 2, D]`` with row-end, begin and end markers."""
        pooled = self.pool(features)
        if not self.with_markers:
            return pooled.reshape(-1, pooled.shape[-1])
        rows, cols, dim = pooled.shape
        newline = self.image_newline.view(1, 1, dim).expand(rows, 1, dim)
        body = torch.cat([pooled, newline], dim=1).reshape(-1, dim)
        return torch.cat([self.image_begin[None], body, self.image_end[None]])
