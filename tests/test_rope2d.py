"""Golden-angle 2D RoPE against the formulas of the authors' release, written out independently."""

import math

import torch

from viq_mllm.viq.rope2d import apply_rope, frequencies, grid_angles


def test_frequencies_of_the_release_head():
    omega = frequencies(128)
    assert (omega[:32] == 0).all() and (omega[32:] > 0).all()
    assert math.isclose(omega[32], 0.2) and math.isclose(omega[-1], 20.0)  # the release's 0.2 -> 20 log range
    assert math.isclose(omega[33] / omega[32], 100 ** (1 / 95))


def test_angles_match_the_formula_elementwise():
    rows, cols, heads, dim = 4, 6, 4, 16
    angles = grid_angles(rows, cols, heads, dim)
    assert angles.shape == (rows * cols, heads, dim // 2) and angles.dtype == torch.float32
    omega = frequencies(dim // 2)
    golden = math.pi * (math.sqrt(5) - 1) / 2
    for r in range(rows):
        for c in range(cols):
            x = -math.sqrt(cols / rows) + 2 * math.sqrt(cols / rows) * c / (cols - 1)
            y = -math.sqrt(rows / cols) + 2 * math.sqrt(rows / cols) * r / (rows - 1)
            for h in range(heads):
                for f in range(dim // 2):
                    phi = (dim // 2 * h + f) * golden
                    expected = float(omega[f]) * (x * math.cos(phi) + y * math.sin(phi))
                    assert math.isclose(angles[r * cols + c, h, f], expected, rel_tol=1e-5, abs_tol=1e-5)


def test_rotation_is_relative_and_norm_preserving():
    """q.k after rotation depends only on the difference of the angles (i.e. of the positions)."""
    torch.manual_seed(0)
    q, k = torch.randn(1, 4, 32), torch.randn(1, 4, 32)
    a, b, shift = torch.rand(1, 4, 16) * 5, torch.rand(1, 4, 16) * 5, torch.rand(1, 4, 16) * 5
    dot = (apply_rope(q, a) * apply_rope(k, b)).sum(-1)
    shifted = (apply_rope(q, a + shift) * apply_rope(k, b + shift)).sum(-1)
    torch.testing.assert_close(dot, shifted, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(apply_rope(q, a).norm(dim=-1), q.norm(dim=-1))


def test_bf16_input_rotated_with_fp32_angles():
    angles = grid_angles(64, 64, 4, 256)
    assert angles.abs().max() > 20  # large angles, where bf16 angles would be off by ~0.1 rad
    q = torch.randn(64 * 64, 4, 256)
    exact = apply_rope(q, angles)
    large = (angles.abs() > 10).repeat(1, 1, 2)  # channels whose angle bf16 cannot hold to 0.03 rad
    ours = (apply_rope(q.bfloat16(), angles).float() - exact)[large].abs().mean()
    release = (apply_rope(q.bfloat16(), angles.bfloat16().float()).float() - exact)[large].abs().mean()
    assert ours < release / 3, (ours, release)  # the release's bf16 angles (bug 5) are the larger error
