"""A light pixel decoder: per-patch features (from codes) -> RGB at 16 px per patch, no external VAE.

``x_low [T, C]`` -> Linear to the decoder width + a resizable learned position table -> ViT blocks with
per-image attention -> LayerNorm -> Linear to ``16 * 16 * 3`` -> depth-to-space per image.
Example: a 4 x 6 patch grid -> ``[3, 64, 96]`` pixels in about ``[-1, 1]``.
"""

from __future__ import annotations

import torch
from torch import nn

from viq_mllm.viq.config import ViQConfig
from viq_mllm.viq.vit import Block, positions_for


class PixelDecoder(nn.Module):
    def __init__(self, cfg: ViQConfig):
        super().__init__()
        w, p = cfg.decoder_width, cfg.patch
        self.patch = p
        self.proj_in = nn.Linear(cfg.width, w)
        self.pos_embed = nn.Parameter(torch.randn(1, 16 * 16, w) * 0.02)
        self.blocks = nn.ModuleList(Block(w, cfg.decoder_heads, 4 * w) for _ in range(cfg.decoder_depth))
        self.norm = nn.LayerNorm(w, eps=1e-6)
        self.proj_out = nn.Linear(w, 3 * p * p)

    def forward(self, features: torch.Tensor, cu_patches: torch.Tensor, grids: list[tuple[int, int]]) -> list[torch.Tensor]:
        """``[T, C]`` packed -> list of ``[3, 16 rows, 16 cols]`` images."""
        x = self.proj_in(features) + positions_for(self.pos_embed, grids)
        for block in self.blocks:
            x = block(x, cu_patches)
        patches = self.proj_out(self.norm(x))
        images, start, p = [], 0, self.patch
        for rows, cols in grids:
            chunk = patches[start : start + rows * cols].view(rows, cols, 3, p, p)
            images.append(chunk.permute(2, 0, 3, 1, 4).reshape(3, rows * p, cols * p))
            start += rows * cols
        return images
