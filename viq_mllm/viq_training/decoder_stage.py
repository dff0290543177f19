"""The decoder stage: codes -> pixels on a frozen FSQ tokenizer, no language model (plain PyTorch, one process).

Loss ``loss_rec + perceptual_weight * loss_perceptual`` (pixel MSE and an EfficientNet-Lite0 feature distance,
``teachers.PerceptualDistance``); only ``tokenizer.decoder`` trains. The release has no adversarial term in
any stage and neither do we. Each step draws ``train.global_batch_size`` images as a pure function of
``(seed, step)``; AdamW with megatron's warmup + cosine schedule (:mod:`viq_mllm.viq_training.loop`). Resumable: checkpoints
(decoder weights, optimizer state, step) under ``RUN_DIR/checkpoints/step_XXXXXXXX``, each an artifact whose
checksums are verified before it is loaded with ``weights_only=True``.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from viq_mllm import artifact
from viq_mllm.data.captioned import images_for_step, load_captioned
from viq_mllm.metrics import MetricsLog
from viq_mllm.recipe import Recipe, dump_recipe
from viq_mllm.viq.preprocess import Preprocessed
from viq_mllm.viq.tokenizer import ViQTokenizer
from viq_mllm.viq_training.loop import adamw, train_steps
from viq_mllm.viq_training.reconstruction import reconstruction_terms
from viq_mllm.viq_training.stage_io import evaluate_stage, held_out_images, save_stage, starting_tokenizer
from viq_mllm.viq_training.stages import trainable
from viq_mllm.viq_training.teachers import PerceptualDistance

log = logging.getLogger(__name__)

CHECKPOINT_KIND = "viq-decoder-checkpoint"


def _save(root: Path, step: int, tokenizer: ViQTokenizer, optimizer, keep_last: int) -> None:
    """``step_XXXXXXXX``: decoder weights, optimizer and RNG state, step; published as an artifact."""
    stage = artifact.Staging.begin(root / f"step_{step:08d}",
                                   artifact.Spec(CHECKPOINT_KIND, 1, {"viq_fingerprint": tokenizer.fingerprint}))
    save_file({k: v.contiguous() for k, v in tokenizer.decoder.state_dict().items()},
              str(stage.path / "decoder.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "rng": torch.get_rng_state()}, stage.path / "optimizer.pt")
    stage.seal({"step": step})
    for old in artifact.steps(root)[:-keep_last]:
        shutil.rmtree(old)


def _resume(root: Path, tokenizer: ViQTokenizer, optimizer) -> int:
    """Load the newest checkpoint after checking every file against its manifest; returns its step (0: none)."""
    done = artifact.steps(root)
    if not done:
        return 0
    manifest = artifact.verify(done[-1], full=True, kind=CHECKPOINT_KIND)
    tokenizer.decoder.load_state_dict(load_file(str(done[-1] / "decoder.safetensors")))
    state = torch.load(done[-1] / "optimizer.pt", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    return manifest["summary"]["step"]


def train_decoder_stage(recipe: Recipe) -> list[dict]:
    t, v, run_dir = recipe.train, recipe.viq, Path(recipe.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_recipe(recipe, run_dir / "recipe.yaml")
    tokenizer, handoff = starting_tokenizer(recipe)
    if tokenizer.config.quantizer != "fsq":
        raise ValueError(f"init.from={recipe.init.from_}: the decoder stage needs an FSQ tokenizer (run the fsq stage)")
    trainable(tokenizer, "decoder")
    cfg = tokenizer.config
    data = load_captioned([s.path for s in recipe.data.sources], None, cfg.image_base, cfg.max_pixels,
                          need_captions=False)
    items = data.preprocessed()
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    tokenizer.to(device)
    perceptual = PerceptualDistance().to(device) if v.perceptual_weight > 0 else None
    optimizer = adamw((p for p in tokenizer.parameters() if p.requires_grad), t)
    ckpt_root = run_dir / "checkpoints"
    start = _resume(ckpt_root, tokenizer, optimizer)
    log = MetricsLog(run_dir, start, recipe.log.tensorboard, recipe.log.wandb, recipe.log.wandb_project,
                     recipe.run.name)

    def loss_terms(step: int) -> dict[str, torch.Tensor]:
        chosen = images_for_step(items, t.seed, step, t.global_batch_size)
        batch = [Preprocessed(it.pixels.to(device), it.grid, it.source_size) for it in chosen]
        terms = reconstruction_terms(tokenizer, batch, perceptual)
        loss = terms["loss_rec"] + v.perceptual_weight * terms.get("loss_perceptual", 0.0)
        patches = torch.tensor(float(sum(it.grid[0] * it.grid[1] for it in batch)))
        return {"loss": loss, "tokens": patches, **terms}

    def after_step(row: dict) -> None:
        row["tokens_per_s"] = row["tokens"] / row["step_time_s"]
        log.log(row)
        if recipe.log.progress and row["step"] % 50 == 0:
            log.info("decoder step %d/%d: loss %.4f", row["step"], t.steps, row["loss"])
        every = recipe.checkpoint.every
        if every and (row["step"] % every == 0 or row["step"] == t.steps):
            _save(ckpt_root, row["step"], tokenizer, optimizer, recipe.checkpoint.keep_last)

    tokenizer.train()
    rows = train_steps(optimizer, t, start, loss_terms, after_step)
    log.close()
    tokenizer.cpu().eval()
    save_stage(run_dir, tokenizer, {}, handoff)
    evaluate_stage(run_dir, tokenizer, held_out_images(recipe, tokenizer), {"stage": "decoder", "skipped": data.skipped})
    return rows
