"""One ViQ training stage's vision side: pixels -> the features the LLM's projector sees, plus the stage's
auxiliary losses.

The language-model loss is computed by the VLM training loop (the continuous baseline's model, with this module
as its encoder); this module adds, per forward (reference section 6.1):

- ``loss_distill = mean_i (1 - cos(s_i, t_i))``: ``s_i`` the final LayerNorm + MAP head on image ``i``'s
  features (``x_low`` after the head in stage 2, the ViT output in stage 1), projected to the teacher's width
  when it differs; ``t_i`` a frozen teacher's vector of the same image at a fixed resolution.
- ``loss_rec = mean_i MSE(decoder(features_i), pixels_i)`` (stages 2-1 and 2-2): the light pixel decoder on
  ``x_low``; the gradient reaches the encoder through the FSQ straight-through estimator.
- with FSQ: ``codebook_usage`` (fraction of the K codes seen over the last ``window`` forwards) and
  ``code_perplexity`` (``exp`` of the entropy of those counts), no gradient.

Example (tiny, two images of 8x8 and 8x12 patches)::

    >>> stage = StageModel(tokenizer, "fsq", teacher)
    >>> features, cu = stage(pixels, [(8, 8), (8, 12)])      # features [160, C], cu [0, 64, 160]
    >>> sorted(stage.terms)
    ['loss_distill', 'loss_rec']
"""

from __future__ import annotations

from collections import deque
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from viq_mllm.viq.tokenizer import ViQTokenizer


class CodebookUsage:
    """Code counts over a sliding window of forwards."""

    def __init__(self, size: int, window: int = 20):
        self.size = size
        self.counts: deque[torch.Tensor] = deque(maxlen=window)

    def update(self, indices: torch.Tensor) -> dict[str, float]:
        self.counts.append(torch.bincount(indices.reshape(-1).cpu(), minlength=self.size).double())
        total = torch.stack(list(self.counts)).sum(0)
        probs = total[total > 0] / total.sum()
        return {"codebook_usage": float((total > 0).double().mean()),
                "code_perplexity": float(torch.exp(-(probs * probs.log()).sum()))}


def distill_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``mean_i (1 - cos(student_i, teacher_i))``; both ``[n, D]``."""
    return (1 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()


def reconstruction_loss(images: list[torch.Tensor], pixels: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([F.mse_loss(a.float(), b.float()) for a, b in zip(images, pixels)]).mean()


class StageModel(nn.Module):
    """``forward(pixels, grids) -> (features [T, C], cu_seqlens)``; the loss terms of that forward are left in
    ``self.terms`` (tensors with gradient) and the code statistics in ``self.stats`` (floats)."""

    def __init__(self, tokenizer: ViQTokenizer, stage: str, teacher: Optional[nn.Module], usage_window: int = 20):
        super().__init__()
        if stage not in ("stage1", "proximal", "fsq"):
            raise ValueError(f"stage={stage!r} is not trained with a language model")
        self.tokenizer, self.stage, self.teacher = tokenizer, stage, teacher
        width = tokenizer.config.width
        self.distill_proj = None
        if teacher is not None and teacher.dim != width:
            self.distill_proj = nn.Linear(width, teacher.dim)
        self.usage = CodebookUsage(tokenizer.head.embedder.fsq.codebook_size, usage_window) if stage == "fsq" else None
        self.terms: dict[str, torch.Tensor] = {}
        self.stats: dict[str, float] = {}

    def forward(self, pixels: list[torch.Tensor], grids: list[tuple[int, int]]):
        tok = self.tokenizer
        self.terms = {}
        if self.stage == "stage1":
            features, cu = tok.vit(pixels, grids)
        else:
            _, cu, out = tok.forward_packed(pixels, grids)
            features = out.features
            self.terms["loss_rec"] = reconstruction_loss(tok.decoder(features, cu, grids), pixels)
            if self.usage is not None:
                self.stats = self.usage.update(out.indices)
        if self.teacher is not None:
            student = tok.vit.pooled(features, cu)
            if self.distill_proj is not None:
                student = self.distill_proj(student)
            self.terms["loss_distill"] = distill_loss(student, self.teacher(pixels))
        return features, cu
