"""The decoder stage: codes -> pixels on a frozen FSQ tokenizer, no language model (plain PyTorch, one process).

Loss ``loss_rec + perceptual_weight * loss_perceptual`` (pixel MSE and an EfficientNet-Lite0 feature distance,
``teachers.PerceptualDistance``); only ``tokenizer.decoder`` trains. The release has no adversarial term in
any stage and neither do we. Each step draws ``train.global_batch_size`` images as a pure function of
``(seed, step)``; AdamW with linear warmup and cosine decay to ``train.min_lr``. Resumable: checkpoints
(decoder weights, optimizer state, step) under ``RUN_DIR/checkpoints/step_XXXXXXXX``, loaded with
``weights_only=True``.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from viq_mllm.metrics import MetricsLog
from viq_mllm.recipe import Recipe, TrainSection, dump_recipe
from viq_mllm.viq.preprocess import Preprocessed
from viq_mllm.viq.tokenizer import ViQTokenizer
from viq_mllm.viq.train.reconstruction import reconstruction_terms
from viq_mllm.viq.train.stage_io import evaluate_stage, held_out_images, save_stage, starting_tokenizer
from viq_mllm.viq.train.stages import trainable
from viq_mllm.viq.train.teachers import PerceptualDistance


def lr_at(t: TrainSection, step: int) -> float:
    """Linear warmup over ``warmup_steps``, then cosine from ``lr`` to ``min_lr`` (megatron's schedule)."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    decay = t.decay_steps or t.steps
    progress = min(1.0, (step - t.warmup_steps) / max(1, decay - t.warmup_steps))
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * progress))


def _save(root: Path, step: int, tokenizer: ViQTokenizer, optimizer, keep_last: int) -> None:
    path = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tokenizer.decoder.state_dict().items()}, str(tmp / "decoder.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "rng": torch.get_rng_state()}, tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step}))
    tmp.rename(path)
    for old in sorted(root.glob("step_*"))[:-keep_last]:
        shutil.rmtree(old)


def _resume(root: Path, tokenizer: ViQTokenizer, optimizer) -> int:
    done = sorted(root.glob("step_*")) if root.is_dir() else []
    if not done:
        return 0
    latest = done[-1]
    tokenizer.decoder.load_state_dict(load_file(str(latest / "decoder.safetensors")))
    state = torch.load(latest / "optimizer.pt", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    return json.loads((latest / "state.json").read_text())["step"]


def train_decoder_stage(recipe: Recipe) -> list[dict]:
    from viq_mllm.data.captioned import images_for_step, load_captioned

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
    params = [p for p in tokenizer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
                                  weight_decay=t.weight_decay)
    ckpt_root = run_dir / "checkpoints"
    start = _resume(ckpt_root, tokenizer, optimizer)
    log = MetricsLog(run_dir, start, recipe.log.tensorboard, recipe.log.wandb, recipe.log.wandb_project,
                     recipe.run.name)
    rows = []
    tokenizer.train()
    for step in range(start, t.steps):
        began = time.perf_counter()
        lr = lr_at(t, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        chosen = images_for_step(items, t.seed, step, t.global_batch_size)
        batch = [Preprocessed(it.pixels.to(device), it.grid, it.source_size) for it in chosen]
        terms = reconstruction_terms(tokenizer, batch, perceptual)
        loss = terms["loss_rec"] + v.perceptual_weight * terms.get("loss_perceptual", 0.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, t.clip_grad or float("inf")))
        optimizer.step()
        elapsed = time.perf_counter() - began
        patches = sum(it.grid[0] * it.grid[1] for it in batch)
        row = {"step": step + 1, "loss": float(loss.detach()), "lr": lr, "grad_norm": grad_norm, "tokens": patches,
               "step_time_s": elapsed, "tokens_per_s": patches / elapsed,
               **{k: float(val.detach()) for k, val in terms.items()}}
        rows.append(row)
        log.log(row)
        if recipe.log.progress and (step + 1) % 50 == 0:
            print(f"decoder step {step + 1}/{t.steps}: loss {row['loss']:.4f}", flush=True)
        every = recipe.checkpoint.every
        if every and ((step + 1) % every == 0 or step + 1 == t.steps):
            _save(ckpt_root, step + 1, tokenizer, optimizer, recipe.checkpoint.keep_last)
    log.close()
    tokenizer.cpu().eval()
    save_stage(run_dir, tokenizer, {}, handoff)
    evaluate_stage(run_dir, tokenizer, held_out_images(recipe, tokenizer), {"stage": "decoder", "skipped": data.skipped})
    return rows
