"""megatron-core without apex or Transformer Engine: torch's multi-tensor and fused kernels in place of megatron's
slow stand-ins, on CPU and GPU alike.

megatron-core takes its optimizer kernels from TE or apex. Where neither is installed (any CPU, and a GPU with a
pip-installed megatron-core and no NVIDIA containers) it falls back to:

- ``local_multi_tensor_l2_norm`` for the gradient norm: a Python list of one 0-d norm per parameter tensor turned
  into a host tensor (on a GPU, one synchronisation per parameter tensor);
- ``local_multi_tensor_scale`` for clipping and the main-to-model parameter copies: ``dst.copy_(src * scale)``
  per tensor, out of place even when ``src`` is ``dst``;
- ``torch.optim.AdamW`` with its defaults: the per-parameter loop on CPU, the multi-tensor (not fused) kernels on
  GPU.

These cost megatron's update phase several times HF's on both devices (docs/benchmarks.md). :func:`install`
replaces the first two with the kernels HF's step runs, ``torch._foreach_norm`` / ``torch._foreach_mul_`` (what
``clip_grad_norm_`` uses), behind the call signatures megatron expects from apex; :func:`use_fused_adam` switches
the torch ``AdamW`` megatron built to ``fused=True`` (HF Trainer's default, ``adamw_torch_fused``). Each
replacement happens only where megatron chose its own fallback, so TE's or apex's kernels are never touched. The
optimizer stays a torch ``AdamW``: state dicts and checkpoints are unchanged.
"""

from __future__ import annotations

import torch


def multi_tensor_l2norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """The L2 norm over every tensor of every list, as a 1-element tensor on their device; apex's contract (no
    per-tensor norms)."""
    norms = torch._foreach_norm([t for tensors in tensor_lists for t in tensors])
    return torch.linalg.vector_norm(torch.stack(norms)).reshape(1), None


def multi_tensor_scale(chunk_size, noop_flag, tensor_lists, scale) -> None:
    """``dst = src * scale`` for each pair of ``tensor_lists = [sources, destinations]``, in place when they alias."""
    sources, destinations = tensor_lists
    if all(src is dst for src, dst in zip(sources, destinations)):
        torch._foreach_mul_(destinations, scale)
    else:
        torch._foreach_copy_(destinations, torch._foreach_mul(sources, scale))


def use_fused_adam(megatron_optimizer) -> int:
    """Switch the torch ``AdamW`` / ``Adam`` that megatron built (its fallback without TE or apex) to torch's fused
    kernel, before its first step; returns how many torch optimizers were switched.

    megatron's own objects are not touched: its ``USING_PYTORCH_OPTIMIZER`` stays true, its optimizer class stays
    torch's, only the param groups' ``fused`` / ``foreach`` flags change (torch reads them at every step). The
    moments are created on the first step, so they are the fused kernel's from the start."""
    switched = 0
    for wrapper in getattr(megatron_optimizer, "chained_optimizers", [megatron_optimizer]):
        adam = wrapper.optimizer
        if isinstance(adam, (torch.optim.AdamW, torch.optim.Adam)):
            _keep_fused(adam)
            adam.register_load_state_dict_post_hook(_keep_fused)
            switched += 1
    return switched


def _keep_fused(adam: torch.optim.Optimizer) -> None:
    """Loading replaces the param groups with the checkpoint's: one saved by another kernel (an older run's loop,
    a run with apex) must not switch the fused kernel off, nor combine it with ``foreach``."""
    for group in adam.param_groups:
        group["fused"], group["foreach"] = True, None


def install() -> list[str]:
    """Replace whichever of megatron's fallback norm and scale kernels are in use; returns what was replaced.
    Idempotent. The Adam kernel is chosen on the built optimizer (:func:`use_fused_adam`)."""
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads, optimizer

    replaced = []
    if clip_grads.l2_norm_impl is utils.local_multi_tensor_l2_norm:
        clip_grads.l2_norm_impl = multi_tensor_l2norm
        replaced.append("multi_tensor_l2norm")
    for module in (clip_grads, optimizer):
        if module.multi_tensor_scale_impl is utils.local_multi_tensor_scale:
            module.multi_tensor_scale_impl = multi_tensor_scale
            replaced.append(f"{module.__name__}.multi_tensor_scale")
    return replaced
