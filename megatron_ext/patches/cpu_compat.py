"""Run megatron-core on a machine without CUDA. The only place in the project that patches megatron or torch for
the CPU (:mod:`megatron_ext.patches.apex_free` swaps megatron's fallback optimizer kernels, on any device).

megatron-core assumes CUDA at ~570 call sites (``torch.cuda.current_device()``, ``device="cuda"``, ``.cuda()``,
asserts on ``'torch.cuda.FloatTensor'``); no config flag avoids them.
:func:`install` redirects each of them to the CPU, once per process, after the gloo process group exists and
before any model is built. It does nothing when CUDA is available, so GPU runs see stock megatron-core.

What it changes, and who needs it:

1. ``torch.cuda.current_device / synchronize / empty_cache / current_stream``: allocation sites and timers.
2. CUDA RNG calls and megatron's ``_get/_set_cuda_rng_state`` -> the CPU generator: the RNG tracker that
   ``model_parallel_cuda_manual_seed`` sets up and that dropout forks.
3. ``fused_softmax.get_default_causal_mask``: hard-codes ``device="cuda"``.
4. A ``TorchFunctionMode`` rewriting ``device="cuda"`` to the CPU and making ``.cuda()`` / ``pin_memory()``
   no-ops: pipeline schedules, optimizers, ``clip_grads`` and ``dist_checkpointing`` allocate on CUDA.
5. ``Tensor.type()`` reports ``torch.cuda.*Tensor`` for CPU tensors inside that mode: the distributed
   optimizer and the mixed-precision optimizer assert on it.
6. ``fused_weight_gradient_mlp_cuda`` (apex's CUDA extension behind ``gradient_accumulation_fusion``): an
   ``addmm_`` that GEMM-accumulates :class:`~megatron_ext.model.swiglu.SwiGLUMLP`'s weight gradient straight into DDP's
   ``main_grad`` buffer, as on GPU, instead of allocating the gradient and adding it to the buffer afterwards
   (docs/benchmarks.md). megatron's own linear layers run without the fusion on CPU, as
   torch's ``F.linear`` (:mod:`megatron_ext.patches.plain_linear`).
7. ``clip_grads``' functions run inside the mode when called from native code (see below): the only CUDA sites
   of megatron's optimizer step.

The optimizer kernels megatron lacks without apex or TE (gradient norm, scaling, fused Adam) are not a CPU matter:
:mod:`megatron_ext.patches.apex_free` replaces them on CPU and GPU alike.

The mode costs a Python dispatch on every torch call. Model code and torch's optimizers never name CUDA
(checked over the test suite: every rewrite happens in construction, schedules, megatron's optimizer wrapper and
checkpoints), so :func:`native` runs without it forward steps (and with them the backward of model code: autograd
runs each node in the thread-local state of the forward that built it, torch-function modes included), the
optimizer's ``zero_grad`` and its step. Within megatron's optimizer step only ``clip_grads`` names CUDA (a
``device="cuda"`` buffer, a ``torch.cuda.FloatTensor`` assertion per gradient; measured with fp32, bf16 and the
distributed optimizer, clipping or not): :func:`install` wraps its functions in :func:`redirected`, so a step pays
the toll on ~100 calls instead of ~430.
"""

from __future__ import annotations

import functools
import types
from typing import Callable

import torch
from torch.overrides import TorchFunctionMode

_mode = None
_active = False  # whether _mode is on torch's mode stack (entered and left only through _set_active)


class _NoStream:
    """Stands in for a CUDA stream: every method is a no-op, usable as a context manager."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _is_cuda(device) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpu(TorchFunctionMode):
    _REWRITTEN = frozenset({torch.Tensor.type, torch.Tensor.cuda, torch.Tensor.pin_memory, torch.Tensor.to})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if not kwargs and func not in self._REWRITTEN:  # most calls: nothing to rewrite
            return func(*args)
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name
        if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
            return args[0]
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def _wgrad_gemm_accum(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
    """``main_grad += grad_output^T @ total_input`` (2-D operands), the extension's contract."""
    main_grad.addmm_(grad_output.t().to(main_grad.dtype), total_input.to(main_grad.dtype))


def install() -> bool:
    """Apply the CPU redirections if CUDA is absent. Idempotent. Returns True when active."""
    global _mode
    if torch.cuda.is_available():
        return False
    if _mode is not None:
        return True
    cuda = torch.cuda
    cuda.current_device = lambda: torch.device("cpu")
    cuda.synchronize = lambda *a, **k: None
    cuda.empty_cache = lambda *a, **k: None
    cuda.current_stream = lambda *a, **k: _NoStream()
    cuda.manual_seed = lambda seed: torch.manual_seed(seed)
    cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)

    from megatron.core.fusions import fused_softmax
    from megatron.core.tensor_parallel import layers
    from megatron.core.tensor_parallel import random as tp_random

    tp_random._set_cuda_rng_state = lambda state, device=-1, graph_safe=False: torch.set_rng_state(state)
    tp_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    fused_softmax.get_default_causal_mask = lambda sq: torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)
    layers.fused_weight_gradient_mlp_cuda = types.SimpleNamespace(
        wgrad_gemm_accum_fp32=_wgrad_gemm_accum, wgrad_gemm_accum_fp16=_wgrad_gemm_accum)
    layers._grad_accum_fusion_available = True
    _redirect_clip_grads()

    # Entered for the life of the process: autograd on CPU runs backward in the calling thread.
    _mode = _CudaToCpu()
    _set_active(True)
    return True


def _redirect_clip_grads() -> None:
    """Run ``clip_grads``' functions in the mode wherever megatron's optimizers call them (imported by name).

    They call megatron's ``to_local_if_dtensor`` once or twice per gradient, which enters and leaves ``no_grad``
    even for a plain tensor: four intercepted calls per gradient in the mode, most of its toll on these
    functions (0.3 of 1.4 ms per step of the tiny bench model). Plain tensors skip it here."""
    from megatron.core.optimizer import clip_grads, layer_wise_optimizer, optimizer

    for name in ("get_grad_norm_fp32", "clip_grad_by_total_norm_fp32", "count_zeros_fp32"):
        wrapped = redirected(getattr(clip_grads, name))
        for module in (clip_grads, optimizer, layer_wise_optimizer):
            if hasattr(module, name):
                setattr(module, name, wrapped)
    clip_grads.to_local_if_dtensor = _to_local_unless_plain


def _to_local_unless_plain(tensor: torch.Tensor) -> torch.Tensor:
    """megatron's ``to_local_if_dtensor``, returning a plain tensor as is (without entering ``no_grad``)."""
    from megatron.core import utils

    return tensor if type(tensor) is torch.Tensor else utils.to_local_if_dtensor(tensor)


def _set_active(on: bool) -> None:
    global _active
    if on:
        _mode.__enter__()
    else:
        _mode.__exit__(None, None, None)
    _active = on


def native(fn: Callable) -> Callable:
    """``fn`` run with the redirection mode suspended (as is, when the mode is not installed or already off)."""
    return _with_mode(fn, False)


def redirected(fn: Callable) -> Callable:
    """``fn`` run inside the redirection mode once installed, also when called from :func:`native` code."""
    return _with_mode(fn, True)


def _with_mode(fn: Callable, on: bool) -> Callable:
    @functools.wraps(fn)
    def run(*args, **kwargs):
        if _mode is None or _active == on:
            return fn(*args, **kwargs)
        _set_active(on)
        try:
            return fn(*args, **kwargs)
        finally:
            _set_active(not on)

    return run
