"""The order a run reads its samples in: which sample sits at a global position, and which positions each
data-parallel rank reads at an optimizer step. Both are pure functions of (seed, step), so a resumed run reads
exactly what it would have read, at any data-parallel size.

    >>> [list(r) for r in rank_micro_batches(step=1, global_batch=8, micro_batch=2, dp_rank=1, dp_size=2)]
    [[12, 13], [14, 15]]
"""

from __future__ import annotations

import functools

import torch


def rank_micro_batches(step: int, global_batch: int, micro_batch: int, dp_rank: int, dp_size: int) -> list[range]:
    """The global positions of each micro-batch rank ``dp_rank`` reads at ``step``: the step's ``global_batch``
    positions split evenly over the ranks in order, then into micro-batches of ``micro_batch``."""
    per_rank = global_batch // dp_size
    first = step * global_batch + dp_rank * per_rank
    return [range(start, start + micro_batch) for start in range(first, first + per_rank, micro_batch)]


def sample_index(position: int, num_samples: int, seed: int) -> int:
    """The sample read at a global position: a fresh permutation per epoch, seeded by (seed, epoch)."""
    epoch, offset = divmod(position, num_samples)
    return int(_permutation(num_samples, seed, epoch)[offset])


@functools.lru_cache(maxsize=4)
def _permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
