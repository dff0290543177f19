"""A one-process run finalizes its gradients with ``finalize_alone`` (the 1 / tokens scaling, no collectives over
groups of one rank); the gradients must equal megatron's ``finalize_model_grads`` bit for bit. Runs of several
processes keep megatron's (tests/test_parallel_equivalence.py compares them with this one-process run)."""

import pytest
import torch


def tiny_trainer(layout, distributed_optimizer: bool):
    from megatron_ext.model import build_gpt, transformer_config
    from megatron_ext.training import build_trainer
    from viq_mllm.recipe import recipe_from_dict

    model = {"num_layers": 2, "hidden_size": 32, "ffn_hidden_size": 64, "num_attention_heads": 4,
             "num_query_groups": 2, "seq_length": 16}
    recipe = recipe_from_dict({
        "run": {"dir": "-"}, "model": model,
        "train": {"steps": 1, "micro_batch_size": 2, "global_batch_size": 6},
        "parallel": {"distributed_optimizer": distributed_optimizer},
    })
    config = transformer_config(recipe.model, recipe.parallel, recipe.train)
    gpt = build_gpt(config, recipe.model, recipe.parallel, 128, layout, 0)
    return build_trainer(recipe, layout, gpt, {"text_size": 128, "padded_size": 128, "text_fingerprint": "-"})


def micro_batches(seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(3):  # three micro-batches, with different supervised token counts
        tokens = torch.randint(0, 128, (2, 17), generator=g)
        batches.append({"tokens": tokens[:, :-1], "labels": tokens[:, 1:],
                        "position_ids": torch.arange(16).expand(2, 16),
                        "loss_mask": (torch.rand(2, 16, generator=g) > 0.3).float()})
    return batches


@pytest.mark.parametrize("distributed_optimizer", [False, True])
def test_alone_finalize_equals_megatrons(megatron_single, distributed_optimizer):
    from megatron.core.distributed import finalize_model_grads
    from megatron_ext.training import finalize_alone, forward_backward

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
