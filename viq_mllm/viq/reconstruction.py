"""Train a ViQ tokenizer end to end on pixel reconstruction, and measure it.

encoder -> head (FSQ, straight-through) -> code embedder -> pixel decoder, loss = pixel MSE. This is the
cheapest way to get a tokenizer whose codes carry the image (the demo's "train a tiny one"); the paper's
text-aligned stages are separate recipes. Metrics: PSNR on ``[-1, 1]`` pixels (peak-to-peak 2) and the PSNR
of a mean-colour-per-16x16-patch image, the baseline any code must beat (24 bits per patch).
"""

from __future__ import annotations

import math
import random
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from viq_mllm.viq.preprocess import Preprocessed
from viq_mllm.viq.tokenizer import ViQTokenizer


def reconstruct(model: ViQTokenizer, items: list[Preprocessed]) -> list[torch.Tensor]:
    pixels, grids = [it.pixels for it in items], [it.grid for it in items]
    _, cu, out = model.forward_packed(pixels, grids)
    return model.decoder(out.features, cu, grids)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(F.mse_loss(a.float(), b.float()))
    return 10 * math.log10(4.0 / max(mse, 1e-12))


def patch_mean_image(pixels: torch.Tensor, patch: int = 16) -> torch.Tensor:
    pooled = F.avg_pool2d(pixels[None], patch)
    return F.interpolate(pooled, scale_factor=patch, mode="nearest")[0]


def train_reconstruction(model: ViQTokenizer, items: list[Preprocessed], steps: int, batch: int = 8,
                         lr: float = 2e-3, seed: int = 0,
                         on_step: Optional[Callable[[int, float], None]] = None) -> list[float]:
    """AdamW with a cosine schedule over ``steps``; returns the per-step losses. The model is left in eval mode."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    losses = []
    for step in range(steps):
        chosen = rng.sample(items, min(batch, len(items)))
        recon = reconstruct(model, chosen)
        loss = sum(F.mse_loss(r, it.pixels) for r, it in zip(recon, chosen)) / len(chosen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step, losses[-1])
    model.eval()
    return losses


@torch.no_grad()
def evaluate_reconstruction(model: ViQTokenizer, items: list[Preprocessed]) -> dict:
    """Mean PSNR of the decoded codes vs the mean-colour-per-patch baseline, and codebook usage."""
    ours, baseline = [], []
    for item, recon in zip(items, reconstruct(model, items)):
        ours.append(psnr(recon.clamp(-1, 1), item.pixels))
        baseline.append(psnr(patch_mean_image(item.pixels), item.pixels))
    codes = torch.cat([c.reshape(-1) for c in model.encode_preprocessed(items)])
    size = model.head.embedder.fsq.codebook_size
    counts = torch.bincount(codes, minlength=size).double()
    probs = counts[counts > 0] / counts.sum()
    return {"psnr": sum(ours) / len(ours), "psnr_patch_mean_baseline": sum(baseline) / len(baseline),
            "codebook_usage": float((counts > 0).double().mean()), "code_perplexity": float(torch.exp(-(probs * probs.log()).sum())),
            "images": len(items)}
