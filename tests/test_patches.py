"""Which of megatron's patches are active where: every one on CPU; on a GPU only cpu_compat's absence and the
opt-in list of ``VIQ_MLLM_GPU_PATCHES``."""

import pytest
import torch

from megatron_ext import patches


def test_every_optional_patch_is_active_on_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv(patches.GPU_OPT_IN, "")
    assert all(patches.enabled(name) for name in patches.OPTIONAL)


@pytest.mark.parametrize("chosen, active", [
    ("", set()),
    ("plain_linear", {"plain_linear"}),
    (" apex_free , cross_entropy ", {"apex_free", "cross_entropy"}),
    ("all", set(patches.OPTIONAL)),
])
def test_on_gpu_megatrons_path_is_the_default_and_patches_are_opt_in(monkeypatch, chosen, active):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv(patches.GPU_OPT_IN, chosen)
    assert {name for name in patches.OPTIONAL if patches.enabled(name)} == active


def test_an_unknown_patch_name_is_refused_naming_the_variable(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv(patches.GPU_OPT_IN, "plain_linear,fast_softmax")
    with pytest.raises(ValueError, match="VIQ_MLLM_GPU_PATCHES: unknown patch.*fast_softmax"):
        patches.enabled("plain_linear")
    with pytest.raises(ValueError, match="unknown patch 'cpu_compat'"):
        patches.enabled("cpu_compat")


def test_on_gpu_without_opt_in_the_config_asks_for_megatrons_fused_loss(monkeypatch):
    from megatron_ext.model.gpt import transformer_config
    from viq_mllm.recipe import ModelSection

    model = ModelSection(num_layers=1, hidden_size=8, ffn_hidden_size=16, num_attention_heads=2, seq_length=8)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for chosen, fused in (("", True), ("cross_entropy", False)):
        monkeypatch.setenv(patches.GPU_OPT_IN, chosen)
        config = transformer_config(model)
        assert config.cross_entropy_loss_fusion is fused
