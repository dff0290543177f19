"""Captioned images for the ViQ tokenizer stages: image sources -> preprocessed pixels + caption documents.

The tokenizer being trained has no codes yet, so documents hold a projected image block (filled by the
projector from the encoder's features inside each step) followed by the caption. Images are decoded and
preprocessed once (native resolution, the tokenizer's own preprocessing) and kept in memory; an image that
cannot be read, or has no caption, is reported and skipped.

    >>> data = load_captioned(["stamps/"], text_tokenizer, base=128, max_pixels=1 << 20)
    >>> len(data.documents), data.skipped[:1]
    (780, [('stamps/broken.png', 'cannot identify image file ...')])
    >>> pixels, grids = data.images(["stamps/cat.png"])
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from viq_mllm.data.layout import Document, projected_caption_document
from viq_mllm.data.sources import TarMember, list_sources
from viq_mllm.viq.preprocess import ImageInputError, Preprocessed, preprocess


@dataclass
class CaptionedImages:
    documents: list[Document]
    pixels: dict[str, torch.Tensor] = field(default_factory=dict)
    grids: dict[str, tuple[int, int]] = field(default_factory=dict)
    captions: dict[str, str] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def images(self, keys: list[str]) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
        return [self.pixels[k] for k in keys], [self.grids[k] for k in keys]

    def attach(self, batch: dict) -> dict:
        """A collated batch's ``images`` (keys) replaced by their ``pixels`` and patch ``grids``."""
        batch["pixels"], batch["grids"] = self.images(batch.pop("images"))
        return batch

    def preprocessed(self) -> list[Preprocessed]:
        """Every image as the tokenizer's :class:`Preprocessed` item (what reconstruction takes)."""
        return [Preprocessed(self.pixels[k], self.grids[k], tuple(self.pixels[k].shape[1:])) for k in self.pixels]

    @classmethod
    def merge(cls, parts: list["CaptionedImages"]) -> "CaptionedImages":
        merged = cls([d for part in parts for d in part.documents])
        for part in parts:
            merged.pixels.update(part.pixels)
            merged.grids.update(part.grids)
            merged.captions.update(part.captions)
            merged.skipped.extend(part.skipped)
        return merged


def load_captioned(sources: list[str | Path], text_tokenizer, base: int, max_pixels: int,
                   need_captions: bool = True) -> CaptionedImages:
    data = CaptionedImages([])
    for source in sources:
        for record in list_sources(source):
            caption = record.text.get("caption")
            if len(record.images) != 1 or (need_captions and not caption):
                data.skipped.append((record.source, record.problem or
                                     ("no caption" if len(record.images) == 1 else "not one image")))
                continue
            image = record.images[0]
            key = image.locator() if isinstance(image, TarMember) else str(Path(image).resolve())
            try:
                item = preprocess(image.read() if isinstance(image, TarMember) else image, base, max_pixels)
            except (ImageInputError, OSError) as err:
                data.skipped.append((record.source, str(err)))
                continue
            data.pixels[key], data.grids[key] = item.pixels, item.grid
            if need_captions:
                data.captions[key] = caption
                data.documents.append(projected_caption_document(text_tokenizer, item.grid, caption, key))
    if not data.pixels:
        raise ValueError(f"no usable images in {[str(s) for s in sources]} ({len(data.skipped)} skipped: "
                         f"{data.skipped[:3]})")
    return data


def images_for_step(items: list[Preprocessed], seed: int, step: int, count: int) -> list[Preprocessed]:
    """``count`` distinct images (all of them if fewer) as a pure function of ``(seed, step)``: a resumed run
    draws what an uninterrupted one would."""
    return random.Random(seed * 1_000_003 + step).sample(items, min(count, len(items)))
