"""Turning user images into RGB PIL images, and RGB images into the Qwen-VL vision input, as the official code does.

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
  bit for bit (values, dtype, patch order) to what transformers' torchvision-backend `Qwen2VLImageProcessor` with the
  same settings returns for `(images=[image], size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
  return_tensors="pt")`. That is the processor the official Q-Zoom code runs (`AutoProcessor(..., use_fast=True)`,
  `Qwen2VLImageProcessorFast` in transformers 4.51-4.57, the same code in 5.x): the 8-bit image is resized as a
  uint8 tensor by torch's antialiased bicubic (`F.interpolate(mode="bicubic", antialias=True)`, which is what
  torchvision's resize calls for uint8 on CPU), then rescaled and normalised in one fused float32 step
  `(v - mean/rescale) / (std/rescale)`. Pillow's bicubic, which the PIL backend uses, differs by a grey level on about
  0.5% of the values. No torchvision is needed: the settings are read from whichever Qwen2-VL image-processor class
  holds them (the PIL backend loads the same preprocessor_config.json). Qwen2.5-VL uses it for the global view and
  the RoI crop; Qwen3-VL for the RoI crop.
- `patchify_prefit` is the Qwen3-VL global view as the official Qwen3-VL evaluation builds it: qwen-vl-utils'
  `fetch_image` resizes the image with Pillow's bicubic to its `smart_resize` size at the pixel budget (factor
  patch x merge, 32 px on Qwen3-VL), then the processor runs with `do_resize=False`. `qwen_vl_utils_resize` is that
  first resize alone.

A processor or setting the fast path does not reproduce (see `fast_patchify_unsupported`: a foreign processor, a
resample filter other than nearest/bilinear/bicubic, an invalid setting) goes through the processor's own call,
so such a result is that processor's, and HF's own errors are raised. tests/test_preprocess.py compares the fast
path with the real torchvision-backend processor on many images, sizes, aspects and budgets (with the PyPI
torchvision wheel imported through `qzoom.evals.torchvision_shim`), which is what would catch an upgrade that
changes the processor's code.

torch, numpy and transformers are imported inside the functions only: agents import this module for `load_image`
and `ImageError` without torch.
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


# The image-processor classes whose settings `patchify` reads (transformers' PIL backend, its torchvision backend, and
# the 4.x name of the latter). Any of them loads the same preprocessor_config.json.
_QWEN2VL_PROCESSOR_CLASSES = ("Qwen2VLImageProcessorPil", "Qwen2VLImageProcessor", "Qwen2VLImageProcessorFast")

# PIL filter number -> the `F.interpolate` mode torchvision's resize uses for it (transformers'
# `pil_torch_interpolation_mapping`: NEAREST is torchvision's NEAREST_EXACT). Other filters (box, hamming, Lanczos)
# run torchvision kernels of its own, which plain torch does not have.
_PIL_TO_TORCH_MODE = {0: "nearest-exact", 2: "bilinear", 3: "bicubic"}


def _interpolation(resample: Any) -> str | None:
    """The `F.interpolate` mode of a processor's `resample` (PIL number or torchvision InterpolationMode), or None."""
    if resample is None:
        return "bilinear"  # transformers' torchvision resize without a resample
    value = getattr(resample, "value", resample)
    if isinstance(value, str):
        return {"nearest-exact": "nearest-exact", "bilinear": "bilinear", "bicubic": "bicubic"}.get(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return _PIL_TO_TORCH_MODE.get(value)
    return None


def fast_patchify_unsupported(image_processor: Any, image: Image.Image) -> str | None:
    """Why `patchify` must use the processor's own call for this processor and image, or None when its fast path
    reproduces the torchvision-backend processor."""
    ip = image_processor
    if not any(cls.__name__ in _QWEN2VL_PROCESSOR_CLASSES for cls in type(ip).__mro__):
        return f"{type(ip).__name__} is not a Qwen2-VL image processor"
    if _interpolation(ip.resample) is None:
        return f"resample {ip.resample!r} is not nearest, bilinear or bicubic"
    if ip.do_rescale and ip.rescale_factor is None:
        return "do_rescale without rescale_factor (HF refuses it)"
    if ip.do_normalize:
        for name in ("image_mean", "image_std"):
            value = getattr(ip, name)
            if value is None or (not isinstance(value, numbers.Real) and len(value) != 3):
                return f"{name} {value!r} is not one value or three (HF refuses it)"
        std = ip.image_std
        if any(float(v) == 0.0 for v in ((std,) if isinstance(std, numbers.Real) else std)):
            return "image_std has a zero (HF refuses it)"
    for name in ("patch_size", "merge_size", "temporal_patch_size"):
        value = getattr(ip, name)
        if not isinstance(value, int) or value < 1:
            return f"{name} {value!r} is not a positive integer"
    if not ip.do_convert_rgb and image.mode != "RGB":
        # Without conversion HF keeps the image's own channels (1, 2 or 4), which the 3-channel tables do not cover.
        return f"do_convert_rgb is off and the image is {image.mode}, not RGB"
    return None


@lru_cache(maxsize=64)
def _value_table(do_rescale: bool, rescale_factor: float, do_normalize: bool, mean: Any, std: Any) -> Tensor:
    """(3, 256): the processor's output value for channel c and 8-bit input v, computed with its own torch ops.

    transformers' torchvision backend (`rescale_and_normalize`) fuses rescale into normalise when both are on:
    mean and std become `torch.tensor(mean) * (1 / rescale_factor)`, and the uint8 image is cast to float32 and
    normalised in float32 (`(x - mean) / std`, torchvision's `normalize`); rescale alone is `image * rescale_factor`;
    neither leaves the uint8 values. Every step is elementwise per channel, so applying it to the 256 possible values
    and looking the pixels up gives identical numbers, in one gather instead of several full-size passes.
    `mean`/`std` are hashable (a number or a tuple), as HF passes them.
    """
    import torch

    values = torch.arange(256, dtype=torch.uint8).view(1, 256).expand(3, 256)
    if do_normalize:
        if do_rescale:
            mean_t = torch.tensor(mean) * (1.0 / rescale_factor)
            std_t = torch.tensor(std) * (1.0 / rescale_factor)
        else:
            mean_t, std_t = mean, std
        mean_t = torch.as_tensor(mean_t, dtype=torch.float32)
        std_t = torch.as_tensor(std_t, dtype=torch.float32)
        if mean_t.ndim == 1:
            mean_t = mean_t.view(-1, 1)
        if std_t.ndim == 1:
            std_t = std_t.view(-1, 1)
        table = (values.to(torch.float32) - mean_t) / std_t
    elif do_rescale:
        table = values * rescale_factor
    else:
        table = values
    return table.contiguous()


def _hashable(value: Any) -> Any:
    """A mean/std setting as HF passes it to its cached fusion: a number as is, a sequence as a tuple."""
    return value if isinstance(value, numbers.Real) else tuple(value)


def _to_rgb_for_processor(image: Image.Image) -> Image.Image:
    """transformers' `image_transforms.convert_to_rgb` for PIL input: alpha (or a transparency key) composited on
    opaque white, everything else `convert("RGB")`."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _resize_uint8(pixels: Tensor, height: int, width: int, mode: str) -> Tensor:
    """torchvision's `resize_image` on a (1, C, H, W) uint8 CPU tensor, with antialias on (transformers' default).

    For bicubic and nearest it runs `F.interpolate` on the uint8 tensor itself (torch's native uint8 kernels);
    for bilinear too where torchvision does (AVX2/AVX512 or ARM CPUs), elsewhere in float32, rounded back to uint8.
    """
    import platform

    import torch
    import torch.nn.functional as F

    if (height, width) == tuple(pixels.shape[-2:]):
        return pixels  # torchvision returns the input unchanged
    if mode == "nearest-exact":
        return F.interpolate(pixels, size=[height, width], mode=mode)
    native = mode == "bicubic" or (
        torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or platform.machine() in ("aarch64", "arm64")
    )
    if native:
        return F.interpolate(pixels, size=[height, width], mode=mode, align_corners=False, antialias=True)
    resized = F.interpolate(
        pixels.to(torch.float32), size=[height, width], mode=mode, align_corners=False, antialias=True
    )
    return resized.round_().to(torch.uint8)


def _call_processor(
    image: Image.Image, image_processor: Any, min_pixels: int, max_pixels: int, do_resize: bool | None
) -> tuple[Tensor, Tensor]:
    """The processor's own call (the fallback), with its errors."""
    kwargs: dict[str, Any] = {} if do_resize is None else {"do_resize": do_resize}
    out = image_processor(
        images=[image], size={"shortest_edge": min_pixels, "longest_edge": max_pixels}, return_tensors="pt", **kwargs
    )
    return out["pixel_values"], out["image_grid_thw"][0]


def patchify(
    image: Image.Image,
    image_processor: Any,
    min_pixels: int,
    max_pixels: int,
    *,
    do_resize: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """Pixel values (patches, C*T*P*P) and patch grid (3,) int64 of one image, at the given pixel budget.

    Equal, bit for bit, to transformers' torchvision-backend `Qwen2VLImageProcessor` with `image_processor`'s
    settings called as `(images=[image], size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
    return_tensors="pt")` (its `pixel_values` and `image_grid_thw[0]`): float32 values unless both rescale and
    normalise are off (then uint8, as HF). `do_resize` overrides the processor's setting (the official Qwen3-VL call
    passes `do_resize=False` after its own resize); without a resize the image's sides must be multiples of
    patch x merge, else ValueError. Unsupported processors and settings (`fast_patchify_unsupported`) go through the
    processor's own call. A zero budget raises ValueError as HF does.
    """
    import numpy as np
    import torch

    if fast_patchify_unsupported(image_processor, image) is not None:
        return _call_processor(image, image_processor, min_pixels, max_pixels, do_resize)
    resize = image_processor.do_resize if do_resize is None else do_resize
    if resize and (not min_pixels or not max_pixels):
        # HF refuses a zero budget with its own message.
        return _call_processor(image, image_processor, min_pixels, max_pixels, do_resize)

    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    ip = image_processor
    patch, merge, temporal = ip.patch_size, ip.merge_size, ip.temporal_patch_size
    if ip.do_convert_rgb:
        image = _to_rgb_for_processor(image)
    # (1, 3, H, W) uint8, as HF's `process_image` (PIL -> numpy -> channel-first, contiguous) and its batching give it.
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous().unsqueeze(0)
    if resize:
        height, width = smart_resize(
            image.height, image.width, factor=patch * merge, min_pixels=min_pixels, max_pixels=max_pixels
        )
        pixels = _resize_uint8(pixels, height, width, _interpolation(ip.resample) or "bicubic")
    else:
        height, width = image.height, image.width
        if height % (patch * merge) or width % (patch * merge):
            raise ValueError(
                f"without a resize the image's sides must be multiples of {patch * merge} px, got {width}x{height}"
            )

    # HF's patch order: (grid_h/merge, grid_w/merge, merge, merge) patches, each (channel, temporal, patch, patch).
    # Reorder the uint8 pixels first (a quarter of the bytes of float32), then look up the values per channel
    # straight into the output, then repeat the temporal slot (HF's expand of a still image over T frames).
    grid_h, grid_w = height // patch, width // patch
    n = grid_h * grid_w
    ordered = np.ascontiguousarray(
        pixels[0]
        .numpy()
        .reshape(3, grid_h // merge, merge, patch, grid_w // merge, merge, patch)
        .transpose(1, 4, 2, 5, 0, 3, 6)
    ).reshape(n, 3, patch * patch)
    table = _value_table(
        bool(ip.do_rescale),
        float(ip.rescale_factor) if ip.do_rescale else 1.0,
        bool(ip.do_normalize),
        _hashable(ip.image_mean) if ip.do_normalize else 0.0,
        _hashable(ip.image_std) if ip.do_normalize else 1.0,
    ).numpy()
    out = np.empty((n, 3, temporal, patch * patch), dtype=table.dtype)
    for channel in range(3):
        # mode="clip" skips the bounds check (uint8 indices cannot leave the 256-entry table).
        np.take(table[channel], ordered[:, channel], out=out[:, channel, 0], mode="clip")
    for t in range(1, temporal):
        out[:, :, t] = out[:, :, 0]
    return torch.from_numpy(out.reshape(n, -1)), torch.tensor([1, grid_h, grid_w], dtype=torch.int64)


# qwen-vl-utils' defaults (vision_process.py, 0.0.14): budget in merged tokens, and the aspect-ratio limit.
QWEN_VL_UTILS_MIN_TOKENS = 4
QWEN_VL_UTILS_MAX_TOKENS = 16384
QWEN_VL_UTILS_MAX_RATIO = 200


def qwen_vl_utils_size(
    height: int, width: int, factor: int, min_pixels: int | None = None, max_pixels: int | None = None
) -> tuple[int, int]:
    """qwen-vl-utils' `smart_resize` (0.0.14): (height, width) as multiples of `factor` inside the budget.

    It differs from transformers' rule: each side is at least `factor` before the budget checks, and the
    floor/ceil branches have no such minimum. An aspect ratio over 200 raises ValueError, as there.
    """
    import math

    max_pixels = max_pixels if max_pixels is not None else QWEN_VL_UTILS_MAX_TOKENS * factor**2
    min_pixels = min_pixels if min_pixels is not None else QWEN_VL_UTILS_MIN_TOKENS * factor**2
    if max_pixels < min_pixels:
        raise ValueError(f"max_pixels ({max_pixels}) must not be below min_pixels ({min_pixels})")
    if max(height, width) / min(height, width) > QWEN_VL_UTILS_MAX_RATIO:
        raise ValueError(
            f"absolute aspect ratio must be smaller than {QWEN_VL_UTILS_MAX_RATIO}, "
            f"got {max(height, width) / min(height, width)}"
        )
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def qwen_vl_utils_resize(
    image: Image.Image, factor: int, min_pixels: int | None = None, max_pixels: int | None = None
) -> Image.Image:
    """qwen-vl-utils' `fetch_image` for a PIL image: RGB (RGBA composited on white, as its `to_rgb`), then Pillow's
    `resize` with its default filter (bicubic) to `qwen_vl_utils_size`. Pillow returns a copy when the size is
    already right, so that case is the image itself."""
    if image.mode == "RGBA":
        rgb = Image.new("RGB", image.size, (255, 255, 255))
        rgb.paste(image, mask=image.getchannel("A"))
        image = rgb
    else:
        image = image.convert("RGB") if image.mode != "RGB" else image
    height, width = qwen_vl_utils_size(image.height, image.width, factor, min_pixels, max_pixels)
    if (width, height) == image.size:
        return image
    return image.resize((width, height), resample=Image.Resampling.BICUBIC)


def patchify_prefit(
    image: Image.Image, image_processor: Any, min_pixels: int, max_pixels: int
) -> tuple[Tensor, Tensor]:
    """The Qwen3-VL global view as the official Qwen3-VL evaluation builds it: `qwen_vl_utils_resize` to the budget
    with factor patch x merge (Pillow bicubic; 32 px for Qwen3-VL's patch 16, merge 2), then the processor with
    `do_resize=False` (`patchify(..., do_resize=False)`: rescale, normalise, patch order).

    Returns (pixel_values, grid_thw) as `patchify`; the grid is `qwen_vl_utils_size(h, w, factor, min_pixels,
    max_pixels)` divided by the patch size, which a caller can compute from the image size alone. The crop of a zoom
    step is NOT pre-fitted in the official code: it goes through `patchify` (the processor's torch resize) at the
    same budget. Raises ValueError where qwen-vl-utils does (aspect ratio over 200, a side floored to 0).
    """
    factor = image_processor.patch_size * image_processor.merge_size
    fitted = qwen_vl_utils_resize(image, factor, min_pixels, max_pixels)
    return patchify(fitted, image_processor, min_pixels, max_pixels, do_resize=False)
