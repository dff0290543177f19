"""apex_free's stand-ins for apex's multi-tensor kernels against megatron's own fallbacks and the plain formula; its
fused Adam against torch's per-parameter Adam; and which of megatron's kernels it replaces. On the GPU where there is
one (tools/gpu_check.sh runs this file there), else the CPU."""

import contextlib
import copy
import types

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


def as_megatrons(*torch_optimizers) -> types.SimpleNamespace:
    """What ``get_megatron_optimizer`` returns around torch's optimizers: a chain of wrappers with ``.optimizer``."""
    return types.SimpleNamespace(chained_optimizers=[types.SimpleNamespace(optimizer=o) for o in torch_optimizers])


def fused_adam(params, adam_class=torch.optim.AdamW, **hyper) -> torch.optim.Optimizer:
    """torch's Adam as megatron builds it without apex or TE (default kernel choice), switched by apex_free."""
    adam = adam_class(params, **hyper)
    assert apex_free.use_fused_adam(as_megatrons(adam)) == 1
    return adam


def test_fused_adam_steps_like_torchs_single_tensor_reference():
    """megatron's Adam without apex or TE (both weight-decay modes), switched by apex_free, runs torch's fused
    kernel and takes the steps of torch's per-parameter implementation."""
    for reference_class in (torch.optim.AdamW, torch.optim.Adam):
        ours_params, reference_params = ([torch.nn.Parameter(t) for t in tensors(6)] for _ in range(2))
        hyper = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
        ours = fused_adam(ours_params, reference_class, **hyper)
        reference = reference_class(reference_params, foreach=False, **hyper)
        assert all(group["fused"] and not group["foreach"] for group in ours.param_groups)
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
    resumed = fused_adam(resumed_params, **hyper)
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
    kernels = {"l2norm": object(), "scale": object()}  # stand for TE's / apex's
    monkeypatch.setattr(clip_grads, "l2_norm_impl", kernels["l2norm"])
    monkeypatch.setattr(clip_grads, "multi_tensor_scale_impl", kernels["scale"])
    monkeypatch.setattr(optimizer, "multi_tensor_scale_impl", kernels["scale"])
    assert apex_free.install() == []
    assert clip_grads.l2_norm_impl is kernels["l2norm"]

    monkeypatch.setattr(clip_grads, "l2_norm_impl", utils.local_multi_tensor_l2_norm)
    monkeypatch.setattr(clip_grads, "multi_tensor_scale_impl", utils.local_multi_tensor_scale)
    monkeypatch.setattr(optimizer, "multi_tensor_scale_impl", utils.local_multi_tensor_scale)
    assert len(apex_free.install()) == 3
    assert clip_grads.l2_norm_impl is apex_free.multi_tensor_l2norm
    assert clip_grads.multi_tensor_scale_impl is optimizer.multi_tensor_scale_impl is apex_free.multi_tensor_scale
    assert apex_free.install() == []


def test_megatrons_optimizer_flags_are_left_alone_and_apex_kernels_are_not_switched():
    """megatron's ``USING_PYTORCH_OPTIMIZER`` and optimizer class stay what megatron chose; an optimizer that is not
    torch's Adam (apex's or TE's FusedAdam) is left as built."""
    using_torch, adam_class = optimizer_package.USING_PYTORCH_OPTIMIZER, optimizer_package.Adam
    apex_free.install()
    assert optimizer_package.USING_PYTORCH_OPTIMIZER is using_torch and optimizer_package.Adam is adam_class
    other = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    assert apex_free.use_fused_adam(as_megatrons(other)) == 0 and other.param_groups[0]["fused"] is None
