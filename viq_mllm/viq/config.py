"""ViQ tokenizer architectures: ``tiny`` (tests and CPU demos), ``so400m`` and ``giant`` (SigLIP2 shapes).

All sizes of the quantization head follow the ViT width ``C`` as in the release: expand MLP C -> 4C -> 4C,
head-wise RoPE blocks on ``min(C, 256)``-wide heads, merge MLP 4C -> 4C -> C, residual MLPs of hidden 2C.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Literal

from viq_mllm.viq.fsq import PRESETS


@dataclass(frozen=True)
class ViQConfig:
    # ViT trunk (SigLIP2)
    width: int
    depth: int
    heads: int
    mlp_hidden: int
    patch: int = 16
    pos_grid: int = 128  # learned position table side, resized bilinearly to each image's grid
    vit_gelu: Literal["tanh", "exact"] = "tanh"  # SigLIP2 uses tanh-GELU; the release used exact (bug 6)
    # quantization head
    pre_blocks: int = 3
    rope_blocks: int = 3
    subtokens: int = 4
    rope_dim: int = 256
    post_resmlps: int = 3
    quantizer: Literal["fsq", "proximal"] = "fsq"
    preset: str = "16k"
    proximal_width: int = 32
    # pixel decoder
    decoder_width: int = 256
    decoder_depth: int = 2
    decoder_heads: int = 4
    # preprocessing
    image_base: int = 384
    max_pixels: int = 1024 * 1024

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"preset={self.preset!r}: choose one of {', '.join(PRESETS)}")
        if self.width % self.heads:
            raise ValueError(f"width={self.width} is not divisible by heads={self.heads}")
        if self.subtokens != 4:
            raise ValueError("the head-wise quantizer uses 4 sub-codes per patch (docs/concepts.md, codes)")
        if self.patch != 16:
            raise ValueError("ViQ uses 16-px patches")

    @property
    def head_rope_dim(self) -> int:
        return min(self.width, self.rope_dim)

    @property
    def fsq_levels(self) -> tuple[int, ...]:
        return PRESETS[self.preset]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "ViQConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown ViQ config keys: {sorted(unknown)}")
        return cls(**data)


ARCHITECTURES: dict[str, dict] = {
    "tiny": dict(width=64, depth=2, heads=4, mlp_hidden=256, pos_grid=16, pre_blocks=1, rope_blocks=1,
                 rope_dim=32, post_resmlps=1, decoder_width=64, decoder_depth=1, decoder_heads=4, image_base=128),
    "so400m": dict(width=1152, depth=27, heads=16, mlp_hidden=4304),
    "giant": dict(width=1536, depth=40, heads=16, mlp_hidden=6144),
}


def config_for(name: str, preset: str = "16k", **overrides) -> ViQConfig:
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown ViQ architecture {name!r}; choose one of {', '.join(ARCHITECTURES)}")
    return ViQConfig(**{**ARCHITECTURES[name], "preset": preset, **overrides})
