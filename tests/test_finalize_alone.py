"""A one-process run finalizes its gradients with ``finalize_alone`` (the 1 / tokens scaling, no collectives over
groups of one rank); the gradients must equal megatron's ``finalize_model_grads`` bit for bit. Runs of several
processes keep megatron's (tests/test_parallel_equivalence.py compares them with this one-process run)."""

import pytest
import torch
from conftest import micro_batches, tiny_trainer


@pytest.mark.parametrize("distributed_optimizer", [False, True])
def test_alone_finalize_equals_megatrons(megatron_single, distributed_optimizer):
    from megatron.core.distributed import finalize_model_grads

    from megatron_ext.training.loop import finalize_alone, forward_backward

    trainer = tiny_trainer(megatron_single, distributed_optimizer)
    config = trainer.model.config
    assert config.finalize_model_grads_func is finalize_alone  # the one-process wiring
    grads = {}
    unscaled = lambda model, num_tokens=None, **_: None  # the buffers as the backward left them: d(loss sum)
    for name, finalize in (("megatron", finalize_model_grads), ("alone", finalize_alone), ("unscaled", unscaled)):
        config.finalize_model_grads_func = finalize
        loss_sum, count, _, _ = forward_backward(trainer, iter(micro_batches(seed=1)))
        grads[name] = [buffer.grad_data.clone() for buffer in trainer.model.buffers]
    assert count == sum(float(b["loss_mask"].sum()) for b in micro_batches(seed=1))
    for ours, theirs in zip(grads["alone"], grads["megatron"], strict=True):
        assert torch.equal(ours, theirs)
    for ours, raw in zip(grads["alone"], grads["unscaled"], strict=True):  # d(mean over the global batch)
        torch.testing.assert_close(ours, raw / count, rtol=1e-6, atol=0)
