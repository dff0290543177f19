"""Golden-angle 2D RoPE of the head-wise quantization blocks, resolution-normalised.

Per head ``h`` (one per sub-code slot) and frequency pair ``f`` of ``F = head_dim / 2`` pairs:

- the first ``round(F / 4)`` pairs have frequency 0 (position-free channels); the others are log-spaced,
  ``omega_j = 0.2 * 100 ** (j / (n - 1))`` (0.2 -> 20);
- each pair rotates along its own direction ``phi = (F * h + f) * pi * (sqrt(5) - 1) / 2`` (golden angle);
- an ``rows x cols`` grid spans an area-4 box of the image's aspect:
  ``x_c = linspace(-sqrt(cols/rows), +sqrt(cols/rows), cols)``, ``y_r = linspace(-sqrt(rows/cols), ..., rows)``;
- ``theta = omega * (x cos(phi) + y sin(phi))``; channels ``i`` and ``i + F`` are rotated as a pair.

Angles, cos and sin stay in fp32 whatever the activation dtype (the release casts angles up to ~28 rad to
bf16 first, a 0.125 rad error). Example: a 2 x 3 grid, 4 heads, head_dim 8 -> angles of shape (6, 4, 4).
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from viq_mllm import rotary

GOLDEN = math.pi * (math.sqrt(5.0) - 1.0) / 2.0


def frequencies(num_pairs: int) -> torch.Tensor:
    """[F] frequencies: zeros for the first quarter, log-spaced 0.2 -> 20 for the rest (fp64 for exactness)."""
    n_zero = round(0.25 * num_pairs)
    n_rot = num_pairs - n_zero
    steps = torch.arange(n_rot, dtype=torch.float64) / max(n_rot - 1, 1)
    return torch.cat([torch.zeros(n_zero, dtype=torch.float64), 0.2 * 100.0**steps])


@lru_cache(maxsize=512)
def grid_angles(rows: int, cols: int, num_heads: int, head_dim: int) -> torch.Tensor:
    """[rows * cols, heads, head_dim / 2] fp32 rotation angles for a patch grid (row-major patches).

    A pure function of its arguments, cached (callers must not modify the returned tensor)."""
    if head_dim % 2:
        raise ValueError(f"2D RoPE needs an even head_dim, got {head_dim}")
    pairs = head_dim // 2
    omega = frequencies(pairs)
    index = torch.arange(num_heads, dtype=torch.float64)[:, None] * pairs + torch.arange(pairs, dtype=torch.float64)
    phi = index * GOLDEN  # [heads, F]
    x = torch.linspace(-math.sqrt(cols / rows), math.sqrt(cols / rows), cols, dtype=torch.float64)
    y = torch.linspace(-math.sqrt(rows / cols), math.sqrt(rows / cols), rows, dtype=torch.float64)
    yy, xx = torch.meshgrid(y, x, indexing="ij")
    pos = torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=-1)  # [N, 2]
    direction = torch.stack([torch.cos(phi), torch.sin(phi)], dim=-1)  # [heads, F, 2]
    theta = torch.einsum("nc,hfc->nhf", pos, direction) * omega
    return theta.to(torch.float32)


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [N, heads, head_dim]`` by ``angles [N, heads, head_dim/2]`` (half-split pairing), in fp32."""
    return rotate(x, torch.cos(angles), torch.sin(angles))


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """:func:`apply_rope` with the angles' cos and sin computed once (shared by q, k and every block), in fp32."""
    return rotary.rotate(x.float(), cos, sin).to(x.dtype)
