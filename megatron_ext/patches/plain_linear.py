"""megatron's linear GEMM as torch's ``F.linear`` when it has nothing else to do.

``ColumnParallelLinear`` and ``RowParallelLinear`` multiply through
``linear_with_grad_accumulation_and_async_allreduce``, a Python ``autograd.Function`` whose extra work is all
optional: the all-reduce of the input gradient (column-parallel at TP > 1), the gather and reduce-scatter of
sequence parallelism, gradient-accumulation fusion (the weight gradient GEMM-accumulated straight into DDP's
``main_grad``, apex's CUDA kernel) and the deferred weight gradient of the output layer. Without any of them it
computes ``input @ weight.T`` (then ``+ bias``) forward and ``grad @ weight``, ``grad.T @ input`` backward, which
is what torch's autograd of ``F.linear`` computes in C++, but with a Python forward and a Python backward node per
call: one per linear layer (QKV, attention output, MLP output, the output layer) per micro-batch. That is every
row-parallel GEMM without sequence parallelism and every column-parallel GEMM at TP = 1, wherever fusion is off:
on CPU (``model.transformer_config``), and on a GPU without apex's kernel (the local spec; Transformer Engine's
layers are its own).

:func:`install` wraps the function where ``layers`` calls it: in that case it returns ``F.linear(input, weight)``
and adds the bias in a second operation, as megatron does (a fused ``addmm`` would round once where megatron
rounds twice), so values and gradients are bit-identical (``tests/test_plain_linear.py``); otherwise megatron's
function runs. What it saves is in docs/benchmarks.md (``bench train``).

    >>> x, w = torch.randn(5, 2, 8, requires_grad=True), torch.randn(3, 8, requires_grad=True)  # [s, b, h], [o, h]
    >>> out = plain_when_possible(layers.linear_with_grad_accumulation_and_async_allreduce)(x, w, None,
    ...                                                                                     False, False, False)
    >>> out.shape, out.grad_fn.name()  # megatron's: LinearWithGradAccumulationAndAsyncCommunicationBackward
    (torch.Size([5, 2, 3]), 'UnsafeViewBackward0')
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
import torch.nn.functional as F

NAME = "linear_with_grad_accumulation_and_async_allreduce"


def plain_when_possible(megatron_linear: Callable) -> Callable:
    """``megatron_linear`` (same signature) that runs ``F.linear`` when it would communicate, fuse and defer
    nothing."""

    @functools.wraps(megatron_linear)
    def linear(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
               gradient_accumulation_fusion: bool, allreduce_dgrad: bool, sequence_parallel: bool,
               grad_output_buffer: Optional[list] = None, *args, **kwargs) -> torch.Tensor:
        if gradient_accumulation_fusion or allreduce_dgrad or sequence_parallel or grad_output_buffer is not None:
            return megatron_linear(input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad,
                                   sequence_parallel, grad_output_buffer, *args, **kwargs)
        output = F.linear(input, weight)
        return output if bias is None else output + bias

    linear.plain_when_possible = True
    return linear


def install() -> bool:
    """Wrap the function ``layers`` calls; returns whether it was wrapped now (False the second time)."""
    from megatron.core.tensor_parallel import layers

    megatron_linear = getattr(layers, NAME)
    if getattr(megatron_linear, "plain_when_possible", False):
        return False
    setattr(layers, NAME, plain_when_possible(megatron_linear))
    return True
