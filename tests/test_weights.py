"""Strict import of SigLIP2 and authors' checkpoints, from synthetic state dicts with the real key names.

The synthetic dicts are written from timm's / open_clip's / the release's naming (not from our mapping
table), at the tiny shapes.
"""

import pytest
import torch

from viq_mllm.viq import ViQTokenizer
from viq_mllm.viq.weights import WeightImportError, import_weights

C, MLP, DEPTH = 64, 256, 2


def linear(prefix, out_f, in_f):
    return {f"{prefix}.weight": torch.randn(out_f, in_f), f"{prefix}.bias": torch.randn(out_f)}


def norm(prefix, dim):
    return {f"{prefix}.weight": torch.randn(dim), f"{prefix}.bias": torch.randn(dim)}


def timm_block(prefix, dim=C, hidden=MLP):
    return {**norm(f"{prefix}.norm1", dim), **linear(f"{prefix}.attn.qkv", 3 * dim, dim),
            **linear(f"{prefix}.attn.proj", dim, dim), **norm(f"{prefix}.norm2", dim),
            **linear(f"{prefix}.mlp.fc1", hidden, dim), **linear(f"{prefix}.mlp.fc2", dim, hidden)}


def open_clip_siglip2(grid=24):
    trunk = {"patch_embed.proj.weight": torch.randn(C, 3, 16, 16), "patch_embed.proj.bias": torch.randn(C),
             "pos_embed": torch.randn(1, grid * grid, C), **norm("norm", C),
             "attn_pool.latent": torch.randn(1, 1, C), **linear("attn_pool.q", C, C),
             **linear("attn_pool.kv", 2 * C, C), **linear("attn_pool.proj", C, C), **norm("attn_pool.norm", C),
             **linear("attn_pool.mlp.fc1", MLP, C), **linear("attn_pool.mlp.fc2", C, MLP)}
    for i in range(DEPTH):
        trunk.update(timm_block(f"blocks.{i}"))
    state = {f"visual.trunk.{k}": v for k, v in trunk.items()}
    state.update({"text.token_embedding.weight": torch.randn(10, C), "logit_scale": torch.ones(1)})
    return state


def test_siglip2_open_clip_import_fills_the_whole_trunk():
    model = ViQTokenizer.from_config("tiny")
    source = open_clip_siglip2()
    report = import_weights(model, source, "siglip2_open_clip")
    assert report.ok and report.resized == ["vit.pos_embed"]
    assert len(report.loaded) == len([k for k in model.state_dict() if k.startswith("vit.")])
    assert set(report.ignored) == {"text.token_embedding.weight", "logit_scale"}
    assert torch.equal(model.vit.blocks[1].attn.qkv.weight, source["visual.trunk.blocks.1.attn.qkv.weight"])
    # 24 x 24 -> 16 x 16 bicubic: the corners of the table stay close to the source's corners
    resized = model.vit.pos_embed.view(16, 16, C)
    original = source["visual.trunk.pos_embed"].view(24, 24, C)
    assert resized.shape == (16, 16, C) and not torch.equal(resized[0, 0], original[0, 0])


def test_missing_unexpected_and_mismatched_keys_are_all_reported():
    model = ViQTokenizer.from_config("tiny")
    before = model.vit.blocks[0].attn.qkv.weight.clone()
    source = open_clip_siglip2()
    del source["visual.trunk.blocks.1.mlp.fc2.bias"]
    source["visual.trunk.blocks.0.attn.qkv.weight"] = torch.randn(3 * C, C + 1)
    source["visual.trunk.blocks.0.ls1.gamma"] = torch.randn(C)
    with pytest.raises(WeightImportError) as err:
        import_weights(model, source, "siglip2_open_clip")
    message = str(err.value)
    assert "missing: vit.blocks.1.mlp.fc2.bias" in message
    assert "unexpected: visual.trunk.blocks.0.ls1.gamma" in message
    assert "visual.trunk.blocks.0.attn.qkv.weight: (192, 65) vs ours (192, 64)" in message
    assert torch.equal(model.vit.blocks[0].attn.qkv.weight, before), "nothing is loaded on error"


def mlp(prefix, d_in, hidden, d_out):
    return {**linear(f"{prefix}.fc1", hidden, d_in), **linear(f"{prefix}.fc2", d_out, hidden)}


def release_encoder(rope_inner=32, levels=5):
    state = {k[len("visual.trunk."):]: v for k, v in open_clip_siglip2(grid=16).items() if k.startswith("visual.trunk.")}
    fb = "fusion_block."
    state.update(timm_block(f"{fb}vq_low_preprocess_layers.0"))
    state.update(mlp(f"{fb}vq_low_pre_token_shuffle_head", C, 4 * C, 4 * C))
    state.update(mlp(f"{fb}vq_low_post_token_shuffle_head", C, C, C))
    rope = f"{fb}vq_low.fsq_pre_attn.0"
    state.update({**norm(f"{rope}.norm1", C), **linear(f"{rope}.attn.decrease_dim", rope_inner, C),
                  **linear(f"{rope}.attn.qkv", 3 * rope_inner, rope_inner),
                  **linear(f"{rope}.attn.proj", rope_inner, rope_inner),
                  **linear(f"{rope}.attn.increase_dim", C, rope_inner), **norm(f"{rope}.norm2", C),
                  **mlp(f"{rope}.mlp", C, 4 * C, C)})
    state.update(linear(f"{fb}vq_low.project_in", levels, C))
    state.update(linear(f"{fb}vq_low.project_out", C, levels))
    state.update(mlp(f"{fb}vq_low_inverse_token_shuffle_head", 4 * C, 4 * C, C))
    state.update(mlp(f"{fb}vq_low_postprocess_layers.0", C, C, C))
    state.update({**norm(f"{fb}vq_low_postprocess_layers.1.norm", C),
                  **mlp(f"{fb}vq_low_postprocess_layers.1.mlp", C, 2 * C, C)})
    state.update({f"{fb}vq_low_affine_weight": torch.randn(C), f"{fb}vq_low_affine_bias": torch.randn(C)})
    state["teacher.blocks.0.norm1.weight"] = torch.randn(C)
    return state


def release_embedder(model: ViQTokenizer) -> dict:
    fsq = model.head.embedder.fsq
    return {
        "ori_codebook.weight": fsq.indices_to_codes(torch.arange(fsq.codebook_size)),
        **linear("projector_1", C, 5), **mlp("projector_2", 4 * C, 4 * C, C), **mlp("projector_3.0", C, C, C),
        **norm("projector_3.1.norm", C), **mlp("projector_3.1.mlp", C, 2 * C, C),
        "_weight": torch.randn(C), "_bias": torch.randn(C),
    }


def test_release_encoder_import_then_embedder_agrees():
    model = ViQTokenizer.from_config("tiny", preset="16k")
    source = release_encoder()
    report = import_weights(model, source, "viq_encoder")
    assert report.ok and report.ignored == ["teacher.blocks.0.norm1.weight"]
    in_scope = [k for k in model.state_dict() if k.startswith(("vit.", "head."))]
    assert sorted(report.loaded) == sorted(in_scope)
    assert torch.equal(model.head.embedder.post.affine_bias, source["fusion_block.vq_low_affine_bias"])

    embedder_file = release_embedder(model)
    import_weights(model, embedder_file, "viq_embedder")
    assert torch.equal(model.head.embedder.project_out.weight, embedder_file["projector_1.weight"])
    assert torch.equal(model.head.embedder.post.layers[1].mlp.fc1.weight, embedder_file["projector_3.1.mlp.fc1.weight"])


def test_embedder_with_another_presets_codebook_is_refused():
    model = ViQTokenizer.from_config("tiny", preset="16k")
    wrong = ViQTokenizer.from_config("tiny", preset="8k").head.embedder.fsq
    with pytest.raises(WeightImportError, match="wrong preset"):
        import_weights(model, {"ori_codebook.weight": wrong.indices_to_codes(torch.arange(8192))}, "viq_embedder")


def test_torch_files_load_with_weights_only(tmp_path):
    path = tmp_path / "siglip.bin"
    torch.save(open_clip_siglip2(), path)
    assert import_weights(ViQTokenizer.from_config("tiny"), path, "siglip2_open_clip").ok


def test_import_viq_writes_a_loadable_tokenizer_with_the_release_tensors(tmp_path, capsys):
    from viq_mllm import cli

    release = tmp_path / "release"
    release.mkdir()
    encoder, embedder = release_encoder(), release_embedder(ViQTokenizer.from_config("tiny", preset="16k"))
    torch.save(encoder, release / "model_viq_fsq.pth")
    torch.save(embedder, release / "embedder.pth")
    assert cli.main(["import-viq", "--release", str(release), "--out", str(tmp_path / "viq"), "--config", "tiny"]) == 0
    assert "model_viq_fsq.pth: loaded" in capsys.readouterr().out
    loaded = ViQTokenizer.from_pretrained(tmp_path / "viq")
    assert torch.equal(loaded.vit.blocks[1].attn.qkv.weight, encoder["blocks.1.attn.qkv.weight"])
    assert torch.equal(loaded.head.embedder.project_out.weight, embedder["projector_1.weight"])


def test_import_viq_of_a_folder_without_the_encoder_file_is_one_line(tmp_path, capsys):
    from viq_mllm import cli

    assert cli.main(["import-viq", "--release", str(tmp_path), "--out", str(tmp_path / "viq")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "no model_viq_fsq.pth" in err[0]
