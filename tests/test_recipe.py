"""Recipes are rejected before any compute, with a message naming the field."""

import pytest
from conftest import TINY

from viq_mllm.recipe import RecipeError, load_recipe


@pytest.mark.parametrize(
    "overrides, world, message",
    [
        (["train.stpes=3"], 1, "train.stpes: unknown key (did you mean train.steps?)"),
        (["model.colour=red"], 1, "model.colour: unknown key"),
        (["train.steps=six"], 1, "train.steps: Input should be a valid integer"),
        (["train.lr=fast"], 1, "train.lr: Input should be a valid number"),
        (["parallel.tp=yes"], 1, "parallel.tp: Input should be a valid integer"),
        (["train.precision=fp16"], 1, "train.precision: Input should be 'fp32', 'bf16' or 'fp8'"),
        (["parallel.tp=3"], 3, "parallel.tp=3: model.num_attention_heads=4 is not divisible by it"),
        (["parallel.tp=4"], 4, "parallel.tp=4: model.num_query_groups=2 is not divisible by it"),
        (["parallel.pp=3"], 3, "parallel.pp=3: model.num_layers=4 is not divisible by it"),
        (["parallel.sequence_parallel=true"], 1, "parallel.sequence_parallel=true needs parallel.transformer_impl"),
        (["train.precision=fp8"], 1, "train.precision=fp8 needs parallel.transformer_impl=transformer_engine"),
        (["parallel.tp=2"], 3, "parallel.tp=2 x parallel.pp=1 does not divide the world size 3"),
        (["train.global_batch_size=6"], 4, "train.global_batch_size=6 is not divisible by train.micro_batch_size=2"),
        (["train.steps=3"], 1, "train.warmup_steps=5 must be smaller than the decay length 3"),
        (["run"], 1, "override 'run' is not of the form key=value"),
        (["data.tokenizer=/models/qwen"], 1, "data.tokenizer: String should match pattern '^(bytes|hf:.+|sentencep"),
    ],
)
def test_bad_recipe_names_the_field(overrides, world, message):
    with pytest.raises(RecipeError) as err:
        load_recipe(TINY, overrides, world_size=world)
    assert message in str(err.value)


def test_overrides_are_typed_yaml_scalars():
    recipe = load_recipe(TINY, ["train.steps=7", "train.lr=1e-3", "log.wandb=disabled", "model.qkv_bias=false"])
    assert (recipe.train.steps, recipe.train.lr, recipe.log.wandb, recipe.model.qkv_bias) == (7, 1e-3, "disabled", False)


def test_cli_rejects_before_launching(tmp_path, capsys, monkeypatch):
    import subprocess

    from viq_mllm import cli

    monkeypatch.setattr(subprocess, "call", lambda *a, **k: pytest.fail("torchrun was launched"))
    run_dir = tmp_path / "never"
    assert cli.main(["train", TINY, "--nproc", "2", "parallel.tp=3", f"run.dir={run_dir}"]) == 2
    err = capsys.readouterr().err
    assert "parallel.tp=3" in err and "num_attention_heads" in err
    assert not run_dir.exists()


def test_shipped_recipes_are_valid():
    from pathlib import Path

    recipes = sorted(Path(TINY).parent.glob("*.yaml"))
    assert len(recipes) >= 4
    for path in recipes:
        load_recipe(path)
