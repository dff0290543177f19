"""cpu_compat's redirection of megatron's CUDA idioms and its stand-in for apex's gradient-accumulation kernel."""

import pytest
import torch
from conftest import micro_batches, tiny_trainer

from megatron_ext.patches import cpu_compat


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


def test_wgrad_accumulation_adds_the_weight_gradient():
    """The stand-in adds to ``main_grad`` what autograd computes as the weight gradient of ``F.linear``, also from
    bf16 activations into an fp32 buffer."""
    g = torch.Generator().manual_seed(5)
    for dtype in (torch.float32, torch.bfloat16):
        total_input, grad_output = (torch.randn(shape, generator=g).to(dtype) for shape in ((9, 4), (9, 6)))
        main_grad = torch.randn(6, 4, generator=g)
        weight = torch.zeros(6, 4, requires_grad=True)
        torch.nn.functional.linear(total_input.float(), weight).backward(grad_output.float())
        expected = main_grad + weight.grad
        cpu_compat._wgrad_gemm_accum(total_input, grad_output, main_grad)
        assert main_grad.dtype == torch.float32
        torch.testing.assert_close(main_grad, expected)


def redirects() -> bool:
    """Whether a ``device="cuda"`` allocation lands on the CPU here (the mode is on), rather than failing."""
    try:
        return torch.zeros(1, device="cuda").device.type == "cpu"
    except (AssertionError, RuntimeError):  # this torch has no CUDA
        return False


@pytest.mark.skipif(torch.cuda.is_available(), reason="the redirection exists only without CUDA")
def test_native_and_redirected_nest():
    """The optimizer step runs native and megatron's clip_grads inside it redirected: each wrapper switches the
    mode only when it is in the other state, and restores that state on return."""
    cpu_compat.install()

    def inside_native() -> None:
        assert not redirects()  # no redirection: this torch has no CUDA
        assert cpu_compat.redirected(redirects)()
        assert not redirects()
        assert cpu_compat.native(lambda: 7)() == 7  # already native: nothing to leave

    assert redirects()  # installed: on for the process
    cpu_compat.native(inside_native)()
    assert cpu_compat.redirected(redirects)()  # already on: nothing to enter
    assert redirects()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the redirection exists only without CUDA")
def test_forward_and_backward_of_a_training_step_run_outside_the_mode(megatron_single):
    """megatron's schedule runs inside the mode, the forward step outside it (``training.forward_backward``), and
    so does the backward of model code: autograd runs each node in the thread-local state of the forward that
    built it, torch-function modes included. Model code thus pays no toll per torch call. Probed where model code
    runs: a layer's forward and the gradient of its output."""
    from megatron_ext.training.loop import forward_backward

    seen = {"forward": [], "backward": []}

    def probe(module, args, output):
        seen["forward"].append(redirects())
        output[0].register_hook(lambda grad: seen["backward"].append(redirects()))

    trainer = tiny_trainer(megatron_single)
    trainer.model.module.decoder.layers[0].mlp.register_forward_hook(probe)
    forward_backward(trainer, iter(micro_batches(seed=3)))
    assert seen == {"forward": [False] * 3, "backward": [False] * 3}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the redirection exists only without CUDA")
def test_megatrons_gradient_clipping_as_installed_equals_torchs(megatron_single):
    """clip_grads' functions as cpu_compat leaves them (in the mode, plain tensors skipping ``to_local``'s
    ``no_grad``) clip like ``torch.nn.utils.clip_grad_norm_``."""
    from megatron.core import parallel_state
    from megatron.core.optimizer import clip_grads

    g = torch.Generator().manual_seed(4)
    ours = [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in ((5, 3), (7,), (2, 2, 2))]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    for a, b in zip(ours, theirs):
        a.grad = torch.randn(a.shape, generator=g)
        b.grad = a.grad.clone()
    assert clip_grads.to_local_if_dtensor(ours[0].grad) is ours[0].grad
    group = parallel_state.get_model_parallel_group()
    norm = cpu_compat.native(clip_grads.get_grad_norm_fp32)([p.grad for p in ours], 2, group)
    cpu_compat.native(clip_grads.clip_grad_by_total_norm_fp32)(ours, 1.0, norm)
    expected = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    assert norm == pytest.approx(float(expected), rel=1e-6) and norm > 1.0  # the clipping branch ran
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad)
