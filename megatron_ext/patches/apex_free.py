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

On an H200 (fp32, 20M parameters) these made megatron's update phase 2.2x HF's (docs/benchmarks.md); on CPU the
loop was half of a 20M optimizer step. :func:`install` replaces each of them with the torch kernel HF's step
runs: ``torch._foreach_norm`` / ``torch._foreach_mul_`` (what ``clip_grad_norm_`` uses) and ``AdamW(fused=True)``
(HF Trainer's default optimizer, ``adamw_torch_fused``), behind the constructor and call signatures megatron
expects from apex. Each replacement happens only where megatron chose its own fallback, so TE's or apex's
kernels are never touched. The optimizer stays a torch ``AdamW``: state dicts and checkpoints are unchanged.
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


def fused_adam(params, adam_w_mode: bool = True, **kwargs) -> torch.optim.Optimizer:
    """apex ``FusedAdam``'s constructor (``adam_w_mode``: decoupled weight decay) on torch's fused kernel."""
    adam = (torch.optim.AdamW if adam_w_mode else torch.optim.Adam)(params, fused=True, **kwargs)
    adam.register_load_state_dict_post_hook(_keep_fused)
    return adam


def _keep_fused(adam: torch.optim.Optimizer) -> None:
    """Loading replaces the param groups with the checkpoint's: one saved by another kernel (an older run's loop,
    a run with apex) must not switch the fused kernel off, nor combine it with ``foreach``."""
    for group in adam.param_groups:
        group["fused"], group["foreach"] = True, None


def install() -> list[str]:
    """Replace whichever of megatron's fallbacks are in use; returns what was replaced. Idempotent."""
    import megatron.core.optimizer as optimizer_package
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
    if optimizer_package.USING_PYTORCH_OPTIMIZER:
        optimizer_package.Adam, optimizer_package.USING_PYTORCH_OPTIMIZER = fused_adam, False
        replaced.append("Adam")
    return replaced
