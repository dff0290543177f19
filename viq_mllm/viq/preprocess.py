"""Native-resolution preprocessing: any image in, an even patch grid out.

1. Load (path, bytes, PIL image or H x W x 3 uint8 array) with a clear :class:`ImageInputError` naming the input
   for missing, empty, truncated, non-image or oversized files (PIL's decompression-bomb limit is checked
   before decoding).
2. Convert any mode to RGB: EXIF orientation applied; alpha (RGBA, LA, P with transparency) composited onto
   a background; L, CMYK, P, 16-bit (I;16) and 32-bit (I, F) rescaled to 8 bits.
3. Resize to about ``base**2`` pixels keeping the aspect, each side a multiple of 32 px (so the 16-px patch
   grid is even and the 2x2 pooling never crashes, unlike the release's ``"384x16"`` rule), at least 32 px,
   and at most ``max_pixels`` (the long side shrinks).
4. Normalise with mean = std = 0.5 to ``[-1, 1]``, channels first.

Example: a 640 x 480 photo with ``base=384`` -> 416 x 320 px -> a 20 x 26 patch grid (rows x cols).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

ImageLike = Union[str, Path, bytes, Image.Image, np.ndarray]
GRANULARITY = 32
PATCH = 16


class ImageInputError(ValueError):
    """An input that cannot be turned into an image; the message names the input."""


@dataclass(frozen=True)
class Preprocessed:
    pixels: torch.Tensor  # [3, H, W] in [-1, 1]
    grid: tuple[int, int]  # (rows, cols) of 16-px patches, both even
    source_size: tuple[int, int]  # (height, width) of the original image


def describe(image: ImageLike) -> str:
    if isinstance(image, (str, Path)):
        return str(image)
    if isinstance(image, bytes):
        return f"<{len(image)} bytes>"
    if isinstance(image, np.ndarray):
        return f"<array {tuple(image.shape)} {image.dtype}>"
    return f"<PIL {image.mode} {image.size[0]}x{image.size[1]}>"


def load_image(image: ImageLike, max_source_pixels: int = 178_956_970) -> Image.Image:
    """Open and fully decode an input, raising :class:`ImageInputError` with the input's name on failure."""
    name = describe(image)
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ImageInputError(f"{name}: arrays must be H x W x 3 uint8")
        return Image.fromarray(image)
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise ImageInputError(f"{name}: no such file")
        if path.stat().st_size == 0:
            raise ImageInputError(f"{name}: file is empty (0 bytes)")
        data = path.read_bytes()
    elif isinstance(image, bytes):
        if not image:
            raise ImageInputError(f"{name}: empty input")
        data = image
    else:
        raise ImageInputError(f"{name}: unsupported input type {type(image).__name__}")
    try:
        opened = Image.open(io.BytesIO(data))
        width, height = opened.size
        if width * height > max_source_pixels:
            raise ImageInputError(
                f"{name}: {width}x{height} = {width * height} pixels exceeds the limit of {max_source_pixels}; "
                "refused before decoding, possible decompression bomb"
            )
        opened.load()
        return opened
    except ImageInputError:
        raise
    except Image.DecompressionBombError as err:
        raise ImageInputError(f"{name}: refused before decoding, possible decompression bomb ({err})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageInputError(f"{name}: cannot decode image ({type(err).__name__}: {err})") from None


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Any PIL mode -> RGB, EXIF orientation applied, transparency composited onto ``background``."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, background + (255,))
        image = Image.alpha_composite(canvas, rgba)
    return image.convert("RGB")


def target_size(width: int, height: int, base: int, max_pixels: int) -> tuple[int, int]:
    """(width, height) of about ``base**2`` pixels, multiples of 32, aspect kept, at most ``max_pixels``."""
    scale = math.sqrt(base * base / (width * height))
    new_w = max(int(width * scale // GRANULARITY) * GRANULARITY, GRANULARITY)
    new_h = max(int(height * scale // GRANULARITY) * GRANULARITY, GRANULARITY)
    while new_w * new_h > max_pixels:
        if new_w >= new_h:
            new_w = max(int(max_pixels / new_h // GRANULARITY) * GRANULARITY, GRANULARITY)
        else:
            new_h = max(int(max_pixels / new_w // GRANULARITY) * GRANULARITY, GRANULARITY)
        if new_w * new_h > max_pixels and GRANULARITY in (new_w, new_h):
            raise ImageInputError(f"{width}x{height}: aspect too extreme for max_pixels={max_pixels}")
    return new_w, new_h


def preprocess(image: ImageLike, base: int = 384, max_pixels: int = 1024 * 1024) -> Preprocessed:
    """Load, convert, resize and normalise one image (see the module docstring)."""
    try:
        rgb = to_rgb(load_image(image))
    except (ValueError, OSError) as err:
        if isinstance(err, ImageInputError):
            raise
        raise ImageInputError(f"{describe(image)}: unsupported image ({type(err).__name__}: {err})") from None
    source_size = (rgb.height, rgb.width)
    width, height = target_size(rgb.width, rgb.height, base, max_pixels)
    resized = rgb.resize((width, height), Image.BILINEAR)
    array = torch.from_numpy(np.asarray(resized, dtype=np.uint8).copy())
    pixels = array.permute(2, 0, 1).float().div(255.0).sub(0.5).div(0.5)
    return Preprocessed(pixels=pixels, grid=(height // PATCH, width // PATCH), source_size=source_size)
