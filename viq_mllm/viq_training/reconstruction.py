"""Train a ViQ tokenizer end to end on pixel reconstruction, and measure it.

encoder -> head (FSQ, straight-through) -> code embedder -> pixel decoder, loss = pixel MSE (+ an optional
perceptual distance). This is the cheapest way to get a tokenizer whose codes carry the image (the demo's
"train a tiny one"); the paper's text-aligned stages are the ``kind: viq`` recipes, whose decoder stage uses
the same loss on a frozen tokenizer. Metrics: PSNR on ``[-1, 1]`` pixels (peak-to-peak 2) and SSIM
(scikit-image), each beside a mean-colour-per-16x16-patch image, the baseline any code must beat (24 bits
per patch).
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from viq_mllm.recipe import TrainSection
from viq_mllm.viq.preprocess import Preprocessed
from viq_mllm.viq.tokenizer import ViQTokenizer, to_pil
from viq_mllm.viq_training.loop import adamw, train_steps


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


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """SSIM (scikit-image, 7x7 windows, per channel) of two ``[3, H, W]`` images in ``[-1, 1]``."""
    from skimage.metrics import structural_similarity

    def hwc(x):
        return ((x.detach().float().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).cpu().numpy().astype(np.float64)

    return float(structural_similarity(hwc(a), hwc(b), channel_axis=2, data_range=1.0))


def reconstruction_terms(model: ViQTokenizer, items: list[Preprocessed], perceptual: Optional[nn.Module] = None
                         ) -> dict[str, torch.Tensor]:
    """``loss_rec`` (pixel MSE, mean over images) and, with ``perceptual``, ``loss_perceptual``."""
    recon = reconstruct(model, items)
    terms = {"loss_rec": torch.stack([F.mse_loss(r, it.pixels) for r, it in zip(recon, items)]).mean()}
    if perceptual is not None:
        terms["loss_perceptual"] = torch.stack([perceptual(r[None], it.pixels[None]) for r, it in zip(recon, items)]).mean()
    return terms


def train_reconstruction(model: ViQTokenizer, items: list[Preprocessed], steps: int, batch: int = 8,
                         lr: float = 2e-3, seed: int = 0,
                         on_step: Optional[Callable[[int, float], None]] = None) -> list[float]:
    """Every parameter on pixel MSE, ``batch`` images a step drawn with ``seed``: AdamW, 5% warmup then cosine to
    0 (:mod:`viq_mllm.viq_training.loop`); returns the per-step losses. The model is left in eval mode."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    t = TrainSection(steps=steps, lr=lr, min_lr=0.0, warmup_steps=max(1, steps // 20), weight_decay=0.01,
                     adam_beta2=0.999, clip_grad=1.0, seed=seed)

    def loss_terms(step: int) -> dict[str, torch.Tensor]:
        return {"loss": reconstruction_terms(model, rng.sample(items, min(batch, len(items))))["loss_rec"]}

    def after_step(row: dict) -> None:
        if on_step is not None:
            on_step(row["step"] - 1, row["loss"])

    model.train()
    rows = train_steps(adamw(model.parameters(), t), t, 0, loss_terms, after_step)
    model.eval()
    return [row["loss"] for row in rows]


@torch.no_grad()
def evaluate_reconstruction(model: ViQTokenizer, items: list[Preprocessed]) -> dict:
    """Mean PSNR and SSIM of the reconstructions vs the mean-colour-per-patch baseline, and (FSQ) codebook
    usage; ``per_image`` lists each image's numbers."""
    was_training = model.training
    model.eval()
    rows = []
    for item, recon in zip(items, reconstruct(model, items)):
        mean_image = patch_mean_image(item.pixels)
        rows.append({"psnr": psnr(recon.clamp(-1, 1), item.pixels), "ssim": ssim(recon, item.pixels),
                     "psnr_patch_mean_baseline": psnr(mean_image, item.pixels),
                     "ssim_patch_mean_baseline": ssim(mean_image, item.pixels)})
    result = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
    result.update(images=len(items), per_image=rows)
    if model.config.quantizer == "fsq":
        codes = torch.cat([c.reshape(-1) for c in model.encode_preprocessed(items)])
        counts = torch.bincount(codes, minlength=model.head.embedder.fsq.codebook_size).double()
        probs = counts[counts > 0] / counts.sum()
        result.update(codebook_usage=float((counts > 0).double().mean()),
                      code_perplexity=float(torch.exp(-(probs * probs.log()).sum())))
    model.train(was_training)
    return result


def plot_reconstructions(model: ViQTokenizer, items: list[Preprocessed], path: str | Path,
                         title: str = "decoded from ViQ codes") -> None:
    """A PNG grid: originals (top row) over reconstructions (bottom row)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    with torch.no_grad():
        recon = reconstruct(model.eval(), items)
    fig, axes = plt.subplots(2, len(items), figsize=(2 * len(items), 4.2), squeeze=False)
    for i, (item, image) in enumerate(zip(items, recon)):
        axes[0, i].imshow(to_pil(item.pixels))
        axes[1, i].imshow(to_pil(image))
        axes[0, i].axis("off")
        axes[1, i].axis("off")
    axes[0, 0].set_title("held-out originals", loc="left", fontsize=9)
    axes[1, 0].set_title(title, loc="left", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
