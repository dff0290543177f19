"""The CPU SwiGLU MLP's hand-written backward against autograd through the plain formula."""

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import layers

from megatron_ext.model.swiglu import _SwiGLU
from megatron_ext.patches import cpu_compat


def reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    gate, up = weight.chunk(2)
    return F.silu(x @ gate.t()) * (x @ up.t())


def inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 8, generator=g, requires_grad=True)
    weight = torch.randn(2 * 5, 8, generator=g, requires_grad=True)
    return x, weight, torch.randn(12, 5, generator=g)


def test_forward_and_gradients_equal_autograd_of_the_formula():
    x, weight, grad_out = inputs()
    expected = reference(x, weight)
    expected_dx, expected_dw = torch.autograd.grad(expected, (x, weight), grad_out)
    ours = _SwiGLU.apply(x, weight, False)
    torch.testing.assert_close(ours, expected)
    ours.backward(grad_out)
    torch.testing.assert_close(x.grad, expected_dx)
    torch.testing.assert_close(weight.grad, expected_dw)


def test_gradient_accumulation_fusion_adds_into_main_grad(monkeypatch):
    """megatron's protocol: the weight gradient is added to ``main_grad`` and ``grad_added_to_main_grad`` set,
    so DDP's hook skips the (dummy) ``.grad``."""
    monkeypatch.setattr(layers, "fused_weight_gradient_mlp_cuda",  # what cpu_compat installs on CPU
                        SimpleNamespace(wgrad_gemm_accum_fp32=cpu_compat._wgrad_gemm_accum), raising=False)
    x, weight, grad_out = inputs()
    _, expected_dw = torch.autograd.grad(reference(x, weight), (x, weight), grad_out)
    earlier = torch.randn(weight.shape, generator=torch.Generator().manual_seed(1))
    weight.main_grad, weight.grad_added_to_main_grad = earlier.clone(), False
    _SwiGLU.apply(x, weight, True).backward(grad_out)
    torch.testing.assert_close(weight.main_grad, earlier + expected_dw)
    assert weight.grad_added_to_main_grad
