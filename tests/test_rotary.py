"""The shared RoPE pair rotation (forward and hand-written backward) against autograd of the concatenating
formula, on a strided view as megatron's fused QKV output gives it and with broadcast angles; query and key
rotated together as one node."""

import torch

from viq_mllm.rotary import rotate, rotate_pair


def reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def test_rotation_and_its_gradient_equal_autograd_of_the_formula():
    g = torch.Generator().manual_seed(0)
    fused = torch.randn(7, 3, 2, 3, 16, generator=g, requires_grad=True)  # [s, b, groups, (q, k, v), d]
    x = fused[:, :, :, 1]  # a strided view, as the key of a fused QKV output
    angles = torch.randn(7, 1, 1, 8, generator=g) * 3  # one angle per position and pair, broadcast over b, heads
    cos, sin = angles.cos(), angles.sin()
    grad_out = torch.randn(7, 3, 2, 16, generator=g)
    expected = reference(x, cos, sin)
    (expected_grad,) = torch.autograd.grad(expected, fused, grad_out)
    ours = rotate(x, cos, sin)
    (ours_grad,) = torch.autograd.grad(ours, fused, grad_out)
    torch.testing.assert_close(ours, expected)
    torch.testing.assert_close(ours_grad, expected_grad)


def test_pair_rotation_is_one_node_equal_to_the_formula():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(5, 2, 4, 8, generator=g, requires_grad=True)  # [b, heads, s, d], as SDPA takes them
    k = torch.randn(5, 1, 4, 8, generator=g, requires_grad=True)  # fewer key heads (GQA)
    angles = torch.randn(4, 4, generator=g)  # [s, d/2], broadcast over b and heads
    cos, sin = angles.cos(), angles.sin()
    grads = [torch.randn(5, 2, 4, 8, generator=g), torch.randn(5, 1, 4, 8, generator=g)]
    expected = (reference(q, cos, sin), reference(k, cos, sin))
    expected_grads = torch.autograd.grad(expected, (q, k), grads)
    ours = rotate_pair(q, k, cos, sin)
    ours_grads = torch.autograd.grad(ours, (q, k), grads)
    assert ours[0].grad_fn is ours[1].grad_fn
    for got, want in zip((*ours, *ours_grads), (*expected, *expected_grads), strict=True):
        torch.testing.assert_close(got, want)
