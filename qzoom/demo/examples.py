"""The demo curriculum's training sequences: items, crops, reading targets, drills and batches.

Contract: :class:`ExampleBuilder` turns a synthetic item into one teacher-forced :class:`Example` of a *view*
(``crop``: a native-resolution crop around the target; ``coarse``: the whole image at the coarse budget; ``fused``:
the coarse view with a native crop spliced after it at the engine's aligned M-RoPE positions), built by the inference
engine's own steps (``prepare``, ``embed``, ``splice``), so training sees exactly the token layout and positions that
``qzoom ask`` produces. :func:`reading_targets` / :func:`coarse_reading_targets` label each merged token with what it
shows (the reading head's :data:`READ_GROUPS`); :func:`reading_drill`, :func:`answer_drill` and
:func:`referent_drill` are the curriculum's small synthetic images; :func:`collate` pads examples into a batch;
:class:`ItemPool` renders train-split items ahead on a worker thread. Used by :mod:`qzoom.demo.base`.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from qzoom import roi
from qzoom.backbones.qwen2_5_vl import BACKBONE as QWEN2_5_VL
from qzoom.demo.model import BaseRecipe
from qzoom.engine import ImageBlock, Proposal, QZoomEngine, SequenceState
from qzoom.evals.synthetic import (
    ANSWER_VOCAB,
    CODE_ALPHABET,
    CODE_FAMILIES,
    CODE_LENGTH,
    COLOURS,
    DETAIL_FAMILIES,
    PATCH_PX,
    PATTERNS,
    POSITIONS,
    SHAPES,
    TEMPLATES,
    PlateKind,
    SyntheticItem,
    boxes_overlap,
    crop_box_around,
    crop_with_answer,
    detail_size,
    detail_value,
    generate_item,
    plate_fill,
    render_detail,
    render_plate,
)
from qzoom.schemas import AskOptions

MIN_BOX_SIDE = QWEN2_5_VL.min_box_side  # the demo model is a Qwen2.5-VL: crops at least one 28-px token wide

View = Literal["crop", "coarse", "fused"]


@dataclass
class Example:
    """One teacher-forced sequence: prompt + answer + <|im_end|>, its positions, its images' pixels."""

    input_ids: torch.Tensor  # (n,)
    positions: torch.Tensor  # (3, n) float32 M-RoPE
    labels: torch.Tensor  # (n,) -100 except the answer tokens and <|im_end|>
    pixel_values: list[torch.Tensor]  # per image (patches, dim), in sequence order
    grids: list[torch.Tensor]  # per image (3,)
    family: str
    view: View
    reading: torch.Tensor | None = None  # (merged tokens of the one image, len(READ_CLASSES)) for crops
    target: torch.Tensor | None = None  # sequence indices of the image tokens that show the target (grounding)
    referent: int | None = None  # index in REFERENTS of the colour or quadrant the question names (text only)
    answer_weight: float = 1.0  # of this sample's answer loss (see `BaseRecipe.unreadable_answer_weight`)
    # (sequence position that predicts an answer character, sequence indices of the image tokens that show it)
    pointer: list[tuple[int, torch.Tensor]] | None = None
    # Per image: a key under which its vision features may be kept while the tower is frozen (the same pixels every
    # time: a pooled item's coarse view or its fixed zoom crop), or None (drawn afresh: crops, drills).
    image_keys: list[str | None] | None = None


@dataclass
class PoolItem:
    """What training keeps of a benchmark item: its coarse view and, for detail items, the target's neighbourhood at
    native resolution (a 4096 px canvas is 50 MB; this is a few).

    ``item.image`` is the neighbourhood, whose top-left pixel sits at ``origin`` on the canvas; ``item.canvas``,
    ``item.box`` and ``item.scene`` keep canvas coordinates. Coarse items carry ``zoom``: the crop of their ground-truth
    region at the view budget, and its grid box (what a zoom on them would show). Detail items pooled with
    ``decoy`` carry one (where another plate's cells stay clear of the target's): the crop of that plate's coarse cells
    at the view budget, and its grid box (what a zoom on a look-alike shows: the second box of an SD-RPN that lit
    both, see :meth:`ExampleBuilder.fused`).
    """

    item: SyntheticItem
    origin: tuple[int, int]
    coarse: Image.Image  # the whole canvas at the budget, resized exactly as the processor would
    grid_hw: tuple[int, int]
    zoom: tuple[Image.Image, roi.GridBox] | None = None
    decoy: tuple[Image.Image, roi.GridBox] | None = None
    # The processor's output for ``coarse`` and the zoom crop, made on first use: an item is drawn many times.
    pixels: dict[str, tuple[torch.Tensor, torch.Tensor]] = dataclasses.field(default_factory=dict)


def _budget_size(wh: tuple[int, int], min_pixels: int, max_pixels: int) -> tuple[int, int]:
    h, w = smart_resize(wh[1], wh[0], factor=PATCH_PX, min_pixels=min_pixels, max_pixels=max_pixels)
    return w, h


def pool_item(item: SyntheticItem, min_pixels: int, max_pixels: int, reach: int, decoy: bool = False) -> PoolItem:
    """Shrink ``item`` to what the examples need; crops reach at most ``reach`` pixels beyond the target's box. With
    ``decoy``, a detail item also keeps a look-alike's crop (:attr:`PoolItem.decoy`)."""
    coarse_wh = _budget_size(item.canvas, min_pixels, max_pixels)
    coarse = item.image.resize(coarse_wh, Image.Resampling.BICUBIC)  # the PIL processor's resample
    grid_hw = (coarse_wh[1] // PATCH_PX, coarse_wh[0] // PATCH_PX)
    width, height = item.canvas
    if item.needs_detail:
        # A fused example's box is the target's cells grown by up to one cell per side, each cell up to this big.
        cell = max(width / grid_hw[1], height / grid_hw[0])
        pad = max(reach, math.ceil(2 * cell) + PATCH_PX)
        x0, y0, x1, y1 = item.box
        region = (max(0, x0 - pad), max(0, y0 - pad), min(width, x1 + pad), min(height, y1 + pad))
        kept = dataclasses.replace(item, image=item.image.crop(region))
        decoy_view = _decoy_crop(item, grid_hw, min_pixels, max_pixels) if decoy else None
        return PoolItem(kept, (region[0], region[1]), coarse, grid_hw, decoy=decoy_view)
    grid_box = _grid_box_around(item.box, grid_hw, item.canvas, None)
    zoom = _budget_crop(item, grid_box, grid_hw, min_pixels, max_pixels)
    kept = dataclasses.replace(item, image=Image.new("RGB", (1, 1)))
    return PoolItem(kept, (0, 0), coarse, grid_hw, (zoom, grid_box))


def _budget_crop(
    item: SyntheticItem, grid_box: roi.GridBox, grid_hw: tuple[int, int], min_pixels: int, max_pixels: int
) -> Image.Image:
    """The crop of ``item``'s whole canvas that a zoom on ``grid_box`` cuts, resized to the view budget exactly as the
    processor would: fixed once per pooled item, its features can be kept."""
    pb = roi.grid_box_to_pixels(grid_box, grid_hw, item.canvas, min_side=MIN_BOX_SIDE)
    crop = item.image.crop((pb.x0, pb.y0, pb.x1, pb.y1))
    return crop.resize(_budget_size(crop.size, min_pixels, max_pixels), Image.Resampling.BICUBIC)


def _decoy_crop(
    item: SyntheticItem, grid_hw: tuple[int, int], min_pixels: int, max_pixels: int
) -> tuple[Image.Image, roi.GridBox] | None:
    """The crop of the coarse cells covering a plate other than the target (one of the target's kind if there is one:
    a look-alike), at the view budget, and its grid box; None when no other plate's cells stay clear of the
    target's."""
    scene = item.scene
    if scene.target is None:
        return None
    target = scene.plates[scene.target]
    aim = roi.covering_grid_box(item.box, grid_hw, item.canvas)
    others = [plate for i, plate in enumerate(scene.plates) if i != scene.target]
    for plate in sorted(others, key=lambda plate: plate.kind != target.kind):  # look-alikes first
        grid_box = roi.covering_grid_box(plate.box, grid_hw, item.canvas)
        if not boxes_overlap(grid_box.as_list(), aim.as_list()):
            return _budget_crop(item, grid_box, grid_hw, min_pixels, max_pixels), grid_box
    return None


def _grid_box_around(
    box: Sequence[float], grid_hw: tuple[int, int], wh: tuple[int, int], rng: random.Random | None
) -> roi.GridBox:
    """The coarse-grid cells covering ``box``, grown by 0-1 cells per side at random (``rng``), or not at all: what
    an SD-RPN that found the target proposes (its thresholded blob is rarely tight)."""
    grow = (0, 0, 0, 0) if rng is None else (rng.randint(0, 1), rng.randint(0, 1), rng.randint(0, 1), rng.randint(0, 1))
    return roi.covering_grid_box(box, grid_hw, wh, grow=grow)


# The reading head's classes, in groups that are each a softmax with one more class, "nothing" (see `_reading_loss`):
# what a token shows (letters are a subset of the code alphabet), which glyph of a code it is, the colour of the
# object it is on, and what kind of object that is.
READ_GROUPS: tuple[tuple[str, ...], ...] = (
    (*CODE_ALPHABET, *SHAPES, *PATTERNS),
    tuple(f"glyph {i + 1}" for i in range(CODE_LENGTH)),
    tuple(f"on {colour}" for colour in COLOURS),
    ("is plate", "is region", "is frame"),
)
READ_CLASSES: tuple[str, ...] = tuple(name for group in READ_GROUPS for name in group)
READ_LOGITS = len(READ_CLASSES) + len(READ_GROUPS)  # the reading head's outputs: each group and its "nothing"
COARSE_READ_GROUPS = (2, 3)  # what the coarse view's tokens are labelled with: colour and kind of object, no glyphs
# A coarse token is labelled with the object that covers at least this share of it: a plate's 44 px card covers at
# least 60% of some token wherever it lies; a large frame's ring is 3-8 coarse pixels wide, a tenth to a third.
_COARSE_COVER = {"plate": 0.3, "region": 0.3, "frame": 0.12}


# What a detail question can name its plate by: a colour word or a quadrant (the referent head's classes).
REFERENTS: tuple[str, ...] = (*COLOURS, *POSITIONS)


def referent_of(question: str) -> int | None:
    """Index in :data:`REFERENTS` of the colour or quadrant ``question`` names ("the blue frame", "the top left
    frame"), or None: read from the words alone, the label of the referent head (:func:`_referent_loss`)."""
    words = f" {question.lower()} "
    found = [i for i, name in enumerate(REFERENTS) if f" {name} " in words]
    return found[0] if len(found) == 1 else None


def _mark(targets: torch.Tensor, token: int, name: str) -> None:
    targets[token, READ_CLASSES.index(name)] = 1.0


def reading_targets(
    crop: Image.Image,
    plate_box: tuple[int, int, int, int],
    border: int,
    family: str,
    answer: str,
    grid_hw: tuple[int, int],
    colour: str | None,
) -> torch.Tensor:
    """What each merged token of a native crop shows: (gh * gw, len(READ_CLASSES)) multi-hot, row-major.

    A token is marked with a character when that glyph's centre lies in it (codes: the ink's columns split into one
    run per glyph, or into equal thirds where glyphs touch) and, for a code, with the glyph's place in it; with a
    shape or pattern when the ink's centre does; and with the plate's ``colour`` and "is plate" when its centre lies on
    the card inside the border (not when ``colour`` is None). Found from the crop's own pixels (dark ink on the light
    plate inside its border), so it holds for any answer drawn.

    Why: from scratch, the answer loss alone reaches the vision tower only through the decoder's attention to the
    right tokens, which is itself untrained, and both sit at the answer priors for thousands of samples. This dense
    per-token loss (a linear head on the merger's output, dropped after training) teaches the ViT to see glyphs
    directly, in order and on which plate; the decoder then only has to learn where to look.
    """
    gh, gw = grid_hw
    targets = torch.zeros(gh * gw, len(READ_CLASSES))
    sx, sy = gw * PATCH_PX / crop.width, gh * PATCH_PX / crop.height  # the processor's resize, if any
    x0, y0, x1, y1 = (plate_box[0] + border, plate_box[1] + border, plate_box[2] - border, plate_box[3] - border)
    x0, y0, x1, y1 = max(0, x0), max(0, y0), min(crop.width, x1), min(crop.height, y1)
    if x1 <= x0 or y1 <= y0:
        return targets
    for row in range(gh if colour is not None else 0):
        for col in range(gw):
            if x0 <= (col + 0.5) * PATCH_PX / sx < x1 and y0 <= (row + 0.5) * PATCH_PX / sy < y1:
                _mark(targets, row * gw + col, f"on {colour}")
                _mark(targets, row * gw + col, "is plate")
    ink = np.asarray(crop.convert("L"))[y0:y1, x0:x1] < 128
    if not ink.any():
        return targets
    ys, xs = np.nonzero(ink)
    cy = y0 + (ys.min() + ys.max() + 1) / 2
    if family in ("shape", "pattern"):
        centres = [(x0 + (xs.min() + xs.max() + 1) / 2, answer)]
    else:
        columns = ink.any(axis=0)
        edges = np.flatnonzero(np.diff(np.concatenate([[0], columns.astype(np.int8), [0]])))
        runs = list(zip(edges[::2], edges[1::2], strict=True))  # [start, end) of each inked column run
        if len(runs) != len(answer):
            lo, hi = xs.min(), xs.max() + 1
            step = (hi - lo) / len(answer)
            runs = [(lo + i * step, lo + (i + 1) * step) for i in range(len(answer))]
        centres = [(x0 + (a + b) / 2, char) for (a, b), char in zip(runs, answer, strict=True)]
    row = min(gh - 1, int(cy * sy // PATCH_PX))
    is_code = family in CODE_FAMILIES
    for place, (cx, value) in enumerate(centres):
        token = row * gw + min(gw - 1, int(cx * sx // PATCH_PX))
        _mark(targets, token, value)
        if is_code:
            _mark(targets, token, f"glyph {place + 1}")
    return targets


def coarse_reading_targets(p: PoolItem) -> torch.Tensor:
    """What each merged token of ``p``'s coarse view lies on: (gh * gw, len(READ_CLASSES)) multi-hot, row-major, with
    only :data:`COARSE_READ_GROUPS` marked: the colour and kind of the coloured object (plate, large region, large
    frame's ring) that covers most of the token, if it covers at least its kind's share in :data:`_COARSE_COVER`.

    Found from the scene (every object's box on the canvas, scaled to the view), so it holds at any downscale. Why:
    a question names its plate by colour ("the blue frame"), and the attention Stage 1 distils can only find it there
    if the coarse tokens say which colour they lie on; phase 0 taught the tower colours on native cards only, and a
    linear probe then named the colour of only 53-69% of plates in the coarse view (docs/demo_model.md).
    """
    gh, gw = p.grid_hw
    scene = p.item.scene
    labels: list[tuple[str, str]] = [("", "")]  # index 0: nothing
    mask = Image.new("L", (gw * PATCH_PX, gh * PATCH_PX), 0)
    draw = ImageDraw.Draw(mask)

    def scaled(box: Sequence[int]) -> tuple[float, float, float, float]:
        x0, y0, x1, y1 = _scaled(box, scene.canvas, mask.size)
        return (x0, y0, x1 - 1, y1 - 1)  # PIL draws the right and bottom edges inclusive

    # Large objects first: a plate never overlaps them (a quadrant holds one object), but drawing order settles ties.
    for region in scene.regions:
        labels.append((region.colour, "region"))
        (draw.ellipse if region.ellipse else draw.rectangle)(scaled(region.box), fill=len(labels) - 1)
    for frame in scene.frames:
        labels.append((frame.colour, "frame"))
        width = max(1, round(frame.border * min(mask.width / scene.canvas[0], mask.height / scene.canvas[1])))
        draw.rectangle(scaled(frame.box), outline=len(labels) - 1, width=width)
    for plate in scene.plates:
        labels.append((plate.colour, "plate"))
        draw.rectangle(scaled(plate.box), fill=len(labels) - 1)
    ids = np.asarray(mask).reshape(gh, PATCH_PX, gw, PATCH_PX).transpose(0, 2, 1, 3).reshape(gh * gw, -1)
    # cover[t, k]: the share of token t's pixels that object k covers
    cover = np.stack([(ids == k).mean(axis=1) for k in range(len(labels))], axis=1)
    cover[:, 0] = 0.0
    best = cover.argmax(axis=1)
    targets = torch.zeros(gh * gw, len(READ_CLASSES))
    for token in np.flatnonzero(cover[np.arange(gh * gw), best] > 0):
        colour, kind = labels[best[token]]
        if cover[token, best[token]] < _COARSE_COVER[kind]:
            continue
        _mark(targets, int(token), f"on {colour}")
        _mark(targets, int(token), f"is {kind}")
    return targets


def answer_pointers(reading: torch.Tensor, answer: str, family: str) -> list[torch.Tensor]:
    """For each character of ``answer``, the tokens of one image (indices into ``reading``'s rows, as
    :func:`reading_targets` marks them) that show it: a code's ``i``-th glyph for its ``i``-th character, the token of
    the letter, shape or pattern for every character of a one-thing answer. Empty where the mark is missing (a glyph
    whose centre is off the image); no pointers for the families without a detail."""
    if family in CODE_FAMILIES:
        columns = [READ_CLASSES.index(f"glyph {i + 1}") for i in range(len(answer))]
    elif family in DETAIL_FAMILIES:
        columns = [READ_CLASSES.index(answer)] * len(answer)
    else:
        return []
    return [torch.nonzero(reading[:, column] > 0).flatten() for column in columns]


def target_tokens(block: ImageBlock, image_wh: tuple[int, int], box: Sequence[float]) -> torch.Tensor:
    """Sequence indices of the tokens of image ``block`` whose cells overlap ``box`` (pixels of that image)."""
    cells = _grid_box_around(box, block.grid_hw, image_wh, None)
    rows, cols = torch.arange(cells.y0, cells.y1), torch.arange(cells.x0, cells.x1)
    return block.start + (rows[:, None] * block.grid_hw[1] + cols[None, :]).reshape(-1)


def _scaled(box: Sequence[int], src_wh: tuple[int, int], dst_wh: tuple[int, int]) -> tuple[float, ...]:
    sx, sy = dst_wh[0] / src_wh[0], dst_wh[1] / src_wh[1]
    return (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)


# Crops hold the detail's ink box grown by this much (within the card): another answer drawn on the plate (a wider
# letter, a code of other glyphs) inks a few pixels more or less than the scene's own.
_DETAIL_MARGIN = 8


class ExampleBuilder:
    """Builds teacher-forced examples with the engine's own prompt, splice and positions."""

    def __init__(self, engine: QZoomEngine, min_pixels: int, max_pixels: int, decoy_frac: float = 0.0) -> None:
        self.engine = engine
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.decoy_frac = decoy_frac  # share of :meth:`make`'s fused examples with a decoy crop (where there is one)
        self.options = AskOptions(min_pixels=min_pixels, max_pixels=max_pixels)
        tok = engine.processor.tokenizer
        self.tokenizer = tok
        self.end_id = int(tok.convert_tokens_to_ids("<|im_end|>"))
        self.hidden = int(engine.model.config.text_config.hidden_size)
        self.merge = int(engine.model.config.vision_config.spatial_merge_size)

    def _state(self, image: Image.Image, question: str) -> SequenceState:
        """prepare + layout: ids, positions and image blocks, no weights, no ViT or decoder layer.

        ``image`` may be the coarse view instead of the canvas: it has the same grid, which is all that matters here.
        The embeddings are a zero placeholder that ``engine.splice`` cuts and joins like real ones; the training step
        embeds the ids itself.
        """
        st = self.engine.new_state(image, question, self.options)
        st.digest = "training"  # no cache is consulted; skips hashing the pixels
        self.engine.prepare([st])
        self.engine.layout([st])
        st.embeds = torch.zeros(int(st.input_ids.shape[0]), self.hidden)
        return st

    def _finish(
        self,
        st: SequenceState,
        answer: str,
        pixels: list[torch.Tensor],
        grids: list[torch.Tensor],
        family: str,
        view: View,
    ) -> Example:
        answer_ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"] + [self.end_id]
        n_prompt = int(st.input_ids.shape[0])
        ids = torch.cat([st.input_ids, torch.tensor(answer_ids, dtype=torch.long)])
        # Text after the prompt advances all three M-RoPE axes together, one per token (as decoding does).
        last = st.positions[:, -1:].clone()
        tail = last + torch.arange(1, len(answer_ids) + 1, dtype=torch.float32)[None, :]
        positions = torch.cat([st.positions.clone(), tail], dim=1)
        labels = torch.full_like(ids, -100)
        labels[n_prompt:] = ids[n_prompt:]
        return Example(ids, positions, labels, pixels, grids, family, view, referent=referent_of(st.query))

    @staticmethod
    def _point(example: Example, start: int, reading: torch.Tensor, answer: str) -> None:
        """Set ``example.pointer`` from ``reading`` (the marks of the image whose first token is at ``start``): the
        position that predicts answer character ``j`` (one byte token each) points at the tokens showing it."""
        first = int(torch.nonzero(example.labels != -100)[0, 0])  # the first answer token
        example.pointer = [
            (first - 1 + j, start + tokens)
            for j, tokens in enumerate(answer_pointers(reading, answer, example.family))
            if tokens.numel()
        ]

    def drill(
        self, image: Image.Image, question: str, answer: str, family: str, box: tuple[int, int, int, int]
    ) -> Example:
        """An :func:`answer_drill` example: the asked-about plate (``box``) marked for grounding, and its detail's
        tokens for the pointer loss (found from the drill's ink; the border is at most 6 px, the detail further in)."""
        example = self.single(image, question, answer, family, "crop", box)
        grid = example.grids[0]
        grid_hw = (int(grid[1]) // self.merge, int(grid[2]) // self.merge)
        reading = reading_targets(image, box, _DRILL_BORDER_MAX, family, answer, grid_hw, None)
        start = int(torch.nonzero(example.input_ids == self.engine.image_token_id)[0, 0])
        self._point(example, start, reading, answer)
        return example

    def pooled_view(
        self, p: PoolItem, which: Literal["coarse", "zoom", "decoy"]
    ) -> tuple[torch.Tensor, torch.Tensor, str]:
        """Pixels, grid and feature key of a pooled item's coarse view, fixed zoom crop or decoy crop (processed once
        per item)."""
        if which not in p.pixels:
            fixed = {"coarse": (p.coarse, None), "zoom": p.zoom, "decoy": p.decoy}[which]
            if fixed is None:
                raise ValueError(f"item {p.item.uid} has no {which} crop (a detail item's crops are drawn afresh)")
            image = fixed[0]
            p.pixels[which] = self.engine._preprocess(image, self.min_pixels, self.max_pixels)
        pixels, grid = p.pixels[which]
        return pixels, grid, f"{p.item.uid}:{which}"

    def single(
        self,
        image: Image.Image,
        question: str,
        answer: str,
        family: str,
        view: View,
        box: Sequence[float] | None = None,
        pooled: tuple[torch.Tensor, torch.Tensor, str] | None = None,
    ) -> Example:
        """One image (a crop, or the coarse view) and the question; ``box``: the target in the image's pixels;
        ``pooled``: the image's pixels, grid and feature key from :meth:`pooled_view` (else it is processed here)."""
        st = self._state(image, question)
        if pooled is None:
            pixels, grid = self.engine._preprocess(image, self.min_pixels, self.max_pixels)
            key = None
        else:
            pixels, grid, key = pooled
        example = self._finish(st, answer, [pixels], [grid], family, view)
        example.image_keys = [key]
        if box is not None:
            example.target = target_tokens(st.blocks[0], image.size, box)
        return example

    def coarse(self, p: PoolItem) -> Example:
        """The coarse view and the question; detail items mark their target for the grounding loss."""
        item = p.item
        box = _scaled(item.box, item.canvas, p.coarse.size) if item.needs_detail else None
        pooled = self.pooled_view(p, "coarse")
        return self.single(p.coarse, item.question, item.answer, item.family, "coarse", box, pooled)

    def zoom_view(
        self, p: PoolItem, rng: random.Random | None, answer: str | None = None
    ) -> tuple[Image.Image, roi.GridBox, roi.PixelBox, torch.Tensor, torch.Tensor, str | None]:
        """What a zoom step on ``p``'s target shows: the crop of the coarse cells covering it (grown by up to a cell
        per side with ``rng``; ``answer`` drawn on the target), its grid and pixel boxes, its processed pixels and
        grid, and its feature key (a pooled item's fixed zoom crop) or None."""
        item = p.item
        crop_key: str | None = None
        if p.zoom is not None:
            crop, grid_box = p.zoom
            crop_pixels, crop_grid, crop_key = self.pooled_view(p, "zoom")
        else:
            grid_box = _grid_box_around(item.box, p.grid_hw, item.canvas, rng)
            box = roi.grid_box_to_pixels(grid_box, p.grid_hw, item.canvas, min_side=MIN_BOX_SIDE).as_list()
            crop = crop_with_answer(item, box, answer, origin=p.origin)
            crop_pixels, crop_grid = self.engine._preprocess(crop, self.min_pixels, self.max_pixels)
        pixel_box = roi.grid_box_to_pixels(grid_box, p.grid_hw, item.canvas, min_side=MIN_BOX_SIDE)
        return crop, grid_box, pixel_box, crop_pixels, crop_grid, crop_key

    def zoom_reading(
        self, p: PoolItem, crop: Image.Image, pixel_box: roi.PixelBox, crop_grid: torch.Tensor, answer: str
    ) -> torch.Tensor | None:
        """:func:`reading_targets` of a :meth:`zoom_view` crop showing ``answer`` (no colour marks), or None when
        ``p`` has no target plate."""
        scene = p.item.scene
        if scene.target is None:
            return None
        plate = scene.plates[scene.target]
        x0, y0, x1, y1 = plate.box
        plate_box = (x0 - pixel_box.x0, y0 - pixel_box.y0, x1 - pixel_box.x0, y1 - pixel_box.y0)
        grid_hw = (int(crop_grid[1]) // self.merge, int(crop_grid[2]) // self.merge)
        return reading_targets(crop, plate_box, plate.border, p.item.family, answer, grid_hw, None)

    def fused(
        self, p: PoolItem, rng: random.Random | None, answer: str | None = None, decoy_first: bool | None = None
    ) -> Example:
        """The coarse view with a native crop spliced after it, exactly as a zoom step does (``engine.splice``).

        With ``decoy_first`` set (True or False) and ``p.decoy``, the zoom step proposed two boxes: the target's and a
        look-alike's (the decoy first or second), as the demo model's SD-RPN does when its map lights both; the
        grounding and pointer targets stay on the target's crop, so the decoder learns to read the crop that the
        question names and to pass over the other."""
        item = p.item
        st = self._state(p.coarse, item.question)
        block = st.blocks[0]
        crop, grid_box, pixel_box, crop_pixels, crop_grid, crop_key = self.zoom_view(p, rng, answer)
        views = [(grid_box, pixel_box, crop_pixels, crop_grid, crop_key)]
        aim = 0  # the target's view among them (its block is the one after the coarse view's and any before it)
        if decoy_first is not None and p.decoy is not None:
            decoy_pixels, decoy_grid, decoy_key = self.pooled_view(p, "decoy")
            decoy_box = roi.grid_box_to_pixels(p.decoy[1], p.grid_hw, item.canvas, min_side=MIN_BOX_SIDE)
            aim = 1 if decoy_first else 0
            views.insert(1 - aim, (p.decoy[1], decoy_box, decoy_pixels, decoy_grid, decoy_key))
        empty = torch.empty(0)
        self.engine.splice(
            st,
            Proposal(block, empty, empty, [v[0] for v in views], [v[1] for v in views]),
            [(torch.zeros(int(v[3].prod()) // self.merge**2, self.hidden), v[3]) for v in views],
        )
        coarse_pixels, coarse_grid, coarse_key = self.pooled_view(p, "coarse")
        shown = answer or item.answer
        pixels = [coarse_pixels, *(v[2] for v in views)]
        example = self._finish(st, shown, pixels, [coarse_grid, *(v[3] for v in views)], item.family, "fused")
        example.image_keys = [coarse_key, *(v[4] for v in views)]
        if item.needs_detail:  # the target's coarse cells, and the whole crop (a zoom on it)
            zoomed = st.blocks[1 + aim]
            coarse_cells = target_tokens(block, item.canvas, item.box)
            example.target = torch.cat([coarse_cells, torch.arange(zoomed.start, zoomed.end)])
            reading = self.zoom_reading(p, crop, pixel_box, crop_grid, shown)
            if reading is not None:
                self._point(example, zoomed.start, reading, shown)
        return example

    def crop(
        self, p: PoolItem, side: int, rng: random.Random | None, answer: str | None = None, zoom: float = 1.0
    ) -> Example:
        """A crop of about ``side`` px containing the target's detail (at a random offset with ``rng``), alone: native,
        or ``zoom`` > 1 times as much of the canvas resized down to the side (bicubic, as the processor resizes a zoom
        box larger than the budget).

        The crop holds the detail with a margin of :data:`_DETAIL_MARGIN` px (any answer drawn there fits), not the
        whole card, which is up to 396 px a side. The side is snapped to a multiple of the 28 px token, and grown to
        one that holds the detail (a crop narrower than it would grow to its odd size), so the processor does not
        resample a native crop: 1-px patterns reach the ViT intact (fused examples show the resampled crops of real
        boxes).
        """
        item = p.item
        px0, py0, px1, py1 = item.box
        cx0, cy0, cx1, cy1 = item.content_box
        m = _DETAIL_MARGIN
        detail = (max(px0, cx0 - m), max(py0, cy0 - m), min(px1, cx1 + m), min(py1, cy1 + m))
        detail_side = max(detail[2] - detail[0], detail[3] - detail[1])
        side = max(2 * PATCH_PX, PATCH_PX * math.ceil(detail_side / zoom / PATCH_PX), PATCH_PX * round(side / PATCH_PX))
        box = crop_box_around(item, max(detail_side, round(side * zoom)), rng=rng, around=detail)
        image = crop_with_answer(item, box, answer, origin=p.origin)
        plate = item.scene.plates[item.scene.target] if item.scene.target is not None else None
        if image.size != (side, side):  # zoomed out (or clamped at the canvas's edge): to the side the model sees
            image = image.resize((side, side), Image.Resampling.BICUBIC)
        f = side / (box[2] - box[0])
        x0, y0, x1, y1 = item.box
        plate_box = (
            round((x0 - box[0]) * f),
            round((y0 - box[1]) * f),
            round((x1 - box[0]) * f),
            round((y1 - box[1]) * f),
        )
        example = self.single(image, item.question, answer or item.answer, item.family, "crop", plate_box)
        if plate is not None:
            grid = example.grids[0]
            example.reading = reading_targets(
                image,
                plate_box,
                max(1, round(plate.border * f)),
                item.family,
                answer or item.answer,
                (int(grid[1]) // self.merge, int(grid[2]) // self.merge),
                plate.colour,
            )
            start = int(torch.nonzero(example.input_ids == self.engine.image_token_id)[0, 0])
            self._point(example, start, example.reading, answer or item.answer)
        return example

    def make(
        self, p: PoolItem, view: View, rng: random.Random, crop_range: tuple[int, int], zoom: float = 1.0
    ) -> Example:
        """An example of ``view``; detail crops show a fresh random answer drawn on the target, ``zoom`` times
        downscaled (at most to the largest crop of ``crop_range``, the reach of a pooled item)."""
        answer = _fresh_answer(p.item, rng)
        if view == "fused":
            # `decoy_frac > 0` first: at 0 the draws are the ones made before decoys existed (r12's stream).
            decoy = self.decoy_frac > 0 and p.decoy is not None and rng.random() < self.decoy_frac
            return self.fused(p, rng, answer, decoy_first=rng.random() < 0.5 if decoy else None)
        if view == "coarse":
            return self.coarse(p)
        side = rng.randint(*crop_range)
        return self.crop(p, side, rng, answer, min(zoom, crop_range[1] / side))


def _zoom(rng: random.Random, frac: float, zoom_max: float) -> float:
    """1 (native scale), or with probability ``frac`` a downscale factor drawn from ``1 .. zoom_max``."""
    return rng.uniform(1.0, zoom_max) if rng.random() < frac else 1.0


def _fresh_answer(item: SyntheticItem, rng: random.Random) -> str | None:
    """A random answer of the item's detail family, different from the other plates' (None for coarse families).

    Drawing it on the target plate turns one rendered scene into many examples: rendering costs tens of
    milliseconds, redrawing one plate in a crop a fraction of one.
    """
    if item.family not in DETAIL_FAMILIES or item.scene.target is None:
        return None
    others = {p.value for i, p in enumerate(item.scene.plates) if i != item.scene.target}
    while True:
        answer = rng.choice(ANSWER_VOCAB[item.family])
        if answer not in others:
            return answer


def collate(examples: Sequence[Example], pad_id: int, merge: int = 2) -> dict[str, torch.Tensor]:
    """Right-padded batch for the stock forward; images in sequence order (the order their tokens are filled)."""
    n = max(int(e.input_ids.shape[0]) for e in examples)
    b = len(examples)
    ids = torch.full((b, n), pad_id, dtype=torch.long)
    labels = torch.full((b, n), -100, dtype=torch.long)
    mask = torch.zeros((b, n), dtype=torch.long)
    positions = torch.zeros((3, b, n), dtype=torch.float32)
    ground = torch.zeros((b, n), dtype=torch.bool)  # the target's image tokens (grounding loss)
    pointer = torch.zeros((b, n, n), dtype=torch.bool)  # [i, row, token]: row's answer character is shown at token
    for i, e in enumerate(examples):
        m = int(e.input_ids.shape[0])
        if e.target is not None:
            ground[i, e.target] = True
        for row, tokens in e.pointer or ():
            pointer[i, row, tokens] = True
        ids[i, :m] = e.input_ids
        labels[i, :m] = e.labels
        mask[i, :m] = 1
        positions[:, i, :m] = e.positions
    # Reading targets per merged token of every image, in the order the vision tower returns them; a mask keeps the
    # images that have none (coarse views, fused sequences).
    reading, read_mask = [], []
    for e in examples:
        for i, g in enumerate(e.grids):
            n_tokens = int(g.prod()) // merge**2
            target = e.reading if i == 0 else None  # a crop example's one image
            reading.append(target if target is not None else torch.zeros(n_tokens, len(READ_CLASSES)))
            read_mask.append(torch.full((n_tokens,), target is not None))
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "position_ids": positions,
        "pixel_values": torch.cat([p for e in examples for p in e.pixel_values]),
        "image_grid_thw": torch.stack([g for e in examples for g in e.grids]),
        "reading": torch.cat(reading),
        "reading_mask": torch.cat(read_mask),
        "ground": ground,
        "pointer": pointer,
        "referent": torch.tensor([-100 if e.referent is None else e.referent for e in examples], dtype=torch.long),
        "answer_weight": torch.tensor([e.answer_weight for e in examples], dtype=torch.float32),
    }


MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "pixel_values", "image_grid_thw")


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The part of a :func:`collate` batch that the stock forward takes."""
    return {name: batch[name] for name in MODEL_INPUTS}


def image_keys(examples: Sequence[Example]) -> list[str | None]:
    """The feature keys of every image of a :func:`collate` batch of ``examples``, in the batch's image order."""
    return [key for e in examples for key in (e.image_keys or [None] * len(e.pixel_values))]


class ItemPool:
    """A rolling pool of train-split items, refreshed a few at a time (rendering costs ~60 ms an item).

    The next ``prefetch`` items are rendered ahead on a worker thread (Pillow and numpy release the GIL while they
    draw and resize), so rendering overlaps the training step. Items are rendered by index and taken in index order:
    the pool's contents do not depend on the thread's timing.
    """

    def __init__(
        self,
        recipe: BaseRecipe,
        families: Sequence[str],
        start: int,
        desc: str,
        progress: bool = True,
        sides: tuple[int, int] = (896, 4096),
        prefetch: int = 2,
    ) -> None:
        self.recipe = recipe
        self.families = tuple(families)
        self.sides = sides
        self.next_index = start  # the index of the next item to render
        self.prefetch = prefetch
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qzoom-render") if prefetch else None
        self._ahead: deque[Future[PoolItem]] = deque()
        self.items = [self._new() for _ in tqdm(range(recipe.pool_size), desc=desc, disable=not progress, leave=False)]
        self.cursor = 0

    def _render(self, index: int) -> PoolItem:
        r = self.recipe
        item = generate_item(
            "train", index, seed=r.seed, families=self.families, min_side=self.sides[0], max_side=self.sides[1]
        )
        return pool_item(item, r.min_pixels, r.max_pixels, reach=r.crop_max, decoy=r.fused_decoy_frac > 0)

    def _new(self) -> PoolItem:
        if self._worker is None:
            self.next_index += 1
            return self._render(self.next_index - 1)
        while len(self._ahead) <= self.prefetch:
            self._ahead.append(self._worker.submit(self._render, self.next_index))
            self.next_index += 1
        return self._ahead.popleft().result()

    def refresh(self, count: int) -> None:
        for _ in range(count):
            self.items[self.cursor] = self._new()
            self.cursor = (self.cursor + 1) % len(self.items)

    def close(self) -> None:
        """Stop the worker thread; the items rendered ahead and not taken are dropped."""
        if self._worker is not None:
            self._worker.shutdown(wait=False, cancel_futures=True)
            self._ahead.clear()


_DRILL_KINDS: tuple[PlateKind, ...] = ("code", "code", "letter", "shape", "pattern")  # reading and answer drills
_DRILL_BORDER_MAX = 6  # an answer drill's plate border (its detail starts 5-9 px further in)


def reading_drill(rng: random.Random, side: int, zoom: float = 1.0) -> tuple[Image.Image, torch.Tensor]:
    """A ``side`` x ``side`` px image (a multiple of 28) of one plate detail drawn as on a plate, at a random
    sub-pixel-free offset (codes may run off an edge), on the card of a plate of a random colour, sometimes beside
    its border (a band of the colour along one edge); and its reading targets as :func:`reading_targets` marks them
    (each glyph, shape or pattern on the token holding its centre, with its place in a code; glyphs whose centre is
    off the image are not marked; every token with the card's colour). ``zoom`` > 1 draws the drill ``zoom`` times
    larger and downscales it to ``side`` (bicubic, as the processor resizes a zoom box larger than the budget).

    Why: a ViT with 14 px patches learns a glyph separately at every offset inside a patch, so it needs many samples;
    these cost a fraction of a benchmark crop (4-9 tokens, no scene to render), so phase 0 sees several times more.
    The downscaled ones are what a zoom box of several coarse cells on a large canvas shows (up to about 2x).
    """
    kind = rng.choice(_DRILL_KINDS)
    colour = rng.choice(tuple(COLOURS))
    detail, centres = render_detail(kind, detail_value(rng, kind), detail_size(rng, kind), colour)
    big = round(side * zoom)
    image = Image.new("RGB", (big, big), plate_fill(colour))  # (a pattern's tile is ink at its corner)
    if rng.random() < 0.5:  # the plate's border along one edge, as near its rim
        band = rng.randint(3, 12)
        edge = rng.randrange(4)
        box = [(0, 0, band, big), (big - band, 0, big, big), (0, 0, big, band), (0, big - band, big, big)][edge]
        image.paste(COLOURS[colour], box)
    fits_x = big - detail.width
    x = rng.randint(min(0, fits_x), max(0, fits_x)) if kind == "code" else rng.randint(0, max(0, fits_x))
    y = rng.randint(0, max(0, big - detail.height))
    image.paste(detail, (x, y))
    if big != side:
        image = image.resize((side, side), Image.Resampling.BICUBIC)
    g = side // PATCH_PX
    targets = torch.zeros(g * g, len(READ_CLASSES))
    targets[:, READ_CLASSES.index(f"on {colour}")] = 1.0  # the whole image is the card (a band is under 14 px)
    targets[:, READ_CLASSES.index("is plate")] = 1.0
    for place, (cx, cy, name) in enumerate(centres):
        px, py = (x + cx) * side / big, (y + cy) * side / big
        if 0 <= px < side and 0 <= py < side:
            token = int(py // PATCH_PX) * g + int(px // PATCH_PX)
            _mark(targets, token, name)
            if kind == "code":
                _mark(targets, token, f"glyph {place + 1}")
    return image, targets


def answer_drill(
    rng: random.Random, pair_frac: float, position_frac: float = 0.0
) -> tuple[Image.Image, str, str, str, tuple[int, int, int, int]]:
    """A small image (a multiple of 28 px a side) of one plate, or with probability ``pair_frac`` two plates of
    different colours showing different details of one kind, side by side or stacked, drawn as in a scene at
    native scale on a flat grey ground with a margin of 2-28 px; the question its family asks about the first plate
    (by colour), the answer, the family, and that plate's box. A pair of codes is, with probability
    ``position_frac``, two plates in different quadrants of the image instead, the first named by its quadrant
    (the ``code_at`` question).

    Why: the decoder learns to map the tower's glyph tokens to answer characters, in a code's order, and to pick a
    plate by its colour or quadrant, on sequences of 8-50 image tokens, several times cheaper than a benchmark crop.
    """
    kind = rng.choice(_DRILL_KINDS)
    n = 2 if rng.random() < pair_frac else 1
    colours = rng.sample(tuple(COLOURS), n)
    values: list[str] = []
    while len(values) < n:
        value = detail_value(rng, kind)
        if value not in values:
            values.append(value)
    plates = [
        render_plate(
            kind, value, detail_size(rng, kind), colour, border=rng.randint(3, _DRILL_BORDER_MAX), pad=rng.randint(5, 9)
        )
        for value, colour in zip(values, colours, strict=True)
    ]
    # `position_frac > 0` first: at 0 the draws are the ones made before quadrant pairs existed (r12's stream).
    if position_frac > 0 and n == 2 and kind == "code" and rng.random() < position_frac:
        return _quadrant_drill(rng, plates, values[0])
    order = list(range(n))
    rng.shuffle(order)  # the asked-about plate comes first or second
    gap = rng.randint(4, 28)
    side_by_side = rng.random() < 0.5
    if side_by_side:
        content = (sum(p.width for p in plates) + gap * (n - 1), max(p.height for p in plates))
    else:
        content = (max(p.width for p in plates), sum(p.height for p in plates) + gap * (n - 1))
    w = PATCH_PX * math.ceil((content[0] + rng.randint(4, 56)) / PATCH_PX)
    h = PATCH_PX * math.ceil((content[1] + rng.randint(4, 56)) / PATCH_PX)
    grey = rng.randint(120, 200)
    image = Image.new("RGB", (w, h), (grey, grey, grey))
    x, y = rng.randint(0, w - content[0]), rng.randint(0, h - content[1])
    box = (0, 0, 0, 0)
    for i in order:
        image.paste(plates[i], (x, y))
        if i == 0:
            box = (x, y, x + plates[i].width, y + plates[i].height)
        if side_by_side:
            x += plates[i].width + gap
        else:
            y += plates[i].height + gap
    return image, TEMPLATES[kind].format(colour=colours[0]), values[0], kind, box


def _quadrant_drill(
    rng: random.Random, plates: Sequence[Image.Image], answer: str
) -> tuple[Image.Image, str, str, str, tuple[int, int, int, int]]:
    """:func:`answer_drill`'s quadrant pair: the image split in four equal cells (each a multiple of 28 px, large
    enough for either plate), the two plates at random places inside two different cells, the question naming the
    first plate's quadrant as the benchmark's ``code_at`` does (quadrant q = 2 * row + column)."""
    cell_w = PATCH_PX * math.ceil((max(p.width for p in plates) + rng.randint(4, 28)) / PATCH_PX)
    cell_h = PATCH_PX * math.ceil((max(p.height for p in plates) + rng.randint(4, 28)) / PATCH_PX)
    grey = rng.randint(120, 200)
    image = Image.new("RGB", (2 * cell_w, 2 * cell_h), (grey, grey, grey))
    quadrants = rng.sample(range(4), 2)
    box = (0, 0, 0, 0)
    for i, (plate, q) in enumerate(zip(plates, quadrants, strict=True)):
        x = (q % 2) * cell_w + rng.randint(0, cell_w - plate.width)
        y = (q // 2) * cell_h + rng.randint(0, cell_h - plate.height)
        image.paste(plate, (x, y))
        if i == 0:
            box = (x, y, x + plate.width, y + plate.height)
    return image, TEMPLATES["code_at"].format(position=POSITIONS[quadrants[0]]), answer, "code_at", box


def referent_drill(rng: random.Random) -> tuple[Image.Image, str, str, str]:
    """A blank 56 px image of a random grey and a detail family's question naming a random colour or quadrant, with a
    random answer of the family (the referent phase trains on the question's words alone; its answer loss is off).

    Why: a sequence of 4 image tokens costs a fiftieth of a coarse view, and on it the layers below K learn in about
    50 steps to carry the question's colour or quadrant word to the answer positions, which among 256 image tokens
    they had not learned after 400 steps (``BaseRecipe.referent_steps``).
    """
    family = rng.choice(sorted(DETAIL_FAMILIES))
    question = TEMPLATES[family].format(colour=rng.choice(tuple(COLOURS)), position=rng.choice(POSITIONS))
    grey = rng.randint(110, 210)
    image = Image.new("RGB", (2 * PATCH_PX, 2 * PATCH_PX), (grey, grey, grey))
    return image, question, rng.choice(ANSWER_VOCAB[family]), family


def iter_batches(examples: Sequence[Example], size: int) -> Iterator[Sequence[Example]]:
    for i in range(0, len(examples), size):
        yield examples[i : i + size]
