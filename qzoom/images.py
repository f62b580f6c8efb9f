"""Turning user images into RGB PIL images the processor accepts, whatever their size, mode or aspect.

- `load_image` opens a path, bytes or PIL image, applies the EXIF orientation and converts to 8-bit RGB (alpha is
  composited on white, 16-bit, 32-bit and float greyscale are scaled to their maximum, CMYK and the rest are
  converted). Files and bytes pass the guards of `qzoom.guards` first (accepted formats, the pixel cap read from the
  header before decoding): `ImageError` for anything that is not an accepted image, `ImageTooLarge` over the cap.
  A multi-frame file (animated GIF, PNG or WebP, multi-page TIFF) is read as its first frame: a question is about one
  picture, and the first frame is what viewers show as the still image.
- `padded_to_aspect` pads an extreme panorama (the Qwen resize refuses aspect ratios over 200) on its bottom or right
  with grey, so every pixel of the original keeps its coordinates: boxes in the padded view are boxes in the original
  once clamped.
- `patchify` turns one PIL image into the Qwen2-VL vision input `(pixel_values, grid_thw)` at a pixel budget, equal
  element for element (float32, same patch order) to what the processor's own
  `image_processor(images=[image], size={"shortest_edge": min_pixels, "longest_edge": max_pixels}, return_tensors="pt")`
  returns for the PIL-backend `Qwen2VLImageProcessorPil` of the installed transformers, at a fraction of its cost.
  Every setting is read from the processor; a processor or image the fast path does not reproduce (see
  `fast_patchify_unsupported`) goes through the HF call itself, so the result is always the processor's. It mirrors
  the code of transformers 5.23 (`image_processing_pil_qwen2_vl`, `image_processing_backends.PilBackend`,
  `image_transforms`); tests/test_preprocess.py compares both on many images and settings, which is what would catch
  an upgrade that changes that code.

torch, numpy and transformers are imported inside `patchify` only: agents import this module for `load_image` and
`ImageError` without torch.
"""

from __future__ import annotations

import numbers
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image, ImageOps

from qzoom.guards import ACCEPTED, open_image
from qzoom.guards import ImageError as ImageError  # re-exported: the historical home of the name
from qzoom.guards import ImageTooLarge as ImageTooLarge

if TYPE_CHECKING:
    import numpy as np
    from torch import Tensor

# The Qwen2-VL resize rejects aspect ratios above 200; stay well inside so the token budget is respected.
MAX_VIEW_ASPECT = 100.0
PAD_GREY = (127, 127, 127)


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


def load_image(source: str | Path | bytes | Image.Image, max_pixels: int | None = None) -> Image.Image:
    """Open `source` (a path, encoded bytes or a PIL image) as an RGB image under the guards of `qzoom.guards`:
    `ImageError` when it is not an image of an accepted format, `ImageTooLarge` when its header claims more than
    `max_pixels` (None: `QZOOM_MAX_PIXELS_IN`), checked before anything is decoded. A PIL image given directly is
    the caller's own and only converted."""
    if isinstance(source, Image.Image):
        return to_rgb(source)
    image = open_image(source, max_pixels)
    try:
        image.load()
    except Exception as err:
        # A header that parsed over a body that does not (truncated, corrupt): not an image we can read.
        raise ImageError(f"{_shown(source)} is not a readable image ({err}); accepted formats: {ACCEPTED}") from None
    # A tenant scope (qzoom.cache.SCOPE_INFO) is the service's to set, never the file's (a PNG text chunk could).
    image.info.pop("qzoom_scope", None)
    return to_rgb(image)


def _shown(source: str | Path | bytes) -> str:
    return "the image" if isinstance(source, bytes) else str(Path(source))


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


# The methods of the HF PIL-backend Qwen2-VL processor between `__call__` and its output. `patchify` reproduces them
# as written in transformers; a subclass or instance that replaces any of them may compute something else.
_HF_PIPELINE_METHODS = (
    "__call__",
    "preprocess",
    "_standardize_kwargs",
    "_validate_preprocess_kwargs",
    "_preprocess_image_like_inputs",
    "_prepare_image_like_inputs",
    "_prepare_images_structure",
    "fetch_images",
    "process_image",
    "convert_to_rgb",
    "_preprocess",
    "resize",
    "rescale",
    "normalize",
    "patchify",
)


def fast_patchify_unsupported(image_processor: Any, image: Image.Image) -> str | None:
    """Why `patchify` must use the HF call for this processor and image, or None when its fast path applies."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    ip = image_processor
    if not isinstance(ip, Qwen2VLImageProcessorPil):
        # The torchvision backend (Qwen2VLImageProcessor) resizes with torch kernels, whose pixels differ from PIL's.
        return f"{type(ip).__name__} is not the PIL-backend Qwen2-VL image processor"
    for name in _HF_PIPELINE_METHODS:
        if name in vars(ip) or getattr(type(ip), name) is not getattr(Qwen2VLImageProcessorPil, name):
            return f"{type(ip).__name__}.{name} is overridden"
    if getattr(ip, "min_pixels", None) is not None or getattr(ip, "max_pixels", None) is not None:
        # Processor-level min_pixels/max_pixels attributes replace the size a call passes (with a deprecation warning).
        return "the processor has min_pixels/max_pixels attributes, which override the requested size"
    if not ip.do_resize:
        # No resize: the grid is the input's own size, and HF raises unless it divides into merged patches.
        return "do_resize is off"
    if ip.resample is not None and not isinstance(ip.resample, int):
        # A torchvision InterpolationMode, which the PIL backend maps through a table of its own.
        return f"resample {ip.resample!r} is not a PIL filter"
    if ip.do_rescale and ip.rescale_factor is None:
        return "do_rescale without rescale_factor (HF refuses it)"
    if ip.do_normalize:
        for name in ("image_mean", "image_std"):
            value = getattr(ip, name)
            if value is None or (not isinstance(value, numbers.Real) and len(value) != 3):
                return f"{name} {value!r} is not one value or three (HF refuses it)"
    for name in ("patch_size", "merge_size", "temporal_patch_size"):
        value = getattr(ip, name)
        if not isinstance(value, int) or value < 1:
            return f"{name} {value!r} is not a positive integer"
    if not ip.do_convert_rgb and image.mode != "RGB":
        # Without conversion HF keeps the image's own channels (1, 2 or 4), which the fast path's 3-channel tables
        # do not cover.
        return f"do_convert_rgb is off and the image is {image.mode}, not RGB"
    return None


@lru_cache(maxsize=64)
def _value_table(
    do_rescale: bool,
    rescale_factor: float,
    do_normalize: bool,
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> np.ndarray:
    """(3, 256) float32: the processor's output value for channel c and 8-bit input v, computed as HF computes it.

    HF's steps are elementwise per channel on uint8 input (`image_transforms.rescale`: float64 multiply, then float32;
    `normalize`: float32 subtract, then float32 divide), so applying them to the 256 possible values and looking the
    pixels up gives identical floats, in one gather instead of four full-size passes and their temporaries.
    """
    import numpy as np

    values = np.arange(256, dtype=np.uint8)
    if do_rescale:
        scaled = (values.astype(np.float64) * rescale_factor).astype(np.float32)
    else:
        scaled = values.astype(np.float32)
    if do_normalize:
        mean32 = np.array(mean, dtype=np.float32)[:, None]
        std32 = np.array(std, dtype=np.float32)[:, None]
        table = (scaled[None, :] - mean32) / std32
    else:
        table = np.broadcast_to(scaled, (3, 256))
    table = np.ascontiguousarray(table, dtype=np.float32)
    table.flags.writeable = False
    return table


def _three(value: Any) -> tuple[float, ...]:
    """A mean/std setting (one number or three) as three per-channel values: HF repeats one value over the channels."""
    return (float(value),) * 3 if isinstance(value, numbers.Real) else tuple(value)


def patchify(image: Image.Image, image_processor: Any, min_pixels: int, max_pixels: int) -> tuple[Tensor, Tensor]:
    """Pixel values (patches, C*T*P*P) float32 and patch grid (3,) int64 of one image, at the given pixel budget.

    Equal to `image_processor(images=[image], size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
    return_tensors="pt")` (its `pixel_values` and `image_grid_thw[0]`), and raising what it raises.
    """
    import numpy as np
    import torch

    if not min_pixels or not max_pixels or fast_patchify_unsupported(image_processor, image) is not None:
        # HF refuses a zero budget with its own message; the other cases are settings this path does not reproduce.
        out = image_processor(
            images=[image], size={"shortest_edge": min_pixels, "longest_edge": max_pixels}, return_tensors="pt"
        )
        return out["pixel_values"], out["image_grid_thw"][0]

    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    ip = image_processor
    patch, merge, temporal = ip.patch_size, ip.merge_size, ip.temporal_patch_size
    if ip.do_convert_rgb:
        # transformers' `image_transforms.convert_to_rgb` for PIL input: alpha (or a transparency key) composited on
        # opaque white, everything else `convert("RGB")`, which for an RGB image is an unneeded copy.
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, rgba).convert("RGB")
        elif image.mode != "RGB":
            image = image.convert("RGB")
    # `Qwen2VLImageProcessorPil.resize` -> `PilBackend.resize` -> `image_transforms.resize`: PIL's resize with the
    # processor's filter (BILINEAR when unset) and no reducing gap, to the smart_resize size. HF round-trips through
    # a uint8 array, which is lossless, and PIL returns a plain copy when the size is unchanged, so that is skipped.
    height, width = smart_resize(
        image.height, image.width, factor=patch * merge, min_pixels=min_pixels, max_pixels=max_pixels
    )
    if (width, height) != image.size:
        resample = ip.resample if ip.resample is not None else Image.Resampling.BILINEAR
        image = image.resize((width, height), resample=resample, reducing_gap=None)
    pixels = np.asarray(image)  # (H, W, 3) uint8

    # HF's patch order: (grid_h/merge, grid_w/merge, merge, merge) patches, each (channel, temporal, patch, patch).
    # Reorder the uint8 pixels first (a quarter of the bytes of float32), then look up the float values per channel
    # straight into the output, then repeat the temporal slot (HF's broadcast of a still image over T frames).
    grid_h, grid_w = height // patch, width // patch
    n = grid_h * grid_w
    ordered = np.ascontiguousarray(
        pixels.reshape(grid_h // merge, merge, patch, grid_w // merge, merge, patch, 3).transpose(0, 3, 1, 4, 6, 2, 5)
    ).reshape(n, 3, patch * patch)
    table = _value_table(
        bool(ip.do_rescale),
        ip.rescale_factor if ip.do_rescale else 1.0,
        bool(ip.do_normalize),
        _three(ip.image_mean) if ip.do_normalize else (),
        _three(ip.image_std) if ip.do_normalize else (),
    )
    out = np.empty((n, 3, temporal, patch * patch), dtype=np.float32)
    for channel in range(3):
        # mode="clip" skips the bounds check (uint8 indices cannot leave the 256-entry table).
        np.take(table[channel], ordered[:, channel], out=out[:, channel, 0], mode="clip")
    for t in range(1, temporal):
        out[:, :, t] = out[:, :, 0]
    return torch.from_numpy(out.reshape(n, -1)), torch.tensor([1, grid_h, grid_w], dtype=torch.int64)
