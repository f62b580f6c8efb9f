"""Image loading: every user image becomes RGB with its EXIF orientation applied, or a clear ImageError."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from qzoom.images import ImageError, load_image, padded_to_aspect


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def test_alpha_is_composited_on_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert load_image(encode(rgba)).getpixel((0, 0)) == (255, 255, 255)


def test_cmyk_and_greyscale_become_rgb():
    assert load_image(encode(Image.new("CMYK", (3, 3), (0, 255, 255, 0)), "JPEG")).mode == "RGB"
    assert load_image(Image.new("L", (3, 3), 77)).getpixel((1, 1)) == (77, 77, 77)


def test_16_bit_greyscale_is_scaled_not_clipped():
    arr = np.array([[0, 32768, 65535]], dtype=np.uint16)
    out = load_image(encode(Image.fromarray(arr)))
    assert [out.getpixel((x, 0))[0] for x in range(3)] == [0, 127, 255]


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    out = load_image(encode(image, "JPEG", exif=exif))
    assert out.size == (20, 40)


@pytest.mark.parametrize("data", [b"not an image at all", encode(Image.new("RGB", (64, 64)))[:40]])
def test_garbage_and_truncated_files_raise_image_error(data):
    with pytest.raises(ImageError, match="not a readable image"):
        load_image(data)


def test_missing_file_raises_image_error(tmp_path):
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "nope.png")


@pytest.mark.parametrize(("w", "h"), [(1, 20000), (20000, 1), (5000, 10)])
def test_extreme_panoramas_are_padded_keeping_coordinates(w, h):
    image = Image.new("RGB", (w, h), (10, 20, 30))
    out = padded_to_aspect(image)
    assert max(out.size) / min(out.size) <= 100
    assert out.getpixel((0, 0)) == (10, 20, 30) and out.size[0] >= w and out.size[1] >= h


def test_ordinary_images_are_not_padded():
    image = Image.new("RGB", (300, 20))
    assert padded_to_aspect(image) is image
