"""Run megatron-core on a machine without CUDA. The only place in the project that patches megatron or torch.

megatron-core assumes CUDA at ~570 call sites (``torch.cuda.current_device()``, ``device="cuda"``, ``.cuda()``,
asserts on ``'torch.cuda.FloatTensor'``); no config flag avoids them (``reference/MEGATRON_ON_CPU.md``).
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
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

_installed = False


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
    def __torch_function__(self, func, types, args=(), kwargs=None):
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


def install() -> bool:
    """Apply the CPU redirections if CUDA is absent. Idempotent. Returns True when active."""
    global _installed
    if torch.cuda.is_available():
        return False
    if _installed:
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
    from megatron.core.tensor_parallel import random as tp_random

    tp_random._set_cuda_rng_state = lambda state, device=-1, graph_safe=False: torch.set_rng_state(state)
    tp_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    fused_softmax.get_default_causal_mask = lambda sq: torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)

    # Entered for the life of the process: autograd on CPU runs backward in the calling thread.
    _CudaToCpu().__enter__()
    _installed = True
    return True
