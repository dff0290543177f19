"""megatron's tensor-parallel regions without their autograd functions when the tensor-parallel group has one rank.

megatron's linear layers and vocabulary-parallel embedding enter and leave tensor parallelism through the
functions of ``megatron.core.tensor_parallel.mappings``: ``copy_to_tensor_model_parallel_region`` before a
column-parallel GEMM (identity forward, all-reduce of the gradient backward), ``reduce_from_..`` after a
row-parallel GEMM and the embedding, and the gather / scatter pair. On a one-rank group each is the identity both
ways (megatron's own ``_reduce``, ``_gather_*`` and ``_split_*`` return their input unchanged), yet each call is a
Python ``autograd.Function``: a forward apply and a Python backward node per call. A
Llama layer passes through three of them (QKV, attention output, MLP output), the embedding and the output layer
one each. TP=1 is the common layout of models below a few billion parameters, with any number of data-parallel
ranks, so this is the case of most runs, on GPU as on CPU.

:func:`install` wraps the four functions where ``megatron.core.tensor_parallel.layers`` calls them (it imports
them by name): over a one-rank group they return their input, over a larger group they are megatron's, untouched.
The result is bit-identical (``tests/test_one_rank_regions.py``). Transformer Engine's layers do their own tensor
parallelism and are not affected; with them only the embedding and the output layer take the shortcut.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

REGIONS = (
    "copy_to_tensor_model_parallel_region",
    "reduce_from_tensor_model_parallel_region",
    "gather_from_tensor_model_parallel_region",
    "scatter_to_tensor_model_parallel_region",
)


def skip_on_one_rank(region: Callable) -> Callable:
    """``region(input_, group)`` that returns ``input_`` itself when ``group`` has one rank."""

    @functools.wraps(region)
    def enter_or_skip(input_: torch.Tensor, group=None) -> torch.Tensor:
        if group is not None and group.size() == 1:
            return input_
        return region(input_, group)

    enter_or_skip.skips_one_rank = True
    return enter_or_skip


def install() -> list[str]:
    """Wrap the regions ``layers`` calls; returns the names wrapped now (none the second time)."""
    from megatron.core.tensor_parallel import layers

    wrapped = []
    for name in REGIONS:
        region = getattr(layers, name)
        if not getattr(region, "skips_one_rank", False):
            setattr(layers, name, skip_on_one_rank(region))
            wrapped.append(name)
    return wrapped
