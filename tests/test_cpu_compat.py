"""cpu_compat's stand-ins for apex's multi-tensor, gradient-accumulation and Adam kernels, against megatron's own
CPU fallbacks, the plain formula and torch's per-parameter Adam."""

import copy

import torch
from megatron.core.utils import local_multi_tensor_l2_norm, local_multi_tensor_scale

from megatron_ext import cpu_compat


def tensors(seed: int, dtype=torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(dtype) for shape in ((3, 4), (7,), (2, 2, 5))]


def test_redirection_mode_puts_every_cuda_request_on_the_cpu():
    """Inside the mode megatron's CUDA idioms land on the CPU, and calls with nothing to rewrite pass unchanged."""
    t = torch.arange(3.0)
    with cpu_compat._CudaToCpu():
        for device in ("cuda", "cuda:0", torch.device("cuda", 0), 0):
            assert torch.zeros(2, device=device).device.type == "cpu"
        assert t.cuda() is t and t.pin_memory() is t
        assert t.to("cuda").device.type == "cpu" and t.to(torch.device("cuda"), torch.float64).dtype == torch.float64
        assert t.type() == "torch.cuda.FloatTensor"  # megatron's optimizers assert on the CUDA type name
        assert t.type(torch.float64).dtype == torch.float64
        assert not torch.empty(2, pin_memory=True).is_pinned()
        torch.testing.assert_close(torch.add(t, t, alpha=2), torch.tensor([0.0, 3.0, 6.0]))
        torch.testing.assert_close(torch.mul(t, t), torch.tensor([0.0, 1.0, 4.0]))


def test_l2norm_equals_megatrons_fallback():
    lists = [tensors(0), tensors(1)]
    ours, per_tensor = cpu_compat._multi_tensor_l2norm(2048, None, lists, False)
    with cpu_compat._CudaToCpu():  # megatron's fallback allocates its result on "cuda"
        theirs, _ = local_multi_tensor_l2_norm(2048, None, lists, False)
    assert per_tensor is None and ours.shape == (1,)
    torch.testing.assert_close(ours, theirs)


def test_scale_in_place_and_into_other_dtypes_equals_megatrons_fallback():
    grads, expected = tensors(2), tensors(2)
    cpu_compat._multi_tensor_scale(2048, None, [grads, grads], 0.25)
    local_multi_tensor_scale(2048, None, [expected, expected], 0.25)
    for ours, theirs in zip(grads, expected):
        torch.testing.assert_close(ours, theirs)
    sources, ours_bf16, theirs_bf16 = tensors(3), tensors(4, torch.bfloat16), tensors(4, torch.bfloat16)
    cpu_compat._multi_tensor_scale(2048, None, [sources, ours_bf16], 1.0)
    local_multi_tensor_scale(2048, None, [sources, theirs_bf16], 1.0)
    for ours, theirs in zip(ours_bf16, theirs_bf16):
        assert torch.equal(ours, theirs)


def test_wgrad_accumulation_adds_the_weight_gradient():
    g = torch.Generator().manual_seed(5)
    total_input, grad_output, main_grad = (torch.randn(shape, generator=g) for shape in ((9, 4), (9, 6), (6, 4)))
    expected = main_grad + grad_output.t() @ total_input
    cpu_compat._wgrad_gemm_accum(total_input, grad_output, main_grad)
    torch.testing.assert_close(main_grad, expected)


def test_fused_adam_steps_like_torchs_single_tensor_reference():
    """megatron's Adam on CPU (apex FusedAdam's constructor, both weight-decay modes) runs torch's fused kernel and
    takes the steps of torch's per-parameter implementation."""
    for adam_w_mode, reference_class in ((True, torch.optim.AdamW), (False, torch.optim.Adam)):
        ours_params, reference_params = ([torch.nn.Parameter(t) for t in tensors(6)] for _ in range(2))
        hyper = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
        ours = cpu_compat._fused_adam(ours_params, adam_w_mode=adam_w_mode, **hyper)
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
    resumed = cpu_compat._fused_adam(resumed_params, **hyper)
    resumed.load_state_dict(copy.deepcopy(saved.state_dict()))  # as from a file: no shared moment tensors
    assert all(group["fused"] and not group["foreach"] for group in resumed.param_groups)
    for params in (saved_params, resumed_params):
        for p, g in zip(params, tensors(11)):
            p.grad = g
    saved.step(), resumed.step()
    for mine, theirs in zip(resumed_params, saved_params):
        torch.testing.assert_close(mine, theirs)
