"""ViQTokenizer on a tiny random model of the real architecture."""

import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from viq_mllm.viq import PRESETS, PoolingProjector, ViQTokenizer, visual_positions
from viq_mllm.viq.preprocess import ImageInputError
from viq_mllm.viq.proximal import linf_project
from viq_mllm.viq.vit import varlen_attention

SIZES = [(17, 17), (37, 211), (64, 64), (300, 451), (40, 1200)]


@pytest.fixture(scope="module")
def tok():
    return ViQTokenizer.from_config("tiny", preset="16k", seed=0)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in SIZES]


def test_encode_gives_even_grids_and_4hw_codes_in_range(tok, images):
    codes = tok.encode(images)
    assert len(codes) == len(images)
    for grid in codes:
        rows, cols, sub = grid.shape
        assert rows % 2 == 0 and cols % 2 == 0 and sub == 4 and grid.dtype == torch.int64
        assert grid.numel() == 4 * rows * cols
        assert grid.min() >= 0 and grid.max() < 15360


def test_packed_batch_equals_one_at_a_time(tok, images):
    packed = tok.encode(images)
    alone = [tok.encode([image])[0] for image in images]
    for a, b in zip(packed, alone):
        assert torch.equal(a, b)


def test_varlen_attention_equals_masked_full_attention():
    torch.manual_seed(0)
    q, k, v = (torch.randn(11, 2, 8) for _ in range(3))
    cu = torch.tensor([0, 4, 8, 11])  # two segments of 4 (batched together) and one of 3
    doc = torch.tensor([0] * 4 + [1] * 4 + [2] * 3)
    mask = doc[:, None] == doc[None, :]
    scores = torch.einsum("qhd,khd->hqk", q, k) / 8**0.5
    expected = torch.einsum("hqk,khd->qhd", scores.masked_fill(~mask, float("-inf")).softmax(-1), v)
    torch.testing.assert_close(varlen_attention(q, k, v, cu), expected, rtol=1e-5, atol=1e-6)


def test_embed_of_codes_equals_the_heads_quantized_features(tok, images):
    items = tok.preprocess(images)
    pixels, grids = [it.pixels for it in items], [it.grid for it in items]
    with torch.no_grad():
        _, _, out = tok.forward_packed(pixels, grids)
    embedded = torch.cat([f.reshape(-1, f.shape[-1]) for f in tok.embed(tok.encode(images))])
    torch.testing.assert_close(embedded, out.features, rtol=1e-5, atol=1e-5)


def test_straight_through_gradient_reaches_the_encoder(tok, images):
    model = ViQTokenizer.from_config("tiny", seed=1).train()
    items = model.preprocess(images[:2])
    _, _, out = model.forward_packed([it.pixels for it in items], [it.grid for it in items])
    out.features.square().mean().backward()
    for name in ("vit.patch_embed.proj.weight", "vit.blocks.0.attn.qkv.weight", "head.project_in.weight",
                 "head.rope_blocks.0.attn.qkv.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_proximal_bottleneck_lands_on_the_hypercube_surface():
    t = torch.randn(100, 32) * 5
    projected = linf_project(t)
    torch.testing.assert_close(projected.abs().amax(-1), torch.ones(100))
    model = ViQTokenizer.from_config("tiny", quantizer="proximal", proximal_width=32)
    assert not hasattr(model.head, "rope_blocks")
    inner = model.head.bottleneck.project_in(torch.randn(8, 64))
    assert torch.allclose(linf_project(inner).abs().amax(-1), torch.ones(8))
    with pytest.raises(RuntimeError, match="proximal"):
        model.encode([np.zeros((32, 32, 3), np.uint8)])


def test_save_load_reproduces_codes_and_fingerprint(tok, images, tmp_path):
    tok.save_pretrained(tmp_path / "viq")
    again = ViQTokenizer.from_pretrained(tmp_path / "viq")
    assert again.fingerprint == tok.fingerprint
    for a, b in zip(tok.encode(images), again.encode(images)):
        assert torch.equal(a, b)
    other = ViQTokenizer.from_config("tiny", preset="16k", seed=5)
    assert other.fingerprint != tok.fingerprint
    assert ViQTokenizer.from_config("tiny", preset="8k", seed=0).fingerprint != tok.fingerprint


def test_corrupted_weights_are_refused(tok, tmp_path):
    from safetensors.torch import load_file, save_file

    path = tok.save_pretrained(tmp_path / "viq") / "model.safetensors"
    state = load_file(str(path))
    state["head.project_in.bias"] = state["head.project_in.bias"] + 1
    save_file(state, str(path))
    with pytest.raises(ValueError, match="weights do not match config.json"):
        ViQTokenizer.from_pretrained(tmp_path / "viq")


def test_corrupt_inputs_raise_naming_the_input(tok, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(ImageInputError, match="broken.jpg"):
        tok.encode([bad])
    empty = tmp_path / "zero.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageInputError, match="zero.png: file is empty"):
        tok.encode([empty])


def test_decode_gives_16_px_per_patch(tok, images):
    codes = tok.encode(images[:2])
    for image, grid in zip(tok.decode(codes), codes):
        assert image.size == (grid.shape[1] * 16, grid.shape[0] * 16)


@pytest.mark.parametrize("side, positions", [(256, 74), (384, 158), (768, 602), (1024, 1058)])
def test_visual_positions_table_of_the_reference(side, positions):
    assert visual_positions(side // 16, side // 16) == positions
    assert PoolingProjector(8, 12)(torch.randn(side // 16, side // 16, 8)).shape == (positions, 12)


def reference_pooling(proj: PoolingProjector, feats: torch.Tensor) -> torch.Tensor:
    """The projector written out from its definition with the raw weight matrices, window by window: the 4 patches
    of window (r, c) are (2r, 2c), (2r, 2c+1), (2r+1, 2c), (2r+1, 2c+1); each is scored from [x_k; mean x];
    a softmax over k, channel by channel, weights the sum; begin, each row of windows then a row end, end."""
    def linear(layer, v):
        return v @ layer.weight.T + layer.bias

    gelu = F.gelu
    out = [proj.image_begin]
    for r in range(feats.shape[0] // 2):
        for c in range(feats.shape[1] // 2):
            x = [linear(proj.proj1, feats[2 * r + i, 2 * c + j]) for i in (0, 1) for j in (0, 1)]
            mean = sum(x) / 4
            scores = [linear(proj.score[2], gelu(linear(proj.score[0], torch.cat([xk, mean])))) for xk in x]
            exp = [torch.exp(s - torch.stack(scores).max(0).values) for s in scores]
            pooled = sum(e * xk for e, xk in zip(exp, x)) / sum(exp)
            out.append(linear(proj.proj2, gelu(pooled)))
        out.append(proj.image_newline)
    return torch.stack([*out, proj.image_end])


def test_pooling_is_a_per_channel_softmax_over_each_window():
    torch.manual_seed(0)
    proj = PoolingProjector(4, 6)
    feats = torch.randn(4, 6, 4)  # a 2 x 3 grid of windows
    ours = proj(feats)
    assert ours.shape == (visual_positions(4, 6), 6)
    torch.testing.assert_close(ours, reference_pooling(proj, feats))
    with pytest.raises(ValueError, match="even patch grid"):
        proj(torch.randn(3, 2, 4))


@pytest.mark.e2e
def test_the_tokenizer_never_imports_megatron():
    code = ("import sys, numpy as np; from viq_mllm.viq import ViQTokenizer; "
            "t = ViQTokenizer.from_config('tiny'); t.encode([np.zeros((40, 40, 3), np.uint8)]); "
            "assert not any(m.startswith('megatron') for m in sys.modules), 'megatron imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_fsq_presets_select_the_codebook():
    """The codebook sizes the paper names for its presets (2k / 4k / 8k / 16k / 64k), one FSQ channel per level."""
    paper = {"2k": 2304, "4k": 4096, "8k": 8192, "16k": 15360, "64k": 64000}
    assert set(PRESETS) == set(paper)
    for preset, size in paper.items():
        model = ViQTokenizer.from_config("tiny", preset=preset)
        assert model.head.embedder.fsq.codebook_size == size
        assert model.head.project_in.out_features == len(PRESETS[preset])