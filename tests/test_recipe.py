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
        (["parallel.vpp=2"], 1, "parallel.vpp=2 interleaves pipeline stages: it needs parallel.pp > 1"),
        (["parallel.pp=2", "parallel.vpp=4"], 2, "parallel.vpp=4: model.num_layers=4 does not split into parallel.pp"),
        # world 4 at PP=2 is DP=2: a global batch of 4 in micro-batches of 2 is 1 micro-batch per rank, not a group
        (["parallel.pp=2", "parallel.vpp=2", "train.global_batch_size=4"], 4,
         "parallel.vpp=2: the interleaved schedule runs micro-batches in groups of parallel.pp=2"),
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


def test_a_base_file_is_merged_below_the_recipe_section_by_section(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "shape.yaml").write_text(
        "model: {num_layers: 2, hidden_size: 32, ffn_hidden_size: 64, num_attention_heads: 4, seq_length: 16}\n"
        "data: {kind: text, text_files: [a.txt, b.txt]}\n")
    (tmp_path / "run.yaml").write_text(
        "base: models/shape.yaml\nrun: {dir: r}\ntrain: {steps: 3}\nmodel: {seq_length: 64}\n"
        "data: {text_files: [c.txt]}\n")
    recipe = load_recipe(tmp_path / "run.yaml", ["model.hidden_size=48"])
    assert (recipe.model.num_layers, recipe.model.hidden_size, recipe.model.seq_length) == (2, 48, 64)
    assert recipe.data.text_files == ["c.txt"]  # lists are replaced, not concatenated


def test_base_files_that_include_each_other_or_are_missing_are_named(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(RecipeError, match="include each other"):
        load_recipe(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: [missing.yaml]\n")
    with pytest.raises(RecipeError, match=r"missing.yaml \(base of .*c.yaml\)"):
        load_recipe(tmp_path / "c.yaml")


def test_the_gpu_recipes_share_the_qwen_presets_of_the_hf_configs():
    """Qwen2.5-0.5B / 1.5B / 7B as their HF config.json files give them (hidden, layers, heads, kv heads, MLP)."""
    from pathlib import Path

    hf = {"0.5b": (896, 24, 14, 2, 4864), "1.5b": (1536, 28, 12, 2, 8960), "7b": (3584, 28, 28, 4, 18944)}
    for size, shape in hf.items():
        for name in (f"qwen2.5_{size}_text_gpu.yaml", f"vlm_qwen2.5_{size}_gpu.yaml"):
            m = load_recipe(Path(TINY).parent / name).model
            assert (m.hidden_size, m.num_layers, m.num_attention_heads, m.num_query_groups,
                    m.ffn_hidden_size) == shape, name


@pytest.mark.parametrize("raw, message", [
    ({"kind": "vlm", "run": {"dir": "r"}, "train": {"steps": 1}, "model": {}}, "data: required field is missing"),
    ({"run": {"dir": "r"}, "train": {"steps": 1}, "viq": {"stage": "stage1"}}, "viq: unknown key"),
    ({"kind": "ocr", "run": {"dir": "r"}}, "kind: 'ocr' is not one of text_lm, vlm, viq"),
])
def test_each_run_kind_has_its_own_sections(raw, message):
    from viq_mllm.recipe import recipe_from_dict

    with pytest.raises(RecipeError, match=message):
        recipe_from_dict(raw)
