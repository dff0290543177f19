"""apex_free's stand-ins for apex's multi-tensor and Adam kernels, against megatron's own fallbacks, the plain
formula and torch's per-parameter Adam; and which of megatron's kernels it replaces. On the GPU where there is
one (tools/gpu_check.sh runs this file there), else the CPU."""

import contextlib
import copy

import megatron.core.optimizer as optimizer_package
import torch
from megatron.core import utils
from megatron.core.optimizer import clip_grads, optimizer
from megatron.core.utils import local_multi_tensor_l2_norm, local_multi_tensor_scale

from megatron_ext.patches import apex_free, cpu_compat


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def tensors(seed: int, dtype=torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(DEVICE, dtype) for shape in ((3, 4), (7,), (2, 2, 5))]


def test_l2norm_equals_megatrons_fallback():
    lists = [tensors(0), tensors(1)]
    ours, per_tensor = apex_free.multi_tensor_l2norm(2048, None, lists, False)
    with cpu_compat._CudaToCpu() if DEVICE == "cpu" else contextlib.nullcontext():  # it allocates on "cuda"
        theirs, _ = local_multi_tensor_l2_norm(2048, None, lists, False)
    assert per_tensor is None and ours.shape == (1,)
    torch.testing.assert_close(ours, theirs)


def test_scale_in_place_and_into_other_dtypes_equals_megatrons_fallback():
    grads, expected = tensors(2), tensors(2)
    apex_free.multi_tensor_scale(2048, None, [grads, grads], 0.25)
    local_multi_tensor_scale(2048, None, [expected, expected], 0.25)
    for ours, theirs in zip(grads, expected):
        torch.testing.assert_close(ours, theirs)
    sources, ours_bf16, theirs_bf16 = tensors(3), tensors(4, torch.bfloat16), tensors(4, torch.bfloat16)
    apex_free.multi_tensor_scale(2048, None, [sources, ours_bf16], 1.0)
    local_multi_tensor_scale(2048, None, [sources, theirs_bf16], 1.0)
    for ours, theirs in zip(ours_bf16, theirs_bf16):
        assert torch.equal(ours, theirs)


def test_fused_adam_steps_like_torchs_single_tensor_reference():
    """megatron's Adam without apex or TE (apex FusedAdam's constructor, both weight-decay modes) runs torch's
    fused kernel and takes the steps of torch's per-parameter implementation."""
    for adam_w_mode, reference_class in ((True, torch.optim.AdamW), (False, torch.optim.Adam)):
        ours_params, reference_params = ([torch.nn.Parameter(t) for t in tensors(6)] for _ in range(2))
        hyper = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
        ours = apex_free.fused_adam(ours_params, adam_w_mode=adam_w_mode, **hyper)
        reference = reference_class(reference_params, foreach=False, **hyper)
        assert all(group["fused"] for group in ours.param_groups)
        for step in range(3):
            for params in (ours_params, reference_params):
                for p, g in zip(params, tensors(10 + step)):
                    p.grad = g
            ours.step(), reference.step()
        for mine, theirs in zip(ours_params, reference_params):
            torch.testing.assert_close(mine, theirs)


def test_fused_adam_stays_fused_when_loading_a_per_parameter_loop_state():
    """A checkpoint of torch's per-parameter AdamW (an older run) resumes on the fused kernel, continuing the same
    trajectory."""
    hyper = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    saved_params = [torch.nn.Parameter(t) for t in tensors(6)]
    saved = torch.optim.AdamW(saved_params, foreach=False, **hyper)
    for p, g in zip(saved_params, tensors(10)):
        p.grad = g
    saved.step()
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in saved_params]
    resumed = apex_free.fused_adam(resumed_params, **hyper)
    resumed.load_state_dict(copy.deepcopy(saved.state_dict()))  # as from a file: no shared moment tensors
    assert all(group["fused"] and not group["foreach"] for group in resumed.param_groups)
    for params in (saved_params, resumed_params):
        for p, g in zip(params, tensors(11)):
            p.grad = g
    saved.step(), resumed.step()
    for mine, theirs in zip(resumed_params, saved_params):
        torch.testing.assert_close(mine, theirs)


def test_install_replaces_megatrons_fallbacks_and_leaves_apex_or_te_kernels(monkeypatch):
    """Where TE or apex provide a kernel it stays; where megatron chose its own fallback, torch's kernel replaces
    it; a second install changes nothing."""
    kernels = {"l2norm": object(), "scale": object(), "adam": object()}  # stand for TE's / apex's
    monkeypatch.setattr(clip_grads, "l2_norm_impl", kernels["l2norm"])
    monkeypatch.setattr(clip_grads, "multi_tensor_scale_impl", kernels["scale"])
    monkeypatch.setattr(optimizer, "multi_tensor_scale_impl", kernels["scale"])
    monkeypatch.setattr(optimizer_package, "Adam", kernels["adam"])
    monkeypatch.setattr(optimizer_package, "USING_PYTORCH_OPTIMIZER", False)
    assert apex_free.install() == []
    assert clip_grads.l2_norm_impl is kernels["l2norm"] and optimizer_package.Adam is kernels["adam"]

    monkeypatch.setattr(clip_grads, "l2_norm_impl", utils.local_multi_tensor_l2_norm)
    monkeypatch.setattr(clip_grads, "multi_tensor_scale_impl", utils.local_multi_tensor_scale)
    monkeypatch.setattr(optimizer, "multi_tensor_scale_impl", utils.local_multi_tensor_scale)
    monkeypatch.setattr(optimizer_package, "Adam", torch.optim.AdamW)
    monkeypatch.setattr(optimizer_package, "USING_PYTORCH_OPTIMIZER", True)
    assert len(apex_free.install()) == 4
    assert clip_grads.l2_norm_impl is apex_free.multi_tensor_l2norm
    assert clip_grads.multi_tensor_scale_impl is optimizer.multi_tensor_scale_impl is apex_free.multi_tensor_scale
    assert optimizer_package.Adam is apex_free.fused_adam and not optimizer_package.USING_PYTORCH_OPTIMIZER
    assert apex_free.install() == []
