"""Region-of-interest geometry: from an SD-RPN logit map to grid boxes to source-pixel boxes.

Pure geometry on torch tensors; no model, no image decoding. Everything runs on whatever device the input map lives
on, except the box arithmetic, which works on a handful of scalars and is done on the CPU in float32.

Contract (spec §3, §11.4, §11.6; reference ``get_batched_sub_images_v2`` and ``get_bbox4src``):

* Grid coordinates are cells of the merged-token map of shape ``(H, W)`` = ``(grid_h, grid_w)``; pixel coordinates are
  pixels of the *original* image of size ``(src_w, src_h)``. Every box is ``x0, y0, x1, y1`` with ``x1``/``y1``
  exclusive, ``x1 > x0`` and ``y1 > y0``; pixel boxes lie inside ``[0, src_w] x [0, src_h]``.
* ``roi_probability`` = ``gaussian_blur3(sigmoid(logits) * corner_sink_mask)``; the mask is all ones for maps of at
  most 256 cells. The blur is torchvision's ``gaussian_blur(kernel_size=3, sigma=1)``: reflect padding, normalised
  separable kernel, applied as one 3x3 convolution.
* ``propose_grid_boxes`` thresholds ``prob > roi_thresh``. No cell above threshold -> no box (the caller answers
  directly). ``mode="union"`` with ``max_boxes == 1`` is the paper: one tight box around *all* cells, so separated
  blobs give one large box. Extensions beyond the paper (their defaults are the paper's): ``mode="components"`` (and
  any ``max_boxes > 1``) gives one box per 8-connected component, heaviest first, ``max_boxes`` of them;
  ``peak_frac > 0`` keeps only the cells that also reach that fraction of the map's peak.
* ``grid_box_to_pixels`` reproduces the reference float32 arithmetic: scale through the ``patch * H x patch * W``
  resized space, optional margin (extension; 0 = paper), grow each side below ``min_side`` symmetrically, slide back
  inside (left, top, right, bottom, in that order), clamp, then truncate toward zero (``.long()``), never round.
"""

from __future__ import annotations

import operator
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "BOX_MODES",
    "SINK_MIN_CELLS",
    "BoxMode",
    "GridBox",
    "PixelBox",
    "clamp_pixel_box",
    "component_boxes",
    "corner_sink_mask",
    "covering_grid_box",
    "gaussian_blur3",
    "grid_box_to_pixels",
    "heatmap_rows",
    "propose_grid_boxes",
    "roi_probability",
    "sub_box_to_pixels",
    "tight_box",
]

# The corner sink only shows up on maps large enough for attention to pile onto the first few tokens (spec §3.1).
SINK_MIN_CELLS = 256
# Qwen2.5-VL's merged token covers 28x28 pixels; the reference scales through that resized space, which fixes the
# float32 rounding of the result (Qwen3-VL uses 32).
DEFAULT_PATCH_PX = 28


def _as_int(value: Any, name: str) -> int:
    # operator.index accepts Python, numpy and 0-d integer tensors but rejects floats, so a float can never be
    # silently truncated into a box coordinate here.
    try:
        return operator.index(value)
    except TypeError as exc:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}") from exc


@dataclass(frozen=True, slots=True)
class _Box:
    x0: int
    y0: int
    x1: int
    y1: int

    def __post_init__(self) -> None:
        for name in ("x0", "y0", "x1", "y1"):
            object.__setattr__(self, name, _as_int(getattr(self, name), name))
        if self.x0 < 0 or self.y0 < 0:
            raise ValueError(f"negative box origin: {self}")
        if self.x1 <= self.x0 or self.y1 <= self.y0:
            raise ValueError(f"empty box (x1/y1 are exclusive): {self}")

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    def as_list(self) -> list[int]:
        return [self.x0, self.y0, self.x1, self.y1]


@dataclass(frozen=True, slots=True)
class GridBox(_Box):
    """Box in merged-token grid cells (columns x, rows y), end-exclusive."""


@dataclass(frozen=True, slots=True)
class PixelBox(_Box):
    """Box in original-image pixels, end-exclusive; ready for ``PIL.Image.crop(box.as_list())``."""


# ---------------------------------------------------------------------------------------------------------------------
# Probability map
# ---------------------------------------------------------------------------------------------------------------------


def corner_sink_mask(h: int, w: int, *, device: torch.device | str | None = None) -> torch.Tensor:
    """Float32 ``(h, w)`` ones, with the Qwen2.5-VL corner attention sink zeroed on maps of more than 256 cells.

    Zeroed: column 0 of rows ``0 .. h//4 - 1`` and row 0 of columns ``0 .. w//4 - 1`` (spec §11.6).
    """
    if h < 1 or w < 1:
        raise ValueError(f"map must be non-empty, got {h}x{w}")
    mask = torch.ones((h, w), dtype=torch.float32, device=device)
    if h * w > SINK_MIN_CELLS:
        # The reference floors the extent at one cell; on a map this large that only ever re-zeroes cell (0, 0),
        # which the other strip already covers, so the result equals the spec's h//4 / w//4 description.
        mask[: max(1, h // 4), 0] = 0
        mask[0, : max(1, w // 4)] = 0
    return mask


def _gaussian_kernel3(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # Built the way torchvision builds it (float32 1-D pdf, normalised, then the outer product), so the weights are
    # bit-identical and threshold decisions near tau match the reference.
    x = torch.linspace(-1.0, 1.0, steps=3)
    pdf = torch.exp(-0.5 * (x / 1.0).pow(2))
    k1 = pdf / pdf.sum()
    return torch.mm(k1[:, None], k1[None, :]).to(device=device, dtype=dtype)


def _reflect_index(n: int, device: torch.device) -> torch.Tensor:
    # Reflect padding by one (mirror without repeating the edge): [1, 0, 1, ..., n-2, n-1, n-2].
    # torch's reflect pad refuses a length-1 axis (the reference would crash on a 1xW map); repeating the single
    # value there makes the blur the identity along that axis, the only sensible extension.
    if n == 1:
        return torch.zeros(3, dtype=torch.long, device=device)
    inner = torch.arange(n, device=device)
    return torch.cat([inner[1:2], inner, inner[n - 2 : n - 1]])


def gaussian_blur3(prob: torch.Tensor) -> torch.Tensor:
    """3x3 Gaussian blur with sigma=1 and reflect padding, matching ``torchvision...gaussian_blur(x, 3, 1.0)``.

    ``prob``: ``(h, w)`` floating tensor. Returns ``(h, w)`` of the same dtype and device. Axes of length 1 (where
    reflect padding is undefined) are left unblurred.
    """
    if prob.dim() != 2:
        raise ValueError(f"expected an (h, w) map, got shape {tuple(prob.shape)}")
    if not torch.is_floating_point(prob):
        prob = prob.float()
    h, w = prob.shape
    padded = prob.index_select(0, _reflect_index(h, prob.device)).index_select(1, _reflect_index(w, prob.device))
    kernel = _gaussian_kernel3(prob.dtype, prob.device)
    return F.conv2d(padded[None, None], kernel[None, None])[0, 0]


def roi_probability(logits: torch.Tensor, *, sink_mask: bool | torch.Tensor = True) -> torch.Tensor:
    """``gaussian_blur3(sigmoid(logits) * sink)`` as float32 ``(h, w)`` on the logits' device.

    ``sink_mask``: True -> :func:`corner_sink_mask` (Qwen2.5-VL); False -> none; a tensor -> used as given
    (Qwen3-VL derives its sink mask from the first token's map, spec §3.1).
    """
    if logits.dim() != 2:
        raise ValueError(f"expected (h, w) logits, got shape {tuple(logits.shape)}")
    # Float32 even for bf16 models: the reference blurs in the model dtype, but bf16 rounding right at tau would make
    # the box depend on precision noise rather than on the map.
    prob = logits.float().sigmoid()
    if isinstance(sink_mask, torch.Tensor):
        if sink_mask.shape != prob.shape:
            raise ValueError(f"sink mask shape {tuple(sink_mask.shape)} != map shape {tuple(prob.shape)}")
        prob = prob * sink_mask.to(device=prob.device, dtype=prob.dtype)
    elif sink_mask:
        prob = prob * corner_sink_mask(prob.shape[0], prob.shape[1], device=prob.device)
    return gaussian_blur3(prob)


def heatmap_rows(prob: torch.Tensor, decimals: int = 4) -> list[list[float]]:
    """A probability map as JSON-ready rows (``rows x cols`` Python floats), each clamped into ``[0, 1]`` and
    rounded to ``decimals`` places (a non-finite cell becomes 0): what the service shows of the SD-RPN's map."""
    if prob.dim() != 2:
        raise ValueError(f"expected an (h, w) map, got shape {tuple(prob.shape)}")
    clean = torch.nan_to_num(prob.detach().float().cpu(), nan=0.0, posinf=1.0, neginf=0.0).clamp(0.0, 1.0)
    rows: list[list[float]] = [[round(float(v), decimals) for v in row] for row in clean.tolist()]
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# Grid boxes
# ---------------------------------------------------------------------------------------------------------------------


def _as_bool_mask(mask: torch.Tensor) -> torch.Tensor:
    if mask.dim() != 2:
        raise ValueError(f"expected an (h, w) mask, got shape {tuple(mask.shape)}")
    return mask if mask.dtype == torch.bool else mask != 0


def tight_box(mask: torch.Tensor) -> GridBox | None:
    """Tight end-exclusive box around every True (non-zero) cell of an ``(h, w)`` mask; None if there is none."""
    m = _as_bool_mask(mask)
    rows = m.any(dim=1).nonzero()
    if rows.numel() == 0:
        return None
    cols = m.any(dim=0).nonzero()
    return GridBox(int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)


def component_boxes(mask: torch.Tensor, max_boxes: int, *, prob: torch.Tensor | None = None) -> list[GridBox]:
    """One tight box per 8-connected component of ``mask``, heaviest first, at most ``max_boxes``.

    Extension beyond the paper, meant for ``max_boxes > 1`` only: the paper (and ``max_boxes == 1`` in
    :func:`propose_grid_boxes`) uses :func:`tight_box` around *all* cells, which is not the heaviest component.
    Weight is the sum of ``prob`` over the component's cells when ``prob`` is given, else its cell count; ties go to
    the larger component, then to the top-left one, so the order is deterministic. Boxes of different components may
    overlap (a blob inside an L-shape's bounding box); they are not merged.
    """
    if max_boxes < 1:
        raise ValueError(f"max_boxes must be >= 1, got {max_boxes}")
    m = _as_bool_mask(mask).detach().cpu().numpy()
    h, w = m.shape
    weights: np.ndarray | None = None
    if prob is not None:
        if prob.shape != mask.shape:
            raise ValueError(f"prob shape {tuple(prob.shape)} != mask shape {tuple(mask.shape)}")
        weights = prob.detach().to(device="cpu", dtype=torch.float64).numpy()

    # Flood fill in Python: maps are at most a few thousand cells and only the above-threshold ones are visited.
    seen = np.zeros_like(m, dtype=bool)
    found: list[tuple[float, int, int, int, GridBox]] = []
    for y_start, x_start in zip(*np.nonzero(m), strict=True):
        if seen[y_start, x_start]:
            continue
        seen[y_start, x_start] = True
        queue: deque[tuple[int, int]] = deque([(int(y_start), int(x_start))])
        y0, x0, y1, x1 = h, w, -1, -1
        count = 0
        mass = 0.0
        while queue:
            y, x = queue.popleft()
            count += 1
            mass += float(weights[y, x]) if weights is not None else 1.0
            y0, x0, y1, x1 = min(y0, y), min(x0, x), max(y1, y), max(x1, x)
            for ny in range(max(0, y - 1), min(h, y + 2)):
                for nx in range(max(0, x - 1), min(w, x + 2)):
                    if m[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
        found.append((mass, count, y0, x0, GridBox(x0, y0, x1 + 1, y1 + 1)))
    found.sort(key=lambda c: (-c[0], -c[1], c[2], c[3]))
    return [c[4] for c in found[:max_boxes]]


BoxMode = Literal["union", "components"]
BOX_MODES: tuple[BoxMode, ...] = ("union", "components")


def propose_grid_boxes(
    logits: torch.Tensor,
    roi_thresh: float,
    *,
    max_boxes: int = 1,
    mode: BoxMode = "union",
    peak_frac: float = 0.0,
    sink_mask: bool | torch.Tensor = True,
) -> tuple[list[GridBox], torch.Tensor]:
    """Boxes on the ``(h, w)`` grid where ``roi_probability(logits) > roi_thresh``, and that probability map.

    Empty list when no cell passes (fall back to the direct answer). ``mode="union"`` with ``max_boxes == 1``:
    ``[tight_box]`` around every passing cell (paper); ``mode="components"`` or ``max_boxes > 1``:
    :func:`component_boxes` weighted by probability mass, so ``max_boxes == 1`` is the heaviest component alone.
    ``peak_frac``: a cell must also exceed ``peak_frac * prob.max()`` (0: off, the paper).

    Why the extensions: a map that lights the target and look-alikes elsewhere (another plate, a second sign) gives
    the paper one box over all of them, and the crop is re-encoded at the same budget, so the target shrinks again.
    On the demo model the heaviest component above half the peak read 10 points more of the held-out questions than
    the union (docs/demo_model.md, "Session of 2026-12-04 (fourth)").
    """
    if max_boxes < 1:
        raise ValueError(f"max_boxes must be >= 1, got {max_boxes}")
    if mode not in BOX_MODES:
        raise ValueError(f"box mode must be one of {', '.join(BOX_MODES)}; got {mode!r}")
    if not 0.0 <= peak_frac <= 1.0:
        raise ValueError(f"peak_frac must lie in [0, 1], got {peak_frac}")
    prob = roi_probability(logits, sink_mask=sink_mask)
    mask = prob > roi_thresh
    if peak_frac > 0:
        mask &= prob >= peak_frac * prob.max()
    if mode == "union" and max_boxes == 1:
        box = tight_box(mask)
        return ([] if box is None else [box]), prob
    return component_boxes(mask, max_boxes, prob=prob), prob


# ---------------------------------------------------------------------------------------------------------------------
# Pixel boxes
# ---------------------------------------------------------------------------------------------------------------------


def _check_image_wh(image_wh: tuple[int, int]) -> tuple[int, int]:
    src_w, src_h = _as_int(image_wh[0], "image width"), _as_int(image_wh[1], "image height")
    if src_w < 1 or src_h < 1:
        raise ValueError(f"image must be at least 1x1, got {src_w}x{src_h}")
    return src_w, src_h


def _check_grid_hw(grid_hw: tuple[int, int], box: GridBox) -> tuple[int, int]:
    grid_h, grid_w = _as_int(grid_hw[0], "grid height"), _as_int(grid_hw[1], "grid width")
    if grid_h < 1 or grid_w < 1:
        raise ValueError(f"grid must be at least 1x1, got {grid_h}x{grid_w}")
    if box.x1 > grid_w or box.y1 > grid_h:
        raise ValueError(f"{box} does not fit a {grid_h}x{grid_w} grid")
    return grid_h, grid_w


def _add_margin(b: torch.Tensor, margin: float) -> torch.Tensor:
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    if margin == 0:
        return b
    pad_x = (b[2] - b[0]) * margin
    pad_y = (b[3] - b[1]) * margin
    return b + torch.stack([-pad_x, -pad_y, pad_x, pad_y])


def _finish_pixel_box(b: torch.Tensor, image_wh: tuple[int, int], min_side: float) -> PixelBox:
    """Grow to ``min_side``, slide inside, clamp and truncate a float32 ``[x0, y0, x1, y1]`` (reference order)."""
    src_w, src_h = image_wh
    if min_side < 0:
        raise ValueError(f"min_side must be >= 0, got {min_side}")
    b = b.clone()
    # Same float32 operations in the same order as get_bbox4src: the result is truncated, so a different order can
    # move a coordinate across an integer and change the crop by a pixel.
    if min_side > 0:
        grow_w = torch.clamp(min_side - (b[2] - b[0]), min=0)
        grow_h = torch.clamp(min_side - (b[3] - b[1]), min=0)
        b[0] -= grow_w / 2
        b[2] += grow_w / 2
        b[1] -= grow_h / 2
        b[3] += grow_h / 2
    # Slide, not clip, so a box grown at a border keeps its size; left before right means an image narrower than the
    # box ends with x0 < 0, which the clamp below turns into the whole image width. The reference slides only when
    # min_side > 0; sliding always also keeps margin/aspect growth from being clipped, and is a no-op otherwise.
    shift = -b[0].clamp(max=0)
    b[0] += shift
    b[2] += shift
    shift = -b[1].clamp(max=0)
    b[1] += shift
    b[3] += shift
    shift = (b[2] - src_w).clamp(min=0)
    b[0] -= shift
    b[2] -= shift
    shift = (b[3] - src_h).clamp(min=0)
    b[1] -= shift
    b[3] -= shift
    b[0::2] = b[0::2].clamp(min=0, max=src_w)
    b[1::2] = b[1::2].clamp(min=0, max=src_h)
    # .long() truncates toward zero (spec §11.4); after the clamp nothing is negative, so this is also a floor.
    x0, y0, x1, y1 = (int(v) for v in b.long().tolist())
    # Only reachable with min_side < 1 or sub-pixel boxes: keep the "non-empty crop" guarantee instead of letting
    # PIL produce a 0-pixel image.
    if x1 <= x0:
        x0, x1 = (x0, x0 + 1) if x0 < src_w else (src_w - 1, src_w)
    if y1 <= y0:
        y0, y1 = (y0, y0 + 1) if y0 < src_h else (src_h - 1, src_h)
    return PixelBox(x0, y0, x1, y1)


def grid_box_to_pixels(
    box: GridBox,
    grid_hw: tuple[int, int],
    image_wh: tuple[int, int],
    *,
    min_side: int = 28,
    margin: float = 0.0,
    patch_px: int = DEFAULT_PATCH_PX,
) -> PixelBox:
    """Map a grid box on an ``(H, W)`` grid to a pixel box of the ``(src_w, src_h)`` original image.

    Scale by ``src_w / W`` and ``src_h / H`` in float32 (through the ``patch_px``-sized resized space, as the
    reference does), widen each side by ``margin`` times the box side (extension; 0 = paper), grow sides shorter than
    ``min_side`` source pixels symmetrically, slide back inside the image, clamp, truncate toward zero. A dimension in
    which the image is smaller than ``min_side`` becomes the whole image.

    Bit-faithful to the reference, float32 noise included: a coordinate that should be an integer can land just below
    it and be truncated, so a full-grid box can lose the last pixel column/row and a grown side can come out
    ``min_side - 1`` pixels long.
    """
    src_w, src_h = _check_image_wh(image_wh)
    grid_h, grid_w = _check_grid_hw(grid_hw, box)
    resized_w, resized_h = grid_w * patch_px, grid_h * patch_px
    b = torch.tensor(box.as_list(), dtype=torch.float32)
    b[0::2] *= resized_w / grid_w
    b[1::2] *= resized_h / grid_h
    b[0::2] = b[0::2] * (src_w / resized_w)
    b[1::2] = b[1::2] * (src_h / resized_h)
    return _finish_pixel_box(_add_margin(b, margin), (src_w, src_h), min_side)


def covering_grid_box(
    box: Sequence[float],
    grid_hw: tuple[int, int],
    image_wh: tuple[int, int],
    *,
    grow: tuple[int, int, int, int] = (0, 0, 0, 0),
) -> GridBox:
    """The smallest box of cells of an ``(H, W)`` grid over an image of ``image_wh`` pixels that covers the pixel box
    ``box``, grown by ``grow`` cells on the left, top, right and bottom, clamped to the grid (at least one cell).

    The inverse direction of :func:`grid_box_to_pixels`: a known region (a ground-truth box, an agent's box) as the
    grid box the SD-RPN would have to propose to zoom on it.
    """
    src_w, src_h = _check_image_wh(image_wh)
    grid_h, grid_w = grid_hw
    x0, y0, x1, y1 = box
    cx0 = max(0, int(np.floor(x0 * grid_w / src_w)) - grow[0])
    cy0 = max(0, int(np.floor(y0 * grid_h / src_h)) - grow[1])
    cx1 = min(grid_w, int(np.ceil(x1 * grid_w / src_w)) + grow[2])
    cy1 = min(grid_h, int(np.ceil(y1 * grid_h / src_h)) + grow[3])
    cx0, cy0 = min(cx0, grid_w - 1), min(cy0, grid_h - 1)
    return GridBox(cx0, cy0, max(cx1, cx0 + 1), max(cy1, cy0 + 1))


def sub_box_to_pixels(
    box: GridBox,
    grid_hw: tuple[int, int],
    parent: PixelBox,
    image_wh: tuple[int, int],
    *,
    min_side: int = 28,
    margin: float = 0.0,
) -> PixelBox:
    """Like :func:`grid_box_to_pixels` for a grid that covers ``parent`` (a RoI) rather than the whole image.

    Used for multi-step zoom: the box is placed inside ``parent``'s region of the original image; min side, slide and
    clamp are then against the whole original image, so the result may extend beyond ``parent``.
    """
    src_w, src_h = _check_image_wh(image_wh)
    grid_h, grid_w = _check_grid_hw(grid_hw, box)
    if parent.x1 > src_w or parent.y1 > src_h:
        raise ValueError(f"parent {parent} does not fit a {src_w}x{src_h} image")
    b = torch.tensor(box.as_list(), dtype=torch.float32)
    b[0::2] = b[0::2] * (parent.width / grid_w) + parent.x0
    b[1::2] = b[1::2] * (parent.height / grid_h) + parent.y0
    return _finish_pixel_box(_add_margin(b, margin), (src_w, src_h), min_side)


def clamp_pixel_box(
    x0: float,
    y0: float,
    x1: float,
    y1: float,
    image_wh: tuple[int, int],
    *,
    min_side: int = 28,
    max_aspect: float | None = None,
) -> PixelBox:
    """Make an externally supplied box (e.g. an agent's tool call) a valid crop of the image.

    Corners are reordered if inverted, the box is intersected with the image (a box wholly outside collapses onto the
    nearest border), then, if ``max_aspect`` is given, its short side is grown symmetrically to ``long / max_aspect``;
    then min side, slide, clamp and truncation as in :func:`grid_box_to_pixels`. The aspect cap is best effort: an
    image more elongated than ``max_aspect`` cannot contain a box that satisfies it.
    """
    src_w, src_h = _check_image_wh(image_wh)
    if max_aspect is not None and not max_aspect >= 1:
        raise ValueError(f"max_aspect must be >= 1, got {max_aspect}")
    xs = sorted((float(x0), float(x1)))
    ys = sorted((float(y0), float(y1)))
    b = torch.tensor([xs[0], ys[0], xs[1], ys[1]], dtype=torch.float32)
    if not bool(torch.isfinite(b).all()):
        raise ValueError(f"box coordinates must be finite, got {(x0, y0, x1, y1)}")
    b[0::2] = b[0::2].clamp(min=0, max=src_w)
    b[1::2] = b[1::2].clamp(min=0, max=src_h)
    if max_aspect is not None:
        w, h = float(b[2] - b[0]), float(b[3] - b[1])
        if w > h * max_aspect:
            grow = w / max_aspect - h
            b[1] -= grow / 2
            b[3] += grow / 2
        elif h > w * max_aspect:
            grow = h / max_aspect - w
            b[0] -= grow / 2
            b[2] += grow / 2
    return _finish_pixel_box(b, (src_w, src_h), min_side)
