"""Over a one-rank tensor-parallel group, megatron's region functions are skipped (``megatron_ext.patches.one_rank_regions``):
no region's autograd node is left in the graph, and the loss and gradients are those of megatron's own functions,
bit for bit. Over two ranks the regions stay megatron's (tests/test_parallel_equivalence.py)."""

import torch
from conftest import tiny_trainer, traced_step


def test_one_rank_regions_are_skipped_with_identical_gradients(megatron_single, monkeypatch):
    from megatron.core.tensor_parallel import layers, mappings

    from megatron_ext.patches.one_rank_regions import REGIONS

    trainer = tiny_trainer(megatron_single)
    nodes, loss_sum, grads = traced_step(trainer, 2, "ModelParallelRegion")
    for region in REGIONS:
        monkeypatch.setattr(layers, region, getattr(mappings, region))
    megatron_nodes, megatron_loss_sum, megatron_grads = traced_step(trainer, 2, "ModelParallelRegion")
    assert nodes == []
    assert len(megatron_nodes) == 2 * 3 + 2  # per layer: QKV in, projection and MLP out; embedding, output layer
    assert loss_sum == megatron_loss_sum
    for ours, theirs in zip(grads, megatron_grads, strict=True):
        assert torch.equal(ours, theirs)
