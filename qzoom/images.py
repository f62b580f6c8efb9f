"""Turning user images into RGB PIL images the processor accepts, whatever their size, mode or aspect.

- `load_image` opens a path, bytes or PIL image, applies the EXIF orientation and converts to 8-bit RGB (alpha is
  composited on white, 16-bit, 32-bit and float greyscale are scaled to their maximum, CMYK and the rest are
  converted), refusing anything that is not an image with `ImageError`. A multi-frame file (animated GIF, PNG or
  WebP, multi-page TIFF) is read as its first frame: a question is about one picture, and the first frame is what
  viewers show as the still image.
- `padded_to_aspect` pads an extreme panorama (the Qwen resize refuses aspect ratios over 200) on its bottom or right
  with grey, so every pixel of the original keeps its coordinates: boxes in the padded view are boxes in the original
  once clamped.
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

# The Qwen2-VL resize rejects aspect ratios above 200; stay well inside so the token budget is respected.
MAX_VIEW_ASPECT = 100.0
PAD_GREY = (127, 127, 127)


class ImageError(ValueError):
    """The input is not a decodable image."""


def to_rgb(image: Image.Image) -> Image.Image:
    """EXIF-orient and convert to 8-bit RGB; transparent pixels become white."""
    image = ImageOps.exif_transpose(image) or image
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16/32-bit and float greyscale: scale to 8 bit instead of clipping everything above 255 to white.
        extrema = image.getextrema()
        high = float(max(1, extrema[1] if isinstance(extrema[1], (int, float)) else 1))
        image = image.point(lambda v: v * (255.0 / high)).convert("L")
    return image.convert("RGB")


def load_image(source: str | Path | bytes | Image.Image) -> Image.Image:
    """Open `source` (a path, encoded bytes or a PIL image) as an RGB image; raise ImageError if it is not one."""
    if isinstance(source, Image.Image):
        return to_rgb(source)
    name = "the given bytes" if isinstance(source, bytes) else str(Path(source))
    try:
        image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else Path(source))
        image.load()
    except FileNotFoundError as err:
        raise ImageError(f"image file not found: {name}") from err
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ImageError(f"{name} is not a readable image (PNG, JPEG, WebP, GIF, BMP or TIFF): {err}") from err
    return to_rgb(image)


def padded_to_aspect(image: Image.Image, max_aspect: float = MAX_VIEW_ASPECT) -> Image.Image:
    """`image` padded with grey on the right or bottom so that max(w, h) / min(w, h) <= `max_aspect`."""
    w, h = image.size
    if max(w, h) / min(w, h) <= max_aspect:
        return image
    new_w = max(w, int(-(-h // max_aspect)))
    new_h = max(h, int(-(-w // max_aspect)))
    canvas = Image.new("RGB", (new_w, new_h), PAD_GREY)
    canvas.paste(image, (0, 0))
    return canvas
