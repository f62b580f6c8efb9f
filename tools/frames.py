"""Coordinate frames of zoom boxes, conversion between them, and clamping to a croppable pixel box.

Pure Python (no torch, no PIL, no numpy): agents import this with the tool client.

Contract
--------
* A box is ``(x0, y0, x1, y1)``: ``(x0, y0)`` the top-left corner, ``(x1, y1)`` the bottom-right one. Every frame
  measures ``x`` along the width and ``y`` along the height of one image, the *source* image of the call (the
  original image, or a crop the model is zooming into again).
* `Frame` names the four frames that zoom-calling models speak (peers.md §3):

  ============== ===================================================== =====================================
  frame          a coordinate means                                    ``x_original =``
  ============== ===================================================== =====================================
  ORIGINAL_PX    pixels of the source image as stored                  ``x``
  RESIZED_PX     pixels of the image as the processor resized it       ``x * W / resized_w``
  UNIT           fraction of the image size, ``[0, 1]``                ``x * W``
  PERMILLE       thousandths of the image size, ``[0, 1000]``          ``x * W / 1000``
  ============== ===================================================== =====================================

  (``y`` likewise with ``H`` and ``resized_h``.) The frame of a call always comes from the caller or from a named
  model profile, never from the values: a tiny box in pixels looks exactly like a normalised one.
* `to_original` / `from_original` / `convert` are exact inverses up to float rounding; they neither clip nor
  order the corners.
* `clamp_box` turns any float box in original pixels into integer pixels that PIL can crop: end-exclusive,
  ``0 <= x0 < x1 <= W`` and ``0 <= y0 < y1 <= H``. The steps, in this order:

  1. order the corners (an inverted box is the same box);
  2. clip to the image;
  3. round outward to whole pixels (``floor`` the start, ``ceil`` the end), so every pixel the box touches is in
     the crop;
  4. grow each side shorter than ``min_side`` (at least 1 px) symmetrically about its centre (the odd pixel goes to
     the end), then slide the box back inside the image; a side longer than the image becomes the whole side, so
     an image smaller than ``min_side`` gives the whole image along that axis;
  5. cap the aspect ratio at ``max_aspect`` by growing the short side to ``ceil(long / max_aspect)``, centred and
     slid back inside; only when the image itself is too narrow for that (short side already the whole image) is
     the long side shrunk about its centre to ``floor(short * max_aspect)``. The cap wins over ``min_side``
     because the Qwen resize refuses crops above its own ratio limit.

  `clamp_box` is idempotent: a clamped box clamps to itself.
* `check_inside` refuses a box that lies entirely outside the image (no pixel in common: it would otherwise clamp
  to a 28 px corner crop that the caller never asked for) with `BoxOutsideImage`, a ValueError naming the box and
  the image size. The zoom tool and the RL parsers (`ZoomCall.pixel_boxes`) call it before clamping; a box that
  overlaps the image by any amount is clipped as above.
* `smart_resize` is Qwen's resize rule (transformers ``Qwen2VLImageProcessor``), used to know the resized frame:
  both sides multiples of ``factor`` (28 for Qwen2/2.5-VL, 32 for Qwen3-VL), pixel count inside
  ``[min_pixels, max_pixels]``, aspect ratio kept as closely as possible; ratios above 200 are refused.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from enum import StrEnum

__all__ = [
    "QWEN_MAX_ASPECT",
    "Box",
    "BoxOutsideImage",
    "Frame",
    "PixelBox",
    "check_inside",
    "clamp_box",
    "convert",
    "expand_box",
    "from_original",
    "resized_wh",
    "smart_resize",
    "to_original",
]

Box = tuple[float, float, float, float]
PixelBox = tuple[int, int, int, int]

# The Qwen2-VL/2.5-VL/3-VL resize raises above this ratio, so no crop may exceed it.
QWEN_MAX_ASPECT = 200.0


class Frame(StrEnum):
    """The coordinate frame a box is written in (values are the wire names used by the `zoom` tool schema)."""

    ORIGINAL_PX = "original_px"
    RESIZED_PX = "resized_px"
    UNIT = "unit"
    PERMILLE = "permille"

    @property
    def description(self) -> str:
        """One line for error messages and schema descriptions."""
        return _FRAME_DESCRIPTIONS[self]

    @property
    def value_range(self) -> tuple[float, float] | None:
        """The closed range every coordinate of an in-image box lies in, or ``None`` where it depends on the image."""
        if self is Frame.UNIT:
            return (0.0, 1.0)
        if self is Frame.PERMILLE:
            return (0.0, 1000.0)
        return None


_FRAME_DESCRIPTIONS = {
    Frame.ORIGINAL_PX: "absolute pixels of the original (source) image",
    Frame.RESIZED_PX: "absolute pixels of the image as the processor resized it (needs the resized size)",
    Frame.UNIT: "fractions of the image width/height in [0, 1]",
    Frame.PERMILLE: "thousandths of the image width/height in [0, 1000]",
}


def _as_box(box: Sequence[float], name: str = "box") -> Box:
    if isinstance(box, str | bytes) or len(box) != 4:
        raise ValueError(f"{name} must be 4 numbers [x0, y0, x1, y1], got {box!r}")
    out: list[float] = []
    for v in box:
        # bool is an int subclass; True as a coordinate is always a bug upstream.
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ValueError(f"{name} must be 4 numbers [x0, y0, x1, y1], got {box!r}")
        f = float(v)
        if not math.isfinite(f):
            raise ValueError(f"{name} has a non-finite coordinate: {box!r}")
        out.append(f)
    return (out[0], out[1], out[2], out[3])


def _as_size(wh: Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(wh, str | bytes) or len(wh) != 2:
        raise ValueError(f"{name} must be (width, height), got {wh!r}")
    w, h = wh
    if isinstance(w, bool) or isinstance(h, bool) or not isinstance(w, int) or not isinstance(h, int) or w < 1 or h < 1:
        raise ValueError(f"{name} must be two positive integers (width, height), got {wh!r}")
    return w, h


def _scale(frame: Frame | str, image_wh: Sequence[int], resized: Sequence[int] | None) -> tuple[float, float]:
    """Factors (sx, sy) with ``x_original = x * sx`` for ``frame``."""
    frame = Frame(frame)
    w, h = _as_size(image_wh, "image_wh")
    if frame is Frame.ORIGINAL_PX:
        return 1.0, 1.0
    if frame is Frame.UNIT:
        return float(w), float(h)
    if frame is Frame.PERMILLE:
        return w / 1000.0, h / 1000.0
    if resized is None:
        raise ValueError("frame 'resized_px' needs resized_wh, the (width, height) the processor resized the image to")
    rw, rh = _as_size(resized, "resized_wh")
    return w / rw, h / rh


def to_original(
    box: Sequence[float], frame: Frame | str, image_wh: Sequence[int], resized_wh: Sequence[int] | None = None
) -> Box:
    """``box`` written in ``frame`` -> float pixels of the image of size ``image_wh`` (no clipping, no ordering).

    ``resized_wh`` is required for `Frame.RESIZED_PX` and ignored otherwise.
    """
    x0, y0, x1, y1 = _as_box(box)
    sx, sy = _scale(frame, image_wh, resized_wh)
    return (x0 * sx, y0 * sy, x1 * sx, y1 * sy)


def from_original(
    box: Sequence[float], frame: Frame | str, image_wh: Sequence[int], resized_wh: Sequence[int] | None = None
) -> Box:
    """The inverse of `to_original`: float pixels of the image -> ``frame``."""
    x0, y0, x1, y1 = _as_box(box)
    sx, sy = _scale(frame, image_wh, resized_wh)
    return (x0 / sx, y0 / sy, x1 / sx, y1 / sy)


def convert(
    box: Sequence[float],
    src: Frame | str,
    dst: Frame | str,
    image_wh: Sequence[int],
    resized_wh: Sequence[int] | None = None,
) -> Box:
    """``box`` from frame ``src`` to frame ``dst`` of the same image (through original pixels)."""
    return from_original(to_original(box, src, image_wh, resized_wh), dst, image_wh, resized_wh)


def expand_box(box: Sequence[float], margin: float) -> Box:
    """Add ``margin`` times the box's width (height) on its left and right (top and bottom); 0 is the identity."""
    if isinstance(margin, bool) or not isinstance(margin, int | float) or not math.isfinite(margin) or margin < 0:
        raise ValueError(f"margin must be a finite number >= 0, got {margin!r}")
    x0, y0, x1, y1 = _as_box(box)
    dx = abs(x1 - x0) * margin
    dy = abs(y1 - y0) * margin
    return (min(x0, x1) - dx, min(y0, y1) - dy, max(x0, x1) + dx, max(y0, y1) + dy)


def _grow(a: int, b: int, target: int, dim: int) -> tuple[int, int]:
    """Grow ``[a, b)`` to ``target`` (<= dim) about its centre, odd pixel at the end, then slide inside ``[0, dim]``."""
    size = b - a
    if size >= target:
        return a, b
    a -= (target - size) // 2
    b = a + target
    if a < 0:
        a, b = 0, target
    elif b > dim:
        a, b = dim - target, dim
    return a, b


def _shrink(a: int, b: int, target: int) -> tuple[int, int]:
    """Shrink ``[a, b)`` to ``target`` about its centre."""
    a += (b - a - target) // 2
    return a, a + target


class BoxOutsideImage(ValueError):
    """A box with no pixel inside the image; the message names the box and the image size."""


def check_inside(box: Sequence[float], image_wh: Sequence[int], *, shown: str | None = None) -> None:
    """Raise `BoxOutsideImage` when ``box`` (float original pixels, corners in any order) has no area inside the
    image; ``shown`` is how the message quotes the box (default: the pixel numbers)."""
    w, h = _as_size(image_wh, "image_wh")
    x0, y0, x1, y1 = _as_box(box)
    x0, x1 = sorted((x0, x1))
    y0, y1 = sorted((y0, y1))
    if x1 <= 0 or y1 <= 0 or x0 >= w or y0 >= h:
        quoted = shown or "[" + ", ".join(f"{v:g}" for v in (x0, y0, x1, y1)) + "] (original pixels)"
        raise BoxOutsideImage(
            f"box {quoted} lies entirely outside the image, which is {w}x{h} pixels "
            f"(x from 0 to {w}, y from 0 to {h}); send a box that overlaps the image"
        )


def clamp_box(box: Sequence[float], image_wh: Sequence[int], *, min_side: int, max_aspect: float) -> PixelBox:
    """Float box in original pixels -> end-exclusive integer box inside the image (module docstring, steps 1-5)."""
    w, h = _as_size(image_wh, "image_wh")
    if isinstance(min_side, bool) or not isinstance(min_side, int) or min_side < 0:
        raise ValueError(f"min_side must be an integer >= 0, got {min_side!r}")
    if not isinstance(max_aspect, int | float) or not math.isfinite(max_aspect) or max_aspect < 1:
        raise ValueError(f"max_aspect must be a finite number >= 1, got {max_aspect!r}")
    x0, y0, x1, y1 = _as_box(box)
    # 1-2: order, clip.
    x0, x1 = sorted((min(max(x0, 0.0), w), min(max(x1, 0.0), w)))
    y0, y1 = sorted((min(max(y0, 0.0), h), min(max(y1, 0.0), h)))
    # 3: outward to whole pixels; a zero-width box (e.g. entirely off-image) is handled by the growth below.
    ix0, ix1 = math.floor(x0), math.ceil(x1)
    iy0, iy1 = math.floor(y0), math.ceil(y1)
    # 4: minimum side, never more than the image.
    side = max(min_side, 1)
    ix0, ix1 = _grow(ix0, ix1, min(side, w), w)
    iy0, iy1 = _grow(iy0, iy1, min(side, h), h)
    # 5: aspect cap.
    bw, bh = ix1 - ix0, iy1 - iy0
    if bw > bh * max_aspect:
        need = math.ceil(bw / max_aspect)
        if need <= h:
            iy0, iy1 = _grow(iy0, iy1, need, h)
        else:
            iy0, iy1 = 0, h
            ix0, ix1 = _shrink(ix0, ix1, max(1, math.floor(h * max_aspect)))
    elif bh > bw * max_aspect:
        need = math.ceil(bh / max_aspect)
        if need <= w:
            ix0, ix1 = _grow(ix0, ix1, need, w)
        else:
            ix0, ix1 = 0, w
            iy0, iy1 = _shrink(iy0, iy1, max(1, math.floor(w * max_aspect)))
    return (ix0, iy0, ix1, iy1)


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = 56 * 56,
    max_pixels: int = 28 * 28 * 1280,
) -> tuple[int, int]:
    """Qwen's resize rule: ``(height, width)`` -> ``(resized_height, resized_width)``.

    The same arithmetic as ``transformers.models.qwen2_vl.image_processing_qwen2_vl.smart_resize`` (Python's
    ``round`` included, which rounds halves to even), with the same defaults; Qwen3-VL uses ``factor=32``.
    """
    for name, v in (("height", height), ("width", width), ("factor", factor)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if max(height, width) / min(height, width) > QWEN_MAX_ASPECT:
        ratio = max(height, width) / min(height, width)
        raise ValueError(f"absolute aspect ratio must be smaller than {QWEN_MAX_ASPECT:g}, got {ratio}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def resized_wh(image_wh: Sequence[int], *, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """`smart_resize` in (width, height) order, the order every other function here uses."""
    w, h = _as_size(image_wh, "image_wh")
    rh, rw = smart_resize(h, w, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    return rw, rh
