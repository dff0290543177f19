"""The stage 2-1 proximal bottleneck: Linear -> L-infinity projection onto the unit hypercube surface -> Linear.

``P(t) = t / max(||t||_inf, 1e-6)`` pushes every token onto the surface of ``[-1, 1]^m`` (its largest
coordinate becomes exactly +-1). It is fully differentiable, has no loss term, and progressively compacts
the feature space before the FSQ stage replaces it (as in the authors' release; docs/tokenizer.md).
"""

from __future__ import annotations

import torch
from torch import nn


def linf_project(t: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return t / t.abs().amax(dim=-1, keepdim=True).clamp_min(eps)


class ProximalBottleneck(nn.Module):
    """``[..., C] -> [..., C]`` through an ``m``-wide hypercube surface (m = 32 / 128 / 256 / 512)."""

    def __init__(self, dim: int, width: int):
        super().__init__()
        self.project_in = nn.Linear(dim, width)
        self.project_out = nn.Linear(width, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project_out(linf_project(self.project_in(x)))
