"""Micro-batches built in DataLoader workers, ahead of the step that consumes them.

Item ``i`` of a run is micro-batch ``i % n`` of step ``i // n`` on this data-parallel rank (``n`` micro-batches a
step): a pure function of ``(seed, step, rank)``, so the batches are the same with any number of workers, and a
resumed run starts the loader at its step. With ``workers > 0`` torch's DataLoader builds them in that many
processes (in order, ``prefetch`` items ahead each), which is also where ``transform`` runs: the continuous
baseline decodes and preprocesses its images there.

    >>> batches = MicroBatchLoader(dataset, global_batch=8, micro_batch=2, dp_rank=0, dp_size=2, workers=2)
    >>> [b["tokens"].shape for b in batches(step=0)]          # what run_training's batches_for_step expects
    [torch.Size([1, 512]), torch.Size([1, 512])]
"""

from __future__ import annotations

from typing import Callable, Iterator

from torch.utils.data import DataLoader, Dataset

from viq_mllm.data.multimodal import PackedDataset
from viq_mllm.data.order import rank_micro_batches


class _RankMicroBatches(Dataset):
    def __init__(self, dataset: PackedDataset, global_batch: int, micro_batch: int, dp_rank: int, dp_size: int,
                 transform: Callable[[dict], dict]):
        self.dataset, self.transform = dataset, transform
        self.shape = (global_batch, micro_batch, dp_rank, dp_size)
        self.per_step = global_batch // (micro_batch * dp_size)

    def __getitem__(self, index: int) -> dict:
        step, micro = divmod(index, self.per_step)
        positions = rank_micro_batches(step, *self.shape)[micro]
        return self.transform(self.dataset.batch_at(positions))


class MicroBatchLoader:
    """``loader(step)`` yields this rank's micro-batches of ``step``; steps are read in order from the first one
    asked for (a new loader is started if a run asks out of order)."""

    def __init__(self, dataset: PackedDataset, global_batch: int, micro_batch: int, dp_rank: int, dp_size: int,
                 workers: int = 0, transform: Callable[[dict], dict] = lambda batch: batch, prefetch: int = 2):
        self.items = _RankMicroBatches(dataset, global_batch, micro_batch, dp_rank, dp_size, transform)
        self.workers, self.prefetch = workers, prefetch
        self._iterator: Iterator[dict] | None = None
        self._next_step = -1

    def __call__(self, step: int) -> Iterator[dict]:
        if self._iterator is None or step != self._next_step:
            self._iterator = self._start(step)
        self._next_step = step + 1
        for _ in range(self.items.per_step):
            yield next(self._iterator)

    def _start(self, step: int) -> Iterator[dict]:
        first = step * self.items.per_step
        loader = DataLoader(self.items, batch_size=None, sampler=_From(first), num_workers=self.workers,
                            prefetch_factor=self.prefetch if self.workers else None,
                            collate_fn=lambda item: item)
        return iter(loader)


class _From:
    """Indices ``first, first + 1, ...``: as many as the run asks for."""

    def __init__(self, first: int):
        self.first = first

    def __iter__(self) -> Iterator[int]:
        index = self.first
        while True:
            yield index
            index += 1
