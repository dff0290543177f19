"""Which positions each data-parallel rank reads: every position of a step exactly once, in order, whatever the
data-parallel size (what lets a run resume on another number of ranks)."""

import pytest

from viq_mllm.data.order import rank_micro_batches, sample_index


@pytest.mark.parametrize("global_batch, micro_batch, dp_size", [(8, 1, 1), (8, 2, 2), (12, 3, 4), (6, 6, 1)])
def test_the_ranks_of_a_step_read_its_positions_once_in_order(global_batch, micro_batch, dp_size):
    for step in (0, 3):
        per_rank = [rank_micro_batches(step, global_batch, micro_batch, r, dp_size) for r in range(dp_size)]
        read = [p for rank in per_rank for micro in rank for p in micro]
        assert read == list(range(step * global_batch, (step + 1) * global_batch))
        assert all(len(micro) == micro_batch for rank in per_rank for micro in rank)
        assert all(len(rank) == global_batch // (micro_batch * dp_size) for rank in per_rank)


def test_each_epoch_is_a_permutation_of_the_samples():
    for epoch in range(3):
        seen = sorted(sample_index(epoch * 10 + i, 10, seed=5) for i in range(10))
        assert seen == list(range(10))
    assert [sample_index(i, 10, 5) for i in range(10)] != [sample_index(i, 10, 6) for i in range(10)]
