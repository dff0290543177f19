"""``ViQTokenizer``: images of any size -> discrete code grids ``(h, w, 4)`` -> features or pixels.

    >>> tok = ViQTokenizer.from_config("tiny", preset="16k")
    >>> codes = tok.encode(["cat.jpg", np.zeros((37, 211, 3), np.uint8)])   # any sizes, one packed pass
    >>> codes[1].shape                 # 37 x 211 px at base 128 -> 64 x 256 px -> 4 x 16 patches
    torch.Size([4, 16, 4])
    >>> feats = tok.embed(codes)       # list of (h, w, C): the features the encoder produced
    >>> images = tok.decode(codes)     # list of PIL images, 16 px per patch
    >>> tok.save_pretrained("viq_tiny"); ViQTokenizer.from_pretrained("viq_tiny")

Saved as ``config.json`` (architecture, preset, fingerprint) + ``model.safetensors``. The fingerprint hashes
the architecture, the preset and the weights: code shards and vocabularies record it, and readers refuse a
mismatch. Nothing here imports megatron.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from viq_mllm import artifact
from viq_mllm.viq.config import ViQConfig, config_for
from viq_mllm.viq.decoder import PixelDecoder
from viq_mllm.viq.head import QuantHead
from viq_mllm.viq.preprocess import ImageLike, Preprocessed, preprocess
from viq_mllm.viq.vit import VisionTransformer, cu_seqlens_of

CONFIG_FILE = "config.json"
KIND = "viq-tokenizer"
WEIGHTS_FILE = "model.safetensors"


class ViQTokenizer(nn.Module):
    def __init__(self, config: ViQConfig):
        super().__init__()
        self.config = config
        self.vit = VisionTransformer(config)
        self.head = QuantHead(config)
        self.decoder = PixelDecoder(config)

    # construction and persistence -------------------------------------------------------------------------
    @classmethod
    def from_config(cls, name: str, preset: str = "16k", seed: int = 0, **overrides) -> "ViQTokenizer":
        torch.manual_seed(seed)
        return cls(config_for(name, preset=preset, **overrides)).eval()

    def save_pretrained(self, directory: str | Path, extra: Optional[dict[str, dict[str, torch.Tensor]]] = None) -> Path:
        """Write ``config.json`` (architecture and fingerprint) and ``model.safetensors``, plus one safetensors file
        per ``extra`` entry (e.g. a stage's LLM-side adapters), published as one artifact (staged, then renamed
        into place: a killed save never leaves half a tokenizer)."""
        directory = Path(directory)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        meta = {"architecture": json.loads(self.config.to_json()), "fingerprint": fingerprint(self.config, state)}
        stage = artifact.Staging.begin(directory, artifact.Spec(KIND, 1, {"fingerprint": meta["fingerprint"]}))
        save_file(state, str(stage.path / WEIGHTS_FILE))
        for name, tensors in (extra or {}).items():
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(stage.path / name))
        stage.write_json(CONFIG_FILE, meta)
        stage.seal()
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "ViQTokenizer":
        directory = Path(directory)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory}: missing {name}; is this a ViQ tokenizer saved by save_pretrained?")
        meta = json.loads((directory / CONFIG_FILE).read_text())
        config = ViQConfig.from_dict(meta["architecture"])
        state = load_file(str(directory / WEIGHTS_FILE))
        actual = fingerprint(config, state)
        if meta.get("fingerprint") not in (None, actual):
            raise ValueError(
                f"{directory}: weights do not match config.json (fingerprint {meta['fingerprint']} recorded, "
                f"{actual} computed); the files are corrupt or were mixed from different tokenizers"
            )
        model = cls(config)
        model.load_state_dict(state, strict=True)
        return model.eval()

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.config, self.state_dict())

    # the forward pass --------------------------------------------------------------------------------------
    def forward_packed(self, pixels: Sequence[torch.Tensor], grids: Sequence[tuple[int, int]]):
        """ViT + head on one pack. Returns (trunk tokens, cu_seqlens, HeadOutput); used by training too."""
        tokens, cu = self.vit(list(pixels), list(grids))
        return tokens, cu, self.head(tokens, cu, list(grids))

    def preprocess(self, images: Iterable[ImageLike]) -> list[Preprocessed]:
        return [preprocess(img, self.config.image_base, self.config.max_pixels) for img in images]

    @torch.no_grad()
    def encode(self, images: Sequence[ImageLike], max_tokens: int = 2048) -> list[torch.Tensor]:
        """Images of any sizes -> list of int64 code grids ``(h, w, 4)``; packs up to ``max_tokens`` patches."""
        if self.config.quantizer != "fsq":
            raise RuntimeError("encode needs the FSQ quantizer; this tokenizer has the proximal bottleneck")
        return self.encode_preprocessed(self.preprocess(images), max_tokens)

    @torch.no_grad()
    def encode_preprocessed(self, items: Sequence[Preprocessed], max_tokens: int = 2048) -> list[torch.Tensor]:
        codes: list[torch.Tensor] = []
        for pack in _packs([it.grid for it in items], max_tokens):
            dtype = self.vit.pos_embed.dtype
            pixels = [items[i].pixels.to(self.vit.pos_embed.device, dtype) for i in pack]
            grids = [items[i].grid for i in pack]
            tokens, cu = self.vit(pixels, grids)
            _, indices = self.head.quantize(tokens, cu, grids)
            codes.extend(_split_codes(indices, grids))
        return codes

    @torch.no_grad()
    def embed(self, codes: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Code grids ``(h, w, 4)`` -> per-patch features ``(h, w, C)`` (equal to the encoder's)."""
        flat = torch.cat([c.reshape(-1) for c in codes]).to(self.vit.pos_embed.device)
        feats = self.head.embedder(flat)
        return [f.view(c.shape[0], c.shape[1], -1) for f, c in zip(feats.split([c[..., 0].numel() for c in codes]), codes)]

    @torch.no_grad()
    def decode(self, codes: Sequence[torch.Tensor]) -> list[Image.Image]:
        """Code grids -> RGB images at 16 px per patch."""
        grids = [(int(c.shape[0]), int(c.shape[1])) for c in codes]
        feats = torch.cat([f.reshape(-1, f.shape[-1]) for f in self.embed(codes)])
        cu = cu_seqlens_of([r * c for r, c in grids], device=feats.device)
        return [to_pil(img) for img in self.decoder(feats, cu, grids)]


def to_pil(pixels: torch.Tensor) -> Image.Image:
    array = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(array))


def _packs(grids: Sequence[tuple[int, int]], max_tokens: int) -> list[list[int]]:
    """Consecutive images grouped so each pack has at most ``max_tokens`` patches (a bigger image goes alone)."""
    packs, current, used = [], [], 0
    for i, (r, c) in enumerate(grids):
        if current and used + r * c > max_tokens:
            packs.append(current)
            current, used = [], 0
        current.append(i)
        used += r * c
    if current:
        packs.append(current)
    return packs


def _split_codes(indices: torch.Tensor, grids: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
    sizes = [4 * r * c for r, c in grids]
    return [idx.view(r, c, 4).cpu() for idx, (r, c) in zip(indices.split(sizes), grids)]


def fingerprint(config: ViQConfig, state: dict[str, torch.Tensor]) -> str:
    """sha256 over the architecture JSON (preset included) and every tensor's name, dtype, shape and bytes."""
    digest = hashlib.sha256(config.to_json().encode())
    for name in sorted(state):
        tensor = state[name].detach().contiguous().cpu()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return "viq-" + digest.hexdigest()[:16]
