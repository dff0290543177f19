"""Our vocab-parallel cross-entropy: bit-identical to megatron's (loss and gradient), and equal to the plain
formula (``F.cross_entropy``). Across two tensor-parallel ranks it is checked by tests/test_parallel_equivalence.py
(TP=2 losses equal the single-process run's)."""

import pytest
import torch
import torch.nn.functional as F


def loss_and_grad(function, logits, target, weights):
    logits = logits.clone().requires_grad_()
    loss = function(logits * 1.0, target)  # a non-leaf input, as the output layer's GEMM gives it
    (loss * weights).sum().backward()
    return loss.detach(), logits.grad


@pytest.mark.parametrize("vocab", [1024, 8192])
def test_cross_entropy_equals_megatrons_bitwise_and_the_formula(megatron_single, vocab):
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy as megatrons

    from megatron_ext.model.cross_entropy import vocab_parallel_cross_entropy as ours

    g = torch.Generator().manual_seed(vocab)
    logits = 4 * torch.randn(16, 3, vocab, generator=g)
    target = torch.randint(0, vocab, (16, 3), generator=g)
    weights = torch.rand(16, 3, generator=g)
    loss, grad = loss_and_grad(ours, logits, target, weights)
    their_loss, their_grad = loss_and_grad(megatrons, logits, target, weights)
    assert torch.equal(loss, their_loss) and torch.equal(grad, their_grad)
    plain_loss, plain_grad = loss_and_grad(
        lambda x, t: F.cross_entropy(x.reshape(-1, vocab), t.reshape(-1), reduction="none").view(t.shape),
        logits, target, weights)
    torch.testing.assert_close(loss, plain_loss)
    torch.testing.assert_close(grad, plain_grad)


def test_bf16_logits_give_an_fp32_loss(megatron_single):
    from megatron_ext.model.cross_entropy import vocab_parallel_cross_entropy

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 2, 256, generator=g).bfloat16()
    target = torch.randint(0, 256, (8, 2), generator=g)
    loss = vocab_parallel_cross_entropy(logits, target)
    assert loss.dtype == torch.float32
    expected = F.cross_entropy(logits.float().view(-1, 256), target.view(-1), reduction="none").view(8, 2)
    torch.testing.assert_close(loss, expected)
