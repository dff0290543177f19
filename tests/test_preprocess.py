"""Native-resolution preprocessing: even grids for any size, every PIL mode, clear errors naming the input."""

import io

import numpy as np
import pytest
from PIL import Image

from viq_mllm.viq.preprocess import ImageInputError, preprocess, target_size


def png_bytes(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("h, w", [(17, 17), (37, 211), (64, 64), (300, 451), (40, 1200), (1, 1), (5000, 3)])
def test_grids_are_even_and_near_the_target_area(h, w):
    item = preprocess(np.zeros((h, w, 3), np.uint8), base=256, max_pixels=512 * 512)
    rows, cols = item.grid
    assert rows % 2 == 0 and cols % 2 == 0 and rows >= 2 and cols >= 2
    assert item.pixels.shape == (3, rows * 16, cols * 16)
    assert rows * cols * 256 <= 512 * 512
    assert item.source_size == (h, w)


def test_area_rule_keeps_aspect_and_rounds_down_to_32():
    assert target_size(640, 480, 384, 10**7) == (416, 320)
    assert target_size(1920, 1080, 768, 10**7) == (1024, 576)


def test_pixel_cap_shrinks_the_long_side():
    width, height = target_size(100, 10000, 1024, 256 * 256)
    assert width * height <= 256 * 256 and height > width


def test_normalisation_to_minus_one_one():
    item = preprocess(np.full((64, 64, 3), 255, np.uint8), base=64)
    assert item.pixels.min() == 1.0
    item = preprocess(np.zeros((64, 64, 3), np.uint8), base=64)
    assert item.pixels.max() == -1.0


def test_modes():
    rgba = Image.new("RGBA", (64, 64), (255, 0, 0, 0))  # fully transparent red -> white background
    assert preprocess(rgba, base=64).pixels.min() == 1.0
    gray = Image.new("L", (64, 64), 0)
    assert preprocess(gray, base=64).pixels.max() == -1.0
    cmyk = Image.new("CMYK", (64, 64), (0, 0, 0, 0))  # no ink = white
    assert preprocess(cmyk, base=64).pixels.min() == 1.0
    deep = Image.fromarray(np.full((64, 64), 65535, np.uint16))  # I;16 full scale = white
    assert deep.mode.startswith("I;16") and preprocess(deep, base=64).pixels.min() == 1.0
    palette = Image.new("P", (64, 64), 0)
    palette.putpalette([0, 0, 255] + [0] * 765)
    blue = preprocess(palette, base=64).pixels
    assert blue[2].min() == 1.0 and blue[0].max() == -1.0


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (96, 32), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    data = png_bytes(image, "JPEG", exif=exif.tobytes())
    item = preprocess(data, base=64)
    assert item.source_size == (96, 32)  # (height, width) after rotation


def test_bad_inputs_name_the_input(tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(ImageInputError, match="empty.jpg: file is empty"):
        preprocess(empty)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(ImageInputError, match="notes.png: cannot decode image"):
        preprocess(text)
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(png_bytes(Image.new("RGB", (256, 256), (1, 2, 3)))[:200])
    with pytest.raises(ImageInputError, match="cut.png: cannot decode image"):
        preprocess(truncated)
    with pytest.raises(ImageInputError, match="missing.png: no such file"):
        preprocess(tmp_path / "missing.png")


def test_decompression_bomb_refused_before_decoding(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_bytes(Image.new("1", (20000, 20000))))
    with pytest.raises(ImageInputError, match="bomb.png: refused before decoding, possible decompression bomb"):
        preprocess(bomb)
    from viq_mllm.viq.preprocess import load_image

    small_bomb = tmp_path / "small.png"
    small_bomb.write_bytes(png_bytes(Image.new("1", (3000, 3000))))
    with pytest.raises(ImageInputError, match="small.png: 3000x3000 = 9000000 pixels exceeds the limit of 1000000"):
        load_image(small_bomb, max_source_pixels=1_000_000)
