"""Every runtime patch this project applies to megatron-core, behind one logged :func:`install`.

=================  ==========================================================  =====================================
patch              what it replaces                                            active
=================  ==========================================================  =====================================
cpu_compat         megatron's CUDA calls (devices, RNG, streams, ``.cuda()``)  without CUDA only: what makes megatron
                                                                               run there at all
apex_free          megatron's fallback norm / scale kernels and per-parameter  CPU; on GPU opt-in
                   AdamW when neither TE nor apex is installed
one_rank_regions   tensor-parallel region functions over a one-rank group      CPU; on GPU opt-in
plain_linear       megatron's linear autograd function when it has nothing     CPU; on GPU opt-in
                   to communicate, fuse or defer
cross_entropy      megatron's unfused vocab-parallel loss (the GPT's           CPU; on GPU megatron's fused loss,
                   ``compute_language_model_loss``)                            ours opt-in
=================  ==========================================================  =====================================

On a GPU megatron's own path is the default (TE or apex where installed, its fused loss) until
``tools/gpu_check.sh`` has measured a patch there; opt in with ``VIQ_MLLM_GPU_PATCHES=apex_free,plain_linear``
(or ``all``). Each patch is bit-identical to the path it replaces (its test says against what); on CPU they exist
for speed (docs/benchmarks.md), except ``cpu_compat``, which exists for correctness.

    >>> install()          # on a CPU machine, once the gloo process group exists
    ['cpu_compat', 'apex_free', 'one_rank_regions', 'plain_linear', 'cross_entropy']
"""

from __future__ import annotations

import logging
import os

import torch

from megatron_ext.patches import apex_free, cpu_compat, one_rank_regions, plain_linear

GPU_OPT_IN = "VIQ_MLLM_GPU_PATCHES"
OPTIONAL = ("apex_free", "one_rank_regions", "plain_linear", "cross_entropy")
# cross_entropy has no installer: transformer_config reads enabled("cross_entropy") to pick the loss
_INSTALLERS = {"apex_free": apex_free.install, "one_rank_regions": one_rank_regions.install,
               "plain_linear": plain_linear.install}
_installed: list[str] | None = None
log = logging.getLogger(__name__)


def enabled(name: str) -> bool:
    """Whether the optional patch ``name`` is active in this process: always without CUDA, on a GPU when
    ``VIQ_MLLM_GPU_PATCHES`` names it (or says ``all``)."""
    if name not in OPTIONAL:
        raise ValueError(f"unknown patch {name!r}; the optional ones are {', '.join(OPTIONAL)}")
    if not torch.cuda.is_available():
        return True
    chosen = {part.strip() for part in os.environ.get(GPU_OPT_IN, "").split(",") if part.strip()}
    unknown = chosen - set(OPTIONAL) - {"all"}
    if unknown:
        raise ValueError(f"{GPU_OPT_IN}: unknown patch(es) {', '.join(sorted(unknown))}; "
                         f"choose from {', '.join(OPTIONAL)} or all")
    return "all" in chosen or name in chosen


def install() -> list[str]:
    """Apply the patches active on this device, once per process (after the process group exists, before any
    model is built); returns their names, and logs them once (rank 0's log)."""
    global _installed
    if _installed is None:
        _installed = ["cpu_compat"] if cpu_compat.install() else []
        for name in OPTIONAL:
            if enabled(name):
                if name in _INSTALLERS:
                    _INSTALLERS[name]()
                _installed.append(name)
        log.info("megatron-core patches: %s (%s)", ", ".join(_installed) or "none",
                 "CPU" if not torch.cuda.is_available() else f"GPU, {GPU_OPT_IN} to opt in")
    return list(_installed)


def configure_optimizer(megatron_optimizer) -> None:
    """What the active patches change on a built megatron optimizer: torch's fused Adam kernel (apex_free)."""
    if "apex_free" in (_installed or []):
        apex_free.use_fused_adam(megatron_optimizer)
