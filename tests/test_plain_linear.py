"""megatron's linear GEMM runs as torch's ``F.linear`` when it has nothing else to do (``megatron_ext.patches.plain_linear``):
the same values and gradients as megatron's autograd function, bit for bit, in fp32 and bf16, with and without a
bias; megatron's function whenever a flag asks for more; and in a training step no megatron linear node is left,
with the loss and gradients of a step through megatron's function."""

import pytest
import torch
from conftest import tiny_trainer, traced_step
from megatron.core.tensor_parallel import layers

from megatron_ext.patches.plain_linear import NAME, plain_when_possible

MEGATRON = layers.LinearWithGradAccumulationAndAsyncCommunication


def _inputs(dtype: torch.dtype, bias: bool, shape: tuple[int, ...]):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, 48, generator=g).to(dtype).requires_grad_()
    w = torch.randn(40, 48, generator=g).to(dtype).requires_grad_()
    b = torch.randn(40, generator=g).to(dtype).requires_grad_() if bias else None
    return x, w, b, torch.randn(*shape, 40, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(33, 3), (17,)])  # [s, b] as megatron's layers, and flat tokens
def test_plain_path_equals_megatrons_autograd_function(dtype, bias, shape):
    x, w, b, grad = _inputs(dtype, bias, shape)
    leaves = (x, w) if b is None else (x, w, b)
    expected = MEGATRON.apply(x, w, b, False, False, False, None, 0, None)
    ours = plain_when_possible(lambda *args: pytest.fail("megatron's function called"))(x, w, b, False, False, False)
    assert "LinearWithGradAccumulation" not in ours.grad_fn.name()
    assert torch.equal(ours, expected)
    for mine, theirs in zip(torch.autograd.grad(ours, leaves, grad), torch.autograd.grad(expected, leaves, grad),
                            strict=True):
        assert torch.equal(mine, theirs)


@pytest.mark.parametrize("flags", [
    dict(gradient_accumulation_fusion=True),
    dict(allreduce_dgrad=True),
    dict(sequence_parallel=True),
    dict(grad_output_buffer=[]),
])
def test_megatrons_function_runs_whenever_it_has_work(flags):
    calls = []
    linear = plain_when_possible(lambda *args, **kwargs: calls.append((args, kwargs)) or "megatron's")
    x, w, b, _ = _inputs(torch.float32, False, (5,))
    call = dict(gradient_accumulation_fusion=False, allreduce_dgrad=False, sequence_parallel=False,
                grad_output_buffer=None, wgrad_deferral_limit=2, tp_group="group")
    assert linear(x, w, b, **{**call, **flags}) == "megatron's"
    (args, kwargs), = calls
    assert args[:3] == (x, w, b)
    assert args[3:] + tuple(kwargs.values()) == tuple({**call, **flags}.values())


def test_a_training_step_has_no_megatron_linear_node_and_identical_gradients(megatron_single, monkeypatch):
    trainer = tiny_trainer(megatron_single)
    nodes, loss_sum, grads = traced_step(trainer, 3, "LinearWithGradAccumulation")
    monkeypatch.setattr(layers, NAME, getattr(layers, NAME).__wrapped__)
    megatron_nodes, megatron_loss_sum, megatron_grads = traced_step(trainer, 3, "LinearWithGradAccumulation")
    fused = trainer.model.config.gradient_accumulation_fusion  # apex's kernel on a GPU: megatron's function stays
    assert not fused or torch.cuda.is_available()  # on CPU the linear layers run unfused, hence plain
    assert len(megatron_nodes) == 2 * 3 + 1  # per layer: QKV, attention output, MLP output; the output layer
    assert nodes == (megatron_nodes if fused else [])
    assert loss_sum == megatron_loss_sum
    for ours, theirs in zip(grads, megatron_grads, strict=True):
        assert torch.equal(ours, theirs)
