"""FSQ against the formulas of the authors' release (bounded tanh, rounding, mixed-radix index with the first level
least significant; docs/concepts.md), exhaustively for every preset."""

import math

import numpy as np
import pytest
import torch

from viq_mllm.viq import FSQ, PRESETS

PAPER_SIZES = {"2k": 2304, "4k": 4096, "8k": 8192, "16k": 15360, "64k": 64000}


@pytest.mark.parametrize("preset", list(PRESETS))
def test_indices_codes_bijection_exhaustive(preset):
    fsq = FSQ(PRESETS[preset])
    assert fsq.codebook_size == PAPER_SIZES[preset]
    every = torch.arange(fsq.codebook_size)
    codes = fsq.indices_to_codes(every)
    assert torch.equal(fsq.codes_to_indices(codes), every)
    assert len({tuple(c) for c in codes.tolist()}) == fsq.codebook_size
    assert codes.min() == -1 and codes.max() <= 1


def reference_fsq(z: np.ndarray, levels) -> tuple[np.ndarray, np.ndarray]:
    """The reference's per-channel formulas, written out in numpy (float64)."""
    codes, index, radix = np.zeros_like(z), np.zeros(z.shape[:-1], dtype=np.int64), 1
    for j, level in enumerate(levels):
        a = (level - 1) * (1 + 1e-3) / 2
        o = 0.5 if level % 2 == 0 else 0.0
        s = math.atanh(o / a)
        b = np.tanh(z[..., j] + s) * a - o
        r = np.round(b)
        codes[..., j] = r / (level // 2)
        index += (r + level // 2).astype(np.int64) * radix
        radix *= level
    return codes, index


@pytest.mark.parametrize("preset", ["2k", "16k", "64k"])
def test_forward_matches_reference_formulas(preset):
    levels = PRESETS[preset]
    z = torch.randn(4000, len(levels), generator=torch.Generator().manual_seed(0)) * 2
    quantized, indices = FSQ(levels)(z)
    ref_codes, ref_index = reference_fsq(z.double().numpy(), levels)
    np.testing.assert_allclose(quantized.numpy(), ref_codes, atol=1e-6)
    np.testing.assert_array_equal(indices.numpy(), ref_index)
    # every level of every channel is reachable
    for j, level in enumerate(levels):
        assert len(np.unique(ref_codes[:, j])) == level


def test_16k_mixed_radix_first_level_least_significant():
    fsq = FSQ(PRESETS["16k"])
    assert fsq.basis.tolist() == [1, 8, 64, 512, 3072]
    # bumping channel 0 by one level moves the index by 1, channel 4 by 3072
    base = fsq.indices_to_codes(torch.tensor(0))
    for channel, step in enumerate([1, 8, 64, 512, 3072]):
        code = base.clone()
        code[channel] += 1 / (PRESETS["16k"][channel] // 2)
        assert int(fsq.codes_to_indices(code)) == step


def test_straight_through_gradient():
    fsq = FSQ(PRESETS["8k"])
    z = torch.randn(64, 5, requires_grad=True)
    quantized, _ = fsq(z)
    quantized.sum().backward()
    # d/dz of round_ste(tanh(z + s) * a - o) / half = a * (1 - tanh^2) / half
    levels = torch.tensor(PRESETS["8k"], dtype=torch.float32)
    a = (levels - 1) * (1 + 1e-3) / 2
    s = torch.atanh(torch.where(levels % 2 == 0, 0.5, 0.0) / a)
    expected = a * (1 - torch.tanh(z.detach() + s) ** 2) / (levels // 2)
    torch.testing.assert_close(z.grad, expected)


def test_out_of_range_indices_are_refused():
    with pytest.raises(ValueError, match=r"out of range \[0, 2304\)"):
        FSQ(PRESETS["2k"]).indices_to_codes(torch.tensor([2304]))
