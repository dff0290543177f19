"""The ViQ tokenizer stages: the 2-1 -> 2-2 hand-off, every stage's loss terms through the real command,
resume, the frozen language model, the perceptual distance, and the recipe refusals."""

import json
import math

import pytest
import torch
from conftest import QUIET, ROOT, TINY, viq_mllm

from viq_mllm.viq import ViQTokenizer
from viq_mllm.viq_training.stages import HandoffError, carry_over, tokenizer_for_stage

FSQ_ONLY = ("head.rope_blocks.", "head.project_in.", "head.embedder.project_out.")


def test_proximal_to_fsq_handoff_loads_every_compatible_tensor_and_reinitialises_exactly_the_changed_ones():
    proximal = ViQTokenizer.from_config("tiny", preset="16k", seed=1, quantizer="proximal")
    fresh = ViQTokenizer.from_config("tiny", preset="16k", seed=7).state_dict()
    fsq, report = tokenizer_for_stage("fsq", proximal, proximal.config, seed=7)
    source, state = proximal.state_dict(), fsq.state_dict()
    for key, value in state.items():
        if key.startswith(FSQ_ONLY):
            torch.testing.assert_close(value, fresh[key], rtol=0, atol=0)  # the seed-7 fresh initialisation
            assert key in report.reinitialised
        else:
            origin = key.replace("head.embedder.post.", "head.post.")
            torch.testing.assert_close(value, source[origin], rtol=0, atol=0)
            assert report.loaded[key] == origin
    assert set(report.reinitialised) == {k for k in state if k.startswith(FSQ_ONLY)}
    assert set(report.dropped) == {k for k in source if k.startswith("head.bottleneck.")}
    codes = fsq.encode([torch.randint(0, 255, (64, 96, 3), dtype=torch.uint8).numpy()])[0]
    assert codes.shape[-1] == 4 and 0 <= int(codes.min()) and int(codes.max()) < 15360  # the 16k preset


def test_same_quantizer_handoff_is_strict_and_other_architectures_are_refused():
    stage1 = ViQTokenizer.from_config("tiny", seed=1, quantizer="proximal")
    proximal, report = tokenizer_for_stage("proximal", stage1, stage1.config, seed=3)
    assert not report.reinitialised and not report.dropped
    for key, value in proximal.state_dict().items():
        torch.testing.assert_close(value, stage1.state_dict()[key], rtol=0, atol=0)
    with pytest.raises(HandoffError, match="width"):
        carry_over(stage1, ViQTokenizer.from_config("tiny", quantizer="proximal", width=32, heads=4))
    with pytest.raises(HandoffError, match="no hand-off from a fsq tokenizer to a proximal"):
        carry_over(ViQTokenizer.from_config("tiny"), stage1)


def test_perceptual_distance_is_zero_for_identical_images_and_grows_with_the_distortion():
    from viq_mllm.viq_training.teachers import PerceptualDistance

    torch.manual_seed(0)
    distance = PerceptualDistance()
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    noises = [distance(x, (x + s * torch.randn_like(x)).clamp(-1, 1)).item() for s in (0.05, 0.2, 0.6)]
    assert distance(x, x).item() < 1e-10
    assert 0 < noises[0] < noises[1] < noises[2]


# --- the stages through `viq-mllm train` on tiny random models ----------------------------------------------

MODEL = ["model.num_layers=4", "model.hidden_size=64", "model.ffn_hidden_size=172", "model.num_attention_heads=4",
         "model.num_query_groups=2", "model.seq_length=128", "model.norm_eps=1e-6", "model.qkv_bias=true",
         "model.rope_theta=10000.0"]
TERMS = {"stage1": {"loss_text", "loss_distill"}, "proximal": {"loss_text", "loss_distill", "loss_rec"},
         "fsq": {"loss_text", "loss_distill", "loss_rec", "codebook_usage", "code_perplexity"},
         "decoder": {"loss_rec", "loss_perceptual"}}
RECIPE = {"stage1": "viq_tiny_stage1", "proximal": "viq_tiny_stage2_proximal", "fsq": "viq_tiny_stage2_fsq",
          "decoder": "viq_tiny_decoder"}


@pytest.fixture(scope="module")
def stage_assets(tmp_path_factory):
    from viq_mllm.bench.synthetic import make_captioned_shapes

    root = tmp_path_factory.mktemp("viq_stages")
    make_captioned_shapes(root / "images", 24)
    (root / "images" / "broken.png").write_bytes(b"")
    make_captioned_shapes(root / "photos", 6, seed=1)  # uncaptioned images for image-only steps
    for caption in (root / "photos").glob("*.txt"):
        caption.unlink()
    (root / "images" / "broken.txt").write_text("A broken file.")
    viq_mllm("train", TINY, f"run.dir={root / 'lm'}", "train.steps=2", "train.warmup_steps=1", "checkpoint.every=2",
             *QUIET)
    return {"root": root, "images": root / "images", "lm": root / "lm" / "checkpoints" / "step_00000002"}


def stage_args(assets, stage: str, run_dir, previous=None, *extra: str) -> list[str]:
    args = [str(ROOT / "recipes" / f"{RECIPE[stage]}.yaml"), f"run.dir={run_dir}", *QUIET, "train.warmup_steps=0",
            f"data.sources=[{{path: {assets['images']}}}]", "viq.preset=2k", "checkpoint.every=0"]
    if previous is not None:
        args.append(f"init.from={previous}")
    if stage == "decoder":
        return args + ["train.global_batch_size=4", "viq.eval_images=" + str(assets["images"]), *extra]
    return args + [*MODEL, f"init.checkpoint={assets['lm']}", "data.tokenizer=bytes", "train.global_batch_size=2",
                   "viq.teacher_resolution=64", "viq.text_every=1", "viq.image_sources=[]", *extra]


def weighted_aux(stage: str, row: dict) -> float:
    from viq_mllm.recipe import load_recipe

    v = load_recipe(ROOT / "recipes" / f"{RECIPE[stage]}.yaml").viq
    return v.distill_weight * row["loss_distill"] + v.rec_weight * row.get("loss_rec", 0.0)


@pytest.fixture(scope="module")
def chain(stage_assets):
    """The four stages, 3 steps each (2-2 with a checkpoint for the frozen-LM check), each from the previous."""
    from viq_mllm.metrics import read_metrics

    root, runs, previous = stage_assets["root"], {}, None
    for stage in RECIPE:
        run_dir = root / stage
        extra = ["train.steps=3"] + (["checkpoint.every=3"] if stage == "fsq" else [])
        if stage == "stage1":
            extra.append("viq.eval_captions=" + str(stage_assets["images"]))
        viq_mllm("train", *stage_args(stage_assets, stage, run_dir, previous, *extra), timeout=600)
        runs[stage] = {"dir": run_dir, "rows": read_metrics(run_dir),
                       "eval": json.loads((run_dir / "eval.json").read_text())}
        previous = run_dir
    return runs


@pytest.mark.e2e
def test_each_stage_logs_its_loss_terms_finite_and_leaves_a_loadable_tokenizer(chain):
    """The terms' relation (the loss is their weighted sum) at every step of every stage; their values against an
    independent computation: the decoder stage's and an LLM stage's below."""
    for stage, run in chain.items():
        assert len(run["rows"]) == 3
        for row in run["rows"]:
            assert TERMS[stage] <= set(row), (stage, sorted(row))
            assert all(math.isfinite(row[k]) for k in TERMS[stage]), row
            if stage != "decoder":
                assert row["loss_aux"] == pytest.approx(weighted_aux(stage, row), rel=1e-5)
                assert row["loss_text"] == pytest.approx(row["loss"], rel=1e-9)
        tokenizer = ViQTokenizer.from_pretrained(run["dir"] / "tokenizer")
        assert tokenizer.config.quantizer == ("fsq" if stage in ("fsq", "decoder") else "proximal")
        assert any("broken.png" in source for source, _ in run["eval"]["skipped"])
    handoff = json.loads((chain["fsq"]["dir"] / "handoff.json").read_text())
    assert {k.split(".")[1] for k in handoff["reinitialised"]} == {"rope_blocks", "project_in", "embedder"}
    captions = chain["stage1"]["eval"]["captions"]
    assert captions["count"] == 24 and math.isfinite(captions["loss_other_image"])
    rec = chain["decoder"]["eval"]["reconstruction"]
    assert {"psnr", "ssim", "psnr_patch_mean_baseline", "ssim_patch_mean_baseline", "codebook_usage"} <= set(rec)


@pytest.mark.e2e
def test_the_decoder_stage_logs_the_reconstruction_loss_of_its_first_batch(chain, stage_assets):
    """Step 1's terms recomputed outside the stage, from the fsq stage's tokenizer (where the decoder stage starts)
    through the serving path (codes -> ``embed`` -> decoder, not the training forward): the pixel MSE of each image
    of the step's batch, averaged; the EfficientNet distance of those reconstructions; the loss their weighted
    sum. Tolerance 1e-4 relative: the same float32 arithmetic in another order."""
    from viq_mllm.data.captioned import images_for_step, load_captioned
    from viq_mllm.recipe import load_recipe
    from viq_mllm.viq.vit import cu_seqlens_of
    from viq_mllm.viq_training.teachers import PerceptualDistance

    recipe = load_recipe(ROOT / "recipes" / f"{RECIPE['decoder']}.yaml")
    tokenizer = ViQTokenizer.from_pretrained(chain["fsq"]["dir"] / "tokenizer")
    items = load_captioned([stage_assets["images"]], None, tokenizer.config.image_base, tokenizer.config.max_pixels,
                           need_captions=False).preprocessed()
    batch = images_for_step(items, recipe.train.seed, 0, 4)  # the stage's global_batch_size (stage_args)
    with torch.no_grad():
        codes = tokenizer.encode_preprocessed(batch)
        features = torch.cat([f.reshape(-1, f.shape[-1]) for f in tokenizer.embed(codes)])
        grids = [item.grid for item in batch]
        recon = tokenizer.decoder(features, cu_seqlens_of([h * w for h, w in grids]), grids)
        mse = torch.stack([((r - item.pixels) ** 2).mean() for r, item in zip(recon, batch)]).mean()
        distance = PerceptualDistance()
        perceptual = torch.stack([distance(r[None], item.pixels[None]) for r, item in zip(recon, batch)]).mean()
    row = chain["decoder"]["rows"][0]
    assert row["loss_rec"] == pytest.approx(float(mse), rel=1e-4)
    assert row["loss_perceptual"] == pytest.approx(float(perceptual), rel=1e-4)
    assert row["loss"] == pytest.approx(float(mse) + recipe.viq.perceptual_weight * float(perceptual), rel=1e-4)


@pytest.mark.e2e
def test_an_llm_stage_logs_the_reconstruction_and_distillation_of_its_image(chain, stage_assets, tmp_path):
    """The fsq stage's step-1 terms recomputed outside the stage. The source holds one captioned image, so every
    image of the step is that one whatever the packing; the learning rate is 1e-30, so the tokenizer the run leaves
    is the one step 1 ran. ``loss_rec``: the MSE of the serving path's reconstruction (codes -> ``embed`` ->
    decoder, not the training forward). ``loss_distill``: 1 - cos between the pooled features and the frozen
    teacher's vector (the starting encoder, the proximal stage's, on the image resized to 64 px). Tolerance 1e-4
    relative: the same float32 arithmetic in another order."""
    import torch.nn.functional as F

    from viq_mllm.bench.synthetic import make_captioned_shapes
    from viq_mllm.data.captioned import load_captioned
    from viq_mllm.metrics import read_metrics
    from viq_mllm.viq.vit import cu_seqlens_of

    make_captioned_shapes(tmp_path / "one", 1)
    run = tmp_path / "run"
    viq_mllm("train", *stage_args(stage_assets, "fsq", run, chain["proximal"]["dir"], "train.steps=1",
                                  "train.lr=1e-30", "train.min_lr=0", f"data.sources=[{{path: {tmp_path / 'one'}}}]"))
    row = read_metrics(run)[0]
    tokenizer = ViQTokenizer.from_pretrained(run / "tokenizer")
    teacher = ViQTokenizer.from_pretrained(chain["proximal"]["dir"] / "tokenizer").vit
    (item,) = load_captioned([tmp_path / "one"], None, tokenizer.config.image_base, tokenizer.config.max_pixels,
                             need_captions=False).preprocessed()
    with torch.no_grad():
        (features,) = tokenizer.embed(tokenizer.encode_preprocessed([item]))
        features, cu = features.reshape(-1, features.shape[-1]), cu_seqlens_of([item.grid[0] * item.grid[1]])
        mse = ((tokenizer.decoder(features, cu, [item.grid])[0] - item.pixels) ** 2).mean()
        square = F.interpolate(item.pixels[None], size=(64, 64), mode="bilinear", antialias=True, align_corners=False)
        target = teacher.pooled(*teacher([square[0]], [(4, 4)]))  # 64 px: 4 x 4 patches of 16
        distill = 1 - F.cosine_similarity(tokenizer.vit.pooled(features, cu), target, dim=-1).mean()
    assert row["loss_rec"] == pytest.approx(float(mse), rel=1e-4)
    assert row["loss_distill"] == pytest.approx(float(distill), rel=1e-4)


@pytest.mark.e2e
def test_the_language_model_stays_frozen(chain, stage_assets):
    from megatron_ext.model.gpt import gpt_from_checkpoint
    from megatron_ext.training.parallel import init_distributed, shutdown

    layout = init_distributed(1, 1, 0)
    try:
        before, _ = gpt_from_checkpoint(stage_assets["lm"], layout)
        after, _ = gpt_from_checkpoint(chain["fsq"]["dir"] / "checkpoints" / "step_00000003", layout)
        for (name, a), (_, b) in zip(before.state_dict().items(), after.state_dict().items()):
            if not name.endswith("_extra_state"):
                torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    finally:
        shutdown()
    first, last = (ViQTokenizer.from_pretrained(chain[s]["dir"] / "tokenizer") for s in ("proximal", "fsq"))
    assert not torch.equal(first.vit.blocks[0].mlp.fc1.weight, last.vit.blocks[0].mlp.fc1.weight)  # the ViT trained


@pytest.mark.e2e
def test_image_only_steps_train_the_tokenizer_terms_without_the_language_model(chain, stage_assets, tmp_path):
    from viq_mllm.metrics import read_metrics

    viq_mllm("train", *stage_args(stage_assets, "fsq", tmp_path / "run", chain["proximal"]["dir"], "train.steps=4",
                                  "viq.text_every=2", "viq.images_per_step=6",
                                  f"viq.image_sources=[{stage_assets['root'] / 'photos'}]"))
    rows = read_metrics(tmp_path / "run")
    assert ["loss_text" in r for r in rows] == [True, False, True, False]
    for row in rows:
        assert TERMS["fsq"] - {"loss_text"} <= set(row) and row["grad_norm"] > 0, row
        assert row["loss_aux"] == pytest.approx(weighted_aux("fsq", row), rel=1e-5)
    for row in rows[1::2]:  # the step's loss is its weighted terms; the LM saw no token
        assert row["loss"] == pytest.approx(row["loss_aux"], rel=1e-6) and row["real_tokens"] == 0


@pytest.mark.e2e
@pytest.mark.parametrize("stage, previous, keys, extra", [
    ("proximal", "stage1", ("loss", "loss_distill", "loss_rec"), ["viq.text_every=2", "viq.images_per_step=4"]),
    ("decoder", "fsq", ("loss", "loss_rec", "loss_perceptual"), []),  # the plain PyTorch loop
])
def test_a_stopped_stage_resumes_exactly(chain, stage_assets, tmp_path, stage, previous, keys, extra):
    """The megatron loop (caption steps and image-only steps) and the decoder stage's plain loop."""
    from viq_mllm.metrics import read_metrics

    def run(name: str, steps: int, every: int) -> None:
        viq_mllm("train", *stage_args(stage_assets, stage, tmp_path / name, chain[previous]["dir"],
                                      f"train.steps={steps}", f"checkpoint.every={every}",
                                      "train.decay_steps=4", *extra))  # one schedule for 2 + 2 and 4 steps

    run("whole", 4, 0)
    run("split", 2, 2)
    run("split", 4, 2)
    whole, split = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "split")
    assert [r["step"] for r in split] == [1, 2, 3, 4]
    for a, b in zip(whole, split):
        for key in keys:
            assert abs(a[key] - b[key]) <= 1e-6 * abs(a[key]), (key, a, b)


@pytest.mark.parametrize("override, message", [
    (["viq.stage=proximal"], "init.from"),
    (["parallel.pp=2"], "parallel.pp=2"),
    (["init.checkpoint=null"], "init.checkpoint"),
    (["viq.teacher_resolution=100"], "viq.teacher_resolution=100"),
    (["viq.stagee=fsq"], "viq.stagee: unknown key"),
    (["viq.text_every=2", "viq.images_per_step=3"], "viq.images_per_step=3"),
    (["viq.text_every=2", "viq.teacher=none"], "viq.text_every=2"),
])
def test_stage_recipe_errors_name_the_field(override, message):
    from viq_mllm.recipe import RecipeError, load_recipe

    with pytest.raises(RecipeError, match=message.replace(".", r"\.")):
        load_recipe(ROOT / "recipes" / "viq_tiny_stage1.yaml", override, world_size=2)


@pytest.mark.e2e
def test_a_language_model_of_another_shape_is_refused_naming_the_field(stage_assets, tmp_path):
    proc = viq_mllm("train", *stage_args(stage_assets, "stage1", tmp_path / "run", None, "train.steps=1",
                                         "model.ffn_hidden_size=128"), check=False)
    assert proc.returncode != 0 and "model.ffn_hidden_size=128" in proc.stderr and "172" in proc.stderr


@pytest.mark.e2e
def test_image_only_steps_asking_for_more_images_than_there_are_are_refused(chain, stage_assets, tmp_path):
    proc = viq_mllm("train", *stage_args(stage_assets, "proximal", tmp_path / "run", chain["stage1"]["dir"],
                                         "train.steps=2", "viq.text_every=2", "viq.images_per_step=64"), check=False)
    assert proc.returncode != 0 and "viq.images_per_step=64" in proc.stderr and "24 usable images" in proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.e2e
def test_stage1_without_a_teacher_trains_on_the_caption_loss_alone(stage_assets, tmp_path):
    from viq_mllm.metrics import read_metrics

    viq_mllm("train", *stage_args(stage_assets, "stage1", tmp_path / "run", None, "train.steps=1", "viq.teacher=none"))
    (row,) = read_metrics(tmp_path / "run")
    assert "loss_distill" not in row and row["loss_aux"] == 0.0
    assert row["loss_text"] == pytest.approx(row["loss"], rel=1e-9) and math.isfinite(row["loss"])
