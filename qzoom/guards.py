"""One set of input guards for every entry point: image formats, the pixel cap, the question, JSON bodies.

REST, SSE, the tool endpoints, `/v1/think`, MCP (HTTP and stdio), the CLI and the Python API's
`qzoom.images.load_image` all call these functions, so a given input is accepted or refused the same way, with the
same message, wherever it arrives.

Contract
--------
* Every refusal is an `InputError` (a `ValueError`) carrying `status` (the HTTP status an HTTP entry point answers)
  and `code` (the stable machine code of the error model); `str(err)` is one line naming what was wrong and what is
  accepted. The CLI prints that line and exits 2; MCP returns it as a tool error; HTTP as `{"error": {code, message}}`.

  | exception       | status | code                | when                                                       |
  |-----------------|--------|---------------------|------------------------------------------------------------|
  | `ImageError`    | 415    | `unsupported_image` | not a readable PNG, JPEG, WebP, GIF, BMP or TIFF; empty    |
  | `ImageTooLarge` | 413    | `image_too_large`   | the header claims more than the pixel cap                  |
  | `QueryError`    | 422    | `invalid_request`   | an empty, blank or over-long question                      |
  | `BodyError`     | 400    | `invalid_json`      | not UTF-8 JSON, too deeply nested, lone surrogates, NaN    |

* `open_image(source, max_pixels)` opens lazily: it reads the header only (format, size, mode) and refuses an image
  over the cap before one pixel is decoded, so a 99-byte PNG claiming 30000x30000 costs nothing. `max_pixels=None`
  is the process setting `QZOOM_MAX_PIXELS_IN` (default `DEFAULT_MAX_PIXELS`). The one cap figure quoted in every
  413 message is that cap; Pillow's own decompression-bomb guard (which fires at other figures) is translated.
* `decode_cost_bytes(width, height, mode)`: what decoding that header will allocate at most (the decoded frame plus
  its RGB conversion), for admission before decoding (`qzoom.admission`).
* `check_query(text)` / the `Query` pydantic type: 1 to `MAX_QUERY_CHARS` characters, not blank.
* `parse_json(body)`: the body as a JSON value, parsed by pydantic-core's parser, which refuses nesting deeper than
  its recursion limit and unpaired surrogates with a ValueError (Python's `json` raises RecursionError on deep input,
  and accepts lone surrogates that later fail to encode: both were 500s).

Importing this module loads PIL and pydantic only (no torch): agent hosts use it through the tool package.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, BinaryIO

import pydantic_core
from PIL import Image, UnidentifiedImageError
from pydantic import AfterValidator, Field

# FITS, PSD, EPS and the rest of Pillow's long tail are refused: fewer decoders, fewer attack surfaces.
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
ACCEPTED = "PNG, JPEG, WebP, GIF, BMP or TIFF"
DEFAULT_MAX_PIXELS = 40_000_000
MAX_QUERY_CHARS = 4000
# pydantic-core's JSON parser stops at this depth (its fixed recursion guard); stated here for the messages.
MAX_JSON_DEPTH = 200

# Bytes per pixel of the decoded frame, by Pillow mode (modes not listed: 4).
_MODE_BYTES = {"1": 1, "L": 1, "P": 1, "LA": 2, "PA": 2, "I;16": 2, "I;16B": 2, "I;16L": 2, "RGB": 3, "YCbCr": 3,
               "LAB": 3, "HSV": 3, "RGBA": 4, "RGBX": 4, "CMYK": 4, "I": 4, "F": 4}  # fmt: skip
_BOMB_SIZE = re.compile(r"Image size \((\d+) pixels\)")


class InputError(ValueError):
    """Input a caller got wrong; `status` and `code` say how HTTP answers it (see the module docstring)."""

    status = 422
    code = "invalid_request"


class ImageError(InputError):
    """The input is not a decodable image of an accepted format."""

    status = 415
    code = "unsupported_image"


class ImageTooLarge(InputError):
    """The image has more pixels than the cap."""

    status = 413
    code = "image_too_large"


class QueryError(InputError):
    """The question is empty, blank or too long."""


class BodyError(InputError):
    """The body is not JSON this service reads."""

    status = 400
    code = "invalid_json"


def max_pixels_setting() -> int:
    """The process-wide pixel cap, `QZOOM_MAX_PIXELS_IN` (read through `qzoom.settings`)."""
    from qzoom.settings import get_settings

    return get_settings().max_pixels_in


def too_large(pixels: int, max_pixels: int, size: tuple[int, int] | None = None) -> ImageTooLarge:
    shown = f"{size[0]}x{size[1]} = {pixels}" if size else str(pixels)
    return ImageTooLarge(f"the image is {shown} pixels; at most {max_pixels} pixels are accepted (QZOOM_MAX_PIXELS_IN)")


def _name(source: str | Path | bytes | BinaryIO) -> str:
    if isinstance(source, (str, Path)):
        return str(Path(source))
    return "the image"


def open_image(source: str | Path | bytes | BinaryIO, max_pixels: int | None = None) -> Image.Image:
    """The image opened lazily (header read, nothing decoded), or `ImageError` / `ImageTooLarge`."""
    cap = max_pixels_setting() if max_pixels is None else max_pixels
    name = _name(source)
    if isinstance(source, bytes):
        if not source:
            raise ImageError(f"the image is empty (0 bytes); send a {ACCEPTED} file")
        source = io.BytesIO(source)
    elif isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        if not path.is_file():
            raise ImageError(f"image file not found: {name}")
        source = path
    try:
        image = Image.open(source, formats=ALLOWED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        # Pillow's guard fires at its own figures (MAX_IMAGE_PIXELS, twice that for the error): quote ours.
        found = _BOMB_SIZE.search(str(err))
        raise too_large(int(found.group(1)) if found else cap + 1, cap) from None
    except UnidentifiedImageError:
        # Pillow's text names the stream object (`<_io.BytesIO object at 0x...>`): say what is accepted instead.
        raise ImageError(f"{name} is not a readable image; accepted formats: {ACCEPTED}") from None
    except Exception as err:
        # Hostile bytes make Pillow's header parsers raise many types (OSError, SyntaxError, struct.error, ...).
        raise ImageError(f"{name} is not a readable image ({err}); accepted formats: {ACCEPTED}") from None
    w, h = image.size
    if w * h > cap:
        raise too_large(w * h, cap, (w, h))
    if w < 1 or h < 1:
        raise ImageError(f"{name} has no pixels ({w}x{h}); accepted formats: {ACCEPTED}")
    return image


def decode_cost_bytes(width: int, height: int, mode: str) -> int:
    """Bytes that decoding an image of this header allocates at most: the decoded frame in its own mode, plus the
    8-bit RGB copy it is converted to (an alpha image also needs an RGBA intermediate)."""
    per_pixel = _MODE_BYTES.get(mode, 4) + 3 + (4 if "A" in mode or mode in ("P", "PA") else 0)
    return width * height * per_pixel


@dataclass(frozen=True)
class ImageHeader:
    """What the header says, before anything is decoded."""

    format: str
    width: int
    height: int
    mode: str

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def decode_bytes(self) -> int:
        return decode_cost_bytes(self.width, self.height, self.mode)


def probe_image(source: str | Path | bytes, max_pixels: int | None = None) -> ImageHeader:
    """The header of `source` under the same checks as `open_image` (nothing decoded)."""
    with open_image(source, max_pixels) as image:
        return ImageHeader(str(image.format), image.width, image.height, image.mode)


def check_query(text: str, field: str = "query") -> str:
    """`text` when it is a question this service answers, else `QueryError` naming `field`."""
    if not text.strip():
        raise QueryError(f"{field}: must not be empty or blank; give the question about the image")
    if len(text) > MAX_QUERY_CHARS:
        raise QueryError(f"{field}: {len(text)} characters; at most {MAX_QUERY_CHARS} are accepted")
    return text


def _pydantic_query(text: str) -> str:
    if not text.strip():
        # pydantic prefixes the field's location itself.
        raise ValueError("must not be empty or blank; give the question about the image")
    return text


# The question field of every request model (pydantic checks the length; blank text is refused the same way).
Query = Annotated[str, Field(min_length=1, max_length=MAX_QUERY_CHARS), AfterValidator(_pydantic_query)]


def parse_json(body: bytes) -> Any:
    """The JSON value of `body`, or `BodyError` (not UTF-8 JSON, too deep, unpaired surrogates)."""
    try:
        # allow_inf_nan=False: NaN and Infinity are not JSON (RFC 8259), and no field here takes them.
        return pydantic_core.from_json(body, allow_inf_nan=False)
    except ValueError as err:
        text = str(err)
        if "recursion" in text.lower():
            text = f"nested deeper than {MAX_JSON_DEPTH} levels"
        raise BodyError(f"the body is not valid JSON ({text}); send one UTF-8 JSON object") from None
