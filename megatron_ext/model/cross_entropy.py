"""Vocab-parallel cross-entropy: megatron's arithmetic, without its two avoidable costs.

megatron-core's ``vocab_parallel_cross_entropy`` (what its GPT computes the loss with, unfused) takes each row's max
with ``torch.max(logits, dim=-1)``, which also computes arg-max indices it discards: on CPU several times the
time of ``amax``. It also all-reduces the max, the
target logits and the exponential sums over the tensor-parallel group when that group is a single rank, and
selects with boolean-mask assignments, which on a GPU read the mask back to the host.

This function takes the same steps on the same values (max, subtract in place, target logit, ``exp`` in place,
sum, ``log(sum) - target``, softmax kept for the backward, ``softmax - one_hot`` times the incoming gradient), so
losses and gradients are bit-identical to megatron's; the collectives run only across more than one rank.

Shapes: ``logits [s, b, V / tp]`` (this rank's vocabulary slice), ``target [s, b]`` (global ids) -> loss ``[s, b]``,
fp32 whatever the logits' dtype. Example with ``tp = 2``, ``V = 8``: rank 1 holds ids 4-7, so a target 5 is its
local column 1, and a target 2 contributes a target logit of 0 there (rank 0 supplies it through the all-reduce).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state


def _all_reduce(tensor: torch.Tensor, op: dist.ReduceOp) -> None:
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(tensor, op=op, group=parallel_state.get_tensor_model_parallel_group())


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        logits_max = logits.amax(dim=-1)
        _all_reduce(logits_max, dist.ReduceOp.MAX)
        logits -= logits_max.unsqueeze(-1)

        width = logits.size(-1)
        start = parallel_state.get_tensor_model_parallel_rank() * width
        held = (target >= start) & (target < start + width)
        local = torch.where(held, target - start, 0).unsqueeze(-1)
        target_logits = logits.gather(-1, local).squeeze(-1).masked_fill_(~held, 0.0)
        _all_reduce(target_logits, dist.ReduceOp.SUM)

        exp_logits = torch.exp(logits, out=logits)
        sum_exp = exp_logits.sum(dim=-1)
        _all_reduce(sum_exp, dist.ReduceOp.SUM)
        loss = torch.log(sum_exp) - target_logits
        softmax = exp_logits.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local, held)
        return loss

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        softmax, local, held = ctx.saved_tensors
        grad = softmax.scatter_add_(-1, local, held.unsqueeze(-1).to(softmax.dtype).neg_())
        return grad.mul_(grad_output.unsqueeze(-1)), None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy of ``target`` under vocabulary-sharded ``logits`` (see the module docstring).
    Overwrites ``logits`` (fp32 ones) with the softmax, as megatron's does, to keep one logits-sized buffer."""
    return _VocabParallelCrossEntropy.apply(logits, target)
