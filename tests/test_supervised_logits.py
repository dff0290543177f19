"""Logits only at supervised positions (megatron_ext.model.gpt.GPT) give megatron's losses and gradients.

The reference is the same GPT computing the output layer and the loss at every position (megatron's own
``_postprocess``), then masked. TP=2 / PP=2 VLM runs through this path are checked against one process by
tests/test_vlm.py.
"""

import pytest
import torch


def per_token_loss_and_grads(layout, all_logits: bool, tie: bool, batch: dict):
    from megatron_ext.model.gpt import build_gpt, transformer_config
    from viq_mllm.recipe import recipe_from_dict

    recipe = recipe_from_dict({
        "run": {"dir": "-"}, "train": {"steps": 1},
        "model": {"num_layers": 2, "hidden_size": 32, "ffn_hidden_size": 64, "num_attention_heads": 4,
                  "num_query_groups": 2, "seq_length": 16, "tie_embeddings": tie},
    })
    gpt = build_gpt(transformer_config(recipe.model), recipe.model, recipe.parallel, 128, layout, 0, all_logits=all_logits)
    loss = gpt(batch["tokens"], batch["position_ids"], None, labels=batch["labels"], loss_mask=batch["loss_mask"])
    (loss * batch["loss_mask"]).sum().backward()
    return loss.detach(), {name: p.grad.clone() for name, p in gpt.named_parameters()}


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_supervised_logits_equal_all_logits_masked(megatron_single, tie):
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 128, (2, 17), generator=g)
    mask = (torch.rand(2, 16, generator=g) > 0.7).float()
    mask[1, :] = 0  # a row with nothing supervised
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "position_ids": torch.arange(16).expand(2, 16),
             "loss_mask": mask}
    loss, grads = per_token_loss_and_grads(megatron_single, False, tie, batch)
    ref_loss, ref_grads = per_token_loss_and_grads(megatron_single, True, tie, batch)
    assert 0 < mask.sum() < 16
    torch.testing.assert_close(loss * mask, ref_loss * mask, rtol=1e-6, atol=1e-6)
    assert torch.equal(loss[mask == 0], torch.zeros(int((mask == 0).sum())))
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-7, msg=name)
    output = "embedding.word_embeddings.weight" if tie else "output_layer.weight"
    assert ref_grads[output].abs().sum() > 0, "the output layer must receive a gradient"


def test_the_output_layer_sees_only_supervised_positions(megatron_single):
    from megatron_ext.model.gpt import build_gpt, transformer_config
    from viq_mllm.recipe import recipe_from_dict

    recipe = recipe_from_dict({"run": {"dir": "-"}, "train": {"steps": 1},
                               "model": {"num_layers": 1, "hidden_size": 32, "ffn_hidden_size": 64,
                                         "num_attention_heads": 4, "seq_length": 16}})
    gpt = build_gpt(transformer_config(recipe.model), recipe.model, recipe.parallel, 128, megatron_single, 0)
    rows = []
    gpt.output_layer.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0] * args[0].shape[1]))
    mask = torch.zeros(1, 16)
    mask[0, [3, 9, 10]] = 1
    tokens = torch.arange(16)[None]
    gpt(tokens, tokens, None, labels=tokens, loss_mask=mask)
    gpt(tokens, tokens, None, labels=tokens, loss_mask=torch.ones(1, 16))
    assert rows == [3, 16]
