"""Finite scalar quantization (FSQ, Mentzer et al. 2023) with the ViQ presets.

Each of the ``d`` channels is bounded and rounded to one of ``L_j`` integer levels; a code is the tuple of
levels, indexed in mixed radix with the **first level least significant** (as the authors' release, so our
indices and their released weights agree)::

    >>> fsq = FSQ(PRESETS["16k"])                # levels [8, 8, 8, 6, 5], K = 15360
    >>> fsq.basis.tolist()
    [1, 8, 64, 512, 3072]
    >>> fsq.indices_to_codes(torch.tensor([0])).tolist()   # level 0 of every channel
    [[-1.0, -1.0, -1.0, -1.0, -1.0]]
    >>> fsq.codes_to_indices(fsq.indices_to_codes(torch.arange(fsq.codebook_size))).equal(torch.arange(15360))
    True

Per channel (fp32, autocast off): ``b = tanh(z + s) * a - o`` with ``a = (L - 1)(1 + 1e-3) / 2``,
``o = 0.5`` for even ``L`` else 0, ``s = atanh(o / a)``; ``r = round(b)`` with a straight-through gradient;
the normalised code is ``r / (L // 2)`` in ``[-1, 1]`` (asymmetric for even L: L=8 gives -1 ... 0.75).
"""

from __future__ import annotations

import math

import torch
from torch import nn

#: codebook presets of the paper: name -> levels (K = product of levels)
PRESETS: dict[str, tuple[int, ...]] = {
    "2k": (8, 8, 4, 3, 3),
    "4k": (8, 8, 4, 4, 4),
    "8k": (8, 8, 8, 4, 4),
    "16k": (8, 8, 8, 6, 5),
    "64k": (8, 8, 8, 5, 5, 5),
}


def levels_for(preset: str) -> tuple[int, ...]:
    if preset not in PRESETS:
        raise ValueError(f"unknown FSQ preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[preset]


class FSQ(nn.Module):
    """``forward(z [..., d]) -> (quantized [..., d] in [-1, 1], indices [...] int64)``."""

    def __init__(self, levels: tuple[int, ...] | list[int]):
        super().__init__()
        if not levels or any(int(level) < 2 for level in levels):
            raise ValueError(f"FSQ levels must all be >= 2, got {list(levels)}")
        self.levels_list = [int(level) for level in levels]
        levels_t = torch.tensor(self.levels_list, dtype=torch.int64)
        basis = torch.cumprod(torch.cat([torch.ones(1, dtype=torch.int64), levels_t[:-1]]), dim=0)
        self.register_buffer("levels", levels_t, persistent=False)
        self.register_buffer("basis", basis, persistent=False)
        self.register_buffer("half_levels", levels_t // 2, persistent=False)
        self.codebook_size = math.prod(self.levels_list)
        self.dim = len(self.levels_list)

    def bound(self, z: torch.Tensor) -> torch.Tensor:
        levels = self.levels.to(torch.float32)
        a = (levels - 1) * (1 + 1e-3) / 2
        o = torch.where(self.levels % 2 == 0, 0.5, 0.0)
        s = torch.atanh(o / a)
        return torch.tanh(z + s) * a - o

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if z.shape[-1] != self.dim:
            raise ValueError(f"FSQ with {self.dim} levels got input with last dim {z.shape[-1]}")
        with torch.autocast(device_type=z.device.type, enabled=False):
            bounded = self.bound(z.float())
            rounded = bounded + (torch.round(bounded) - bounded).detach()
            quantized = rounded / self.half_levels
            indices = self.codes_to_indices(quantized.detach())
        return quantized.to(z.dtype), indices

    def codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        """Normalised codes [..., d] -> mixed-radix indices [...] (first level least significant)."""
        digits = torch.round(codes.float() * self.half_levels + self.half_levels).to(torch.int64)
        return (digits * self.basis).sum(dim=-1)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices [...] -> normalised codes [..., d] in [-1, 1]."""
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.codebook_size):
            raise ValueError(
                f"FSQ index out of range [0, {self.codebook_size}): "
                f"min {int(indices.min())}, max {int(indices.max())}"
            )
        digits = (indices.long().unsqueeze(-1) // self.basis) % self.levels
        return (digits - self.half_levels).float() / self.half_levels
