"""Decoding uploaded image bytes safely: format allow-list, a pixel limit checked on the header, then RGB.

`decode_upload(data, max_pixels)` returns an RGB image or raises `ApiError`: 413 `image_too_large` when the header
claims more than `max_pixels` pixels (checked before any pixel is decoded, so a decompression bomb costs nothing)
or Pillow's own bomb guard fires, 415 `unsupported_image` for anything that does not decode as one of the allowed
formats (a text file named .png, a truncated PNG, a FITS file, ...).
"""

from __future__ import annotations

import io

from PIL import Image

from qzoom.images import load_image

from .errors import ApiError

# FITS, PSD, EPS and the rest of Pillow's long tail are refused: fewer decoders, fewer attack surfaces.
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")


def decode_upload(data: bytes, max_pixels: int) -> Image.Image:
    """RGB image from encoded bytes, or ApiError 413/415 (see the module docstring)."""
    if not data:
        raise ApiError(415, "unsupported_image", "the image is empty")
    try:
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
        w, h = image.size
        if w * h > max_pixels:
            raise ApiError(
                413, "image_too_large", f"the image is {w}x{h} = {w * h} pixels; at most {max_pixels} are accepted"
            )
        image.load()
        return load_image(image)
    except ApiError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ApiError(413, "image_too_large", f"the image is too large to decode safely: {err}") from err
    except Exception as err:
        # Hostile bytes make Pillow's decoders raise many types (OSError, ValueError, SyntaxError, struct.error,
        # IndexError, ...); all of them mean "not an image we can read", never a server fault.
        allowed = ", ".join(ALLOWED_FORMATS)
        raise ApiError(415, "unsupported_image", f"not a readable image ({allowed}): {err}") from err
