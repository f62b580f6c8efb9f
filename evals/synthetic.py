"""The synthetic high-res benchmark: seeded scenes where a small budget fails on detail and a zoomed crop succeeds.

Contract:

* :func:`generate_item` is a pure function of ``(split, index, seed, families, min_side, max_side)``: same arguments,
  same pixels, question, answer and box, on every machine with the pinned Pillow and numpy. Nothing is stored; items
  are drawn on the fly. ``split`` is one of :data:`SPLITS`; each ``(split, seed)`` pair is its own random stream
  (the split name, the seed and the index are hashed together), so train, val and test never share a draw.
* Families are assigned round-robin over ``families`` (``index % len(families)``), so any ``n`` consecutive items
  are balanced. :data:`DETAIL_FAMILIES` need the detail (``needs_detail=True``); :data:`COARSE_FAMILIES` are answered
  by the coarse view (the gate's negatives). Questions come from :data:`TEMPLATES`, answers from
  :data:`ANSWER_VOCAB` (closed, small; every answer character is in :data:`ANSWER_CHARS`).
* Every scene is laid out on the four quadrants of a canvas of ``min_side..max_side`` pixels a side (aspect at most
  :data:`MAX_ASPECT`) over a textured, speckled, low-chroma background. A quadrant holds at most one of: a *plate* (a
  light card tinted with its colour, :data:`_PLATE_COARSE_PX` coarse pixels a side or more, a border of the colour,
  and one small detail centred in it: a code, a letter, a shape or a 1-px pattern), a *large region* (a filled
  rectangle or ellipse) or a *large frame* (a hollow thick rectangle). Every coloured object in an image has its own
  colour from :data:`COLOURS`, so "the red frame" names exactly one object. Grey clutter (codes and shapes outside any
  object) is the distractor that is not in a frame.
* Detail questions name the target plate by colour (or by quadrant for ``code_at``); the other plates carry
  different answers of the same kind. ``box`` is the target plate's outer box; ``content_box`` the ink of the answer.
  Coarse questions: ``box`` is the large region, or the union of the counted large frames.
* Boxes are ``(x0, y0, x1, y1)`` integer pixels of the original image, x1/y1 exclusive.

Why detail is lost in the coarse view (checked without a model in ``tests/test_synthetic.py``): the coarse view is the
whole image resized to :data:`COARSE_TOKENS` merged tokens of :data:`PATCH_PX` pixels (448x448 for a square), a
downscale of 2x at 896 px and 9x at 4096 px (median about 5.5x; under 4x for about a fifth of the canvases). The
detail has a fixed native size (glyphs 20-27 px tall on a 28 px pitch, shapes on 26-34 px tiles, patterns of 18-26 px)
while plates (1.6 coarse tokens a side, borders of about 3 coarse pixels), large regions and large frames scale with
the canvas, so "where" and the coarse answers survive the downscale and "what" does not. The patterns are 1-px, 50 %
duty and share one mean, so they cancel under any >= 2x antialiased downscale; the shapes have equal ink area, so they
leave blobs of the same weight; text and shapes keep a blurred residue that shrinks with the factor (legible up to
about 4x). A native crop keeps everything.

Scoring: :func:`normalize_answer` / :func:`exact_match` (lower case, number words to digits, a leading article and
everything that is not a letter or digit dropped); :func:`box_contains_center` for proposed zoom boxes.
:func:`crop_around` gives native-resolution crops around the target for a crop-first curriculum, and
:func:`coarse_view` the small-budget view with the Qwen2-VL resize rule. :func:`export` writes a set to disk.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import math
import random
import re
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from qzoom.tools.frames import resized_wh

__all__ = [
    "ANSWER_CHARS",
    "ANSWER_VOCAB",
    "COARSE_FAMILIES",
    "COARSE_TOKENS",
    "CODE_ALPHABET",
    "CODE_FAMILIES",
    "CODE_LENGTH",
    "COLOURS",
    "COUNTS",
    "DETAIL_FAMILIES",
    "FAMILIES",
    "GENERATOR_VERSION",
    "LETTERS",
    "MAX_ASPECT",
    "PATCH_PX",
    "PATTERNS",
    "POSITIONS",
    "SHAPES",
    "SPLITS",
    "TEMPLATES",
    "Box",
    "Clutter",
    "LargeFrame",
    "LargeRegion",
    "Plate",
    "PlateKind",
    "Scene",
    "SyntheticItem",
    "box_contains",
    "box_contains_center",
    "coarse_size",
    "coarse_view",
    "crop_around",
    "crop_box_around",
    "crop_with_answer",
    "detail_size",
    "detail_value",
    "exact_match",
    "export",
    "generate_item",
    "iterate",
    "normalize_answer",
    "plate_fill",
    "render_detail",
    "render_plate",
    "render_scene",
    "with_answer",
]

Box = tuple[int, int, int, int]
RGB = tuple[int, int, int]
PlateKind = Literal["code", "letter", "shape", "pattern"]

# Bump when the drawing changes, so that a stored export can be told apart from a new one; it also salts the RNG.
# 2: details twice as large (a from-scratch ViT learns them, see _FONT_SIZES); 3: text on a fixed pitch (_pitch);
# 4: plate cards tinted with their colour (plate_fill); 5: plates a fixed size at coarse scale (_PLATE_COARSE_PX), the
# tint stronger.
GENERATOR_VERSION = 5

SPLITS = ("train", "val", "test")
FAMILIES = ("code", "code_at", "letter", "shape", "pattern", "colour", "count")
DETAIL_FAMILIES = frozenset({"code", "code_at", "letter", "shape", "pattern"})
COARSE_FAMILIES = frozenset({"colour", "count"})
CODE_FAMILIES = frozenset({"code", "code_at"})  # the detail families whose answer is a code of CODE_LENGTH glyphs

# Saturated and far apart in hue, so a 2-3 px border at coarse scale still names its colour; the background is
# low-chroma so that no colour word could refer to it.
COLOURS: Mapping[str, RGB] = {
    "red": (220, 35, 35),
    "green": (30, 160, 60),
    "blue": (35, 75, 225),
    "yellow": (240, 205, 20),
    "purple": (145, 50, 200),
    "orange": (250, 125, 15),
}
POSITIONS = ("top left", "top right", "bottom left", "bottom right")  # quadrant q = 2 * row + column
# No look-alike pairs (0/O, 1/I, 5/S, 8/B, 6/G): a tiny model should fail for lack of pixels, not for ambiguity.
CODE_ALPHABET = "ACEHKPRTX234579"
CODE_LENGTH = 3
LETTERS = "ACEHKPRTX"
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
PATTERNS = ("horizontal", "vertical", "checker", "diagonal")
COUNTS = ("1", "2", "3", "4")

TEMPLATES: Mapping[str, str] = {
    "code": "What is the code in the {colour} frame?",
    "code_at": "What is the code in the {position} frame?",
    "letter": "What letter is in the {colour} frame?",
    "shape": "What shape is in the {colour} frame?",
    "pattern": "What pattern is in the {colour} frame?",
    "colour": "What colour is the large region?",
    "count": "How many large frames are there?",
}

_ALL_CODES = tuple("".join(chars) for chars in itertools.product(CODE_ALPHABET, repeat=CODE_LENGTH))
ANSWER_VOCAB: Mapping[str, tuple[str, ...]] = {
    "code": _ALL_CODES,
    "code_at": _ALL_CODES,
    "letter": tuple(LETTERS),
    "shape": SHAPES,
    "pattern": PATTERNS,
    "colour": tuple(COLOURS),
    "count": COUNTS,
}
ANSWER_CHARS = "".join(sorted({char for answers in ANSWER_VOCAB.values() for answer in answers for char in answer}))

# The coarse budget the benchmark is designed against: Qwen2.5-VL merged tokens of 28x28 px.
COARSE_TOKENS = 256
PATCH_PX = 28
MAX_ASPECT = 1.6
MIN_CANVAS_SIDE = 256

_INK: RGB = (22, 22, 26)
_PLATE_FILL: RGB = (238, 238, 234)
_PLATE_TINT = 0.4  # share of the plate's colour in its card's fill (see plate_fill)
# A plate's card is at least this many coarse pixels a side (1.6 merged tokens; 396 px at the 9x downscale of a
# 4096 px canvas), the detail centred in it. Why: with cards just around the detail (v4) a plate covered about one
# coarse token, and a linear probe on the coarse tokens over a plate named its colour on only 53% of plates, so no
# head could find "the red frame" in the coarse view; a card of 1.6 tokens covers at least 60% of some token wherever
# it lies. The card alone still fits the 256-token zoom budget natively (396 px < 448 px).
_PLATE_COARSE_PX = 44
# Aileron cap height 20-27 px, one glyph to one 28 px token (see _pitch): legible natively, a few coarse pixels at the
# median 5.5x downscale. Why not smaller: a ViT trained from scratch with 14 px patches learns a glyph at every
# sub-patch offset separately; at 10-13 px it was at 33% after 80 k isolated samples, at 20-27 px at 96% (a probe,
# numbers in docs/demo_model.md), and the demo model has 30 CPU minutes to learn.
_FONT_SIZES = (30, 32, 34, 36)
# What a detail family's plates show.
_PLATE_KIND: Mapping[str, PlateKind] = {
    "code": "code",
    "code_at": "code",
    "letter": "letter",
    "shape": "shape",
    "pattern": "pattern",
}


# ----------------------------------------------------------------------------------------------------------- scene


@dataclass(frozen=True)
class Plate:
    """A light card tinted with its colour (:func:`plate_fill`), a border of the colour, and one detail (the value)
    centred inside it; the card is :data:`_PLATE_COARSE_PX` coarse pixels a side or the detail's size, if larger."""

    quadrant: int
    colour: str
    kind: PlateKind
    value: str
    box: Box  # outer box, border included
    border: int
    size: int  # font size for text kinds, side of the shape / pattern square otherwise


@dataclass(frozen=True)
class LargeRegion:
    quadrant: int
    colour: str
    ellipse: bool
    box: Box


@dataclass(frozen=True)
class LargeFrame:
    quadrant: int
    colour: str
    box: Box
    border: int


@dataclass(frozen=True)
class Clutter:
    """A grey distractor outside every object: a code (text) or a shape."""

    kind: Literal["code", "shape"]
    value: str
    box: Box
    size: int
    grey: int


@dataclass(frozen=True)
class Scene:
    """Everything needed to redraw an item's image; :func:`render_scene` is a pure function of it."""

    canvas: tuple[int, int]
    background: Literal["blotches", "gradient", "flat"]
    background_seed: int
    tint: int
    plates: tuple[Plate, ...]
    regions: tuple[LargeRegion, ...]
    frames: tuple[LargeFrame, ...]
    clutter: tuple[Clutter, ...]
    target: int | None  # index into plates for detail families


@dataclass(frozen=True)
class SyntheticItem:
    """One benchmark item.

    ``box``: the target in original pixels (x1/y1 exclusive): the named plate for detail questions, the large region
    or the union of the counted large frames for coarse ones. ``needs_detail``: whether the coarse view is designed
    to fail on it. ``uid`` is unique for given generation options (``split-seed-index-family``).
    """

    uid: str
    image: Image.Image
    question: str
    answer: str
    box: Box
    needs_detail: bool
    family: str
    canvas: tuple[int, int]  # (width, height)
    content_box: Box  # the answer's ink for detail items (inside box); equal to box for coarse items
    split: str
    seed: int
    index: int
    scene: Scene


# ------------------------------------------------------------------------------------------------------ generation


def _rng_seed(split: str, seed: int, index: int) -> int:
    # sha256 rather than hash(): Python salts str hashes per process, and a stream must be the same everywhere.
    digest = hashlib.sha256(f"qzoom-synthetic/{GENERATOR_VERSION}/{split}/{seed}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _coarse_scale(width: int, height: int) -> float:
    """How many original pixels one coarse-view pixel covers (>= 1)."""
    return max(1.0, math.sqrt(width * height / (COARSE_TOKENS * PATCH_PX * PATCH_PX)))


def _quadrant_rect(quadrant: int, canvas: tuple[int, int]) -> Box:
    width, height = canvas
    col, row = quadrant % 2, quadrant // 2
    return (col * width // 2, row * height // 2, (col + 1) * width // 2, (row + 1) * height // 2)


def _place(rng: random.Random, rect: Box, size: tuple[int, int], margin: int) -> Box:
    """A box of ``size`` placed uniformly inside ``rect`` shrunk by ``margin`` (or centred when it cannot move)."""
    x0, y0, x1, y1 = rect
    w, h = size
    lo_x, hi_x = x0 + margin, x1 - margin - w
    lo_y, hi_y = y0 + margin, y1 - margin - h
    x = rng.randint(lo_x, hi_x) if hi_x >= lo_x else (x0 + x1 - w) // 2
    y = rng.randint(lo_y, hi_y) if hi_y >= lo_y else (y0 + y1 - h) // 2
    return (x, y, x + w, y + h)


@functools.lru_cache(maxsize=32)
def _font(size: int) -> ImageFont.FreeTypeFont:
    # Pillow's bundled scalable font (Aileron), never a system path. BASIC layout keeps glyph placement independent
    # of whether libraqm is installed.
    font = ImageFont.load_default(size=size)
    if not isinstance(font, ImageFont.FreeTypeFont):  # pragma: no cover - Pillow built without FreeType
        raise RuntimeError("Pillow was built without FreeType; the synthetic benchmark needs its scalable font")
    return font.font_variant(layout_engine=ImageFont.Layout.BASIC)


@functools.lru_cache(maxsize=32)
def _pitch(size: int) -> int:
    """The advance of every character of a string at font ``size``: one 28 px token, or the widest glyph and 1 px.

    Why fixed and this wide: at the font's own advance (17-25 px) two glyph centres of a code often fall in one
    merged token, whose feature then has to say which came first; one glyph per token (at native scale) leaves
    the decoder only to read the tokens left to right.
    """
    boxes = [_font(size).getbbox(char) for char in CODE_ALPHABET]
    return max(PATCH_PX, math.ceil(max(right - left for left, _, right, _ in boxes)) + 1)


@functools.lru_cache(maxsize=32)
def _text_slot(size: int, length: int) -> tuple[int, int]:
    """The (width, height) every string of ``length`` alphabet characters fits in, at font ``size``."""
    font = _font(size)
    top = min(font.getbbox(char)[1] for char in CODE_ALPHABET)
    bottom = max(font.getbbox(char)[3] for char in CODE_ALPHABET)
    return _pitch(size) * length, math.ceil(bottom - top)


def _content_size(kind: PlateKind, size: int) -> tuple[int, int]:
    if kind == "code":
        return _text_slot(size, CODE_LENGTH)
    if kind == "letter":
        return _text_slot(size, 1)
    return size, size


def detail_value(rng: random.Random, kind: PlateKind) -> str:
    """A random value (what the plate shows) of a plate's detail of ``kind``."""
    if kind == "code":
        return "".join(rng.choice(CODE_ALPHABET) for _ in range(CODE_LENGTH))
    if kind == "letter":
        return rng.choice(LETTERS)
    if kind == "shape":
        return rng.choice(SHAPES)
    return rng.choice(PATTERNS)


def detail_size(rng: random.Random, kind: PlateKind) -> int:
    """A random font size (codes, letters) or tile side (shapes, patterns) of a plate's detail."""
    if kind in ("code", "letter"):
        return rng.choice(_FONT_SIZES)
    if kind == "shape":
        return rng.randint(26, 34)
    return rng.randint(18, 26)


def _make_plate(
    rng: random.Random, kind: PlateKind, value: str, quadrant: int, colour: str, canvas: tuple[int, int]
) -> Plate:
    scale = _coarse_scale(*canvas)
    # The border is about 3 coarse pixels wide at every canvas size, so the plate's colour survives the coarse view.
    border = max(3, round(3.0 * scale))
    size = detail_size(rng, kind)
    content_w, content_h = _content_size(kind, size)
    pad = rng.randint(5, 9)
    card = round(_PLATE_COARSE_PX * scale)
    outer = (max(card, content_w + 2 * (pad + border)), max(card, content_h + 2 * (pad + border)))
    margin = round(0.05 * min(canvas))  # keeps the plate clearly inside its quadrant for the position words
    box = _place(rng, _quadrant_rect(quadrant, canvas), outer, margin)
    return Plate(quadrant=quadrant, colour=colour, kind=kind, value=value, box=box, border=border, size=size)


def _make_large(
    rng: random.Random, what: Literal["region", "frame"], quadrant: int, colour: str, canvas: tuple[int, int]
) -> LargeRegion | LargeFrame:
    rect = _quadrant_rect(quadrant, canvas)
    side = min(rect[2] - rect[0], rect[3] - rect[1])
    w = round(side * rng.uniform(0.55, 0.8))
    h = round(side * rng.uniform(0.55, 0.8))
    box = _place(rng, rect, (w, h), round(0.04 * side))
    if what == "region":
        return LargeRegion(quadrant=quadrant, colour=colour, ellipse=rng.random() < 0.4, box=box)
    return LargeFrame(
        quadrant=quadrant, colour=colour, box=box, border=max(4, round(min(w, h) * rng.uniform(0.06, 0.1)))
    )


def boxes_overlap(a: Sequence[int], b: Sequence[int], gap: int = 0) -> bool:
    """Whether boxes ``a`` and ``b`` (x0, y0, x1, y1; x1/y1 exclusive) overlap or come closer than ``gap``."""
    return a[0] < b[2] + gap and b[0] < a[2] + gap and a[1] < b[3] + gap and b[1] < a[3] + gap


def _make_clutter(rng: random.Random, canvas: tuple[int, int], taken: list[Box]) -> tuple[Clutter, ...]:
    width, height = canvas
    count = rng.randint(4, 6 + round(6 * width * height / 4096**2))
    gap = max(8, round(2.0 * _coarse_scale(*canvas)))
    out: list[Clutter] = []
    for _ in range(count):
        kind: Literal["code", "shape"] = "code" if rng.random() < 0.7 else "shape"
        if kind == "code":
            size = rng.randint(24, 38)
            length = rng.randint(2, 5)
            value = "".join(rng.choice(CODE_ALPHABET) for _ in range(length))
            w, h = _text_slot(size, length)
        else:
            size = rng.randint(24, 40)
            value = rng.choice(SHAPES)
            w = h = size
        for _attempt in range(20):
            x, y = rng.randint(gap, width - w - gap), rng.randint(gap, height - h - gap)
            box = (x, y, x + w, y + h)
            if not any(boxes_overlap(box, other, gap) for other in taken):
                taken.append(box)
                out.append(Clutter(kind=kind, value=value, box=box, size=size, grey=rng.randint(40, 95)))
                break
    return tuple(out)


def _canvas(rng: random.Random, min_side: int, max_side: int) -> tuple[int, int]:
    while True:
        width, height = rng.randint(min_side, max_side), rng.randint(min_side, max_side)
        if max(width, height) <= MAX_ASPECT * min(width, height):
            return width, height


def _scene_for(rng: random.Random, family: str, canvas: tuple[int, int]) -> tuple[Scene, str, str, Box]:
    """Lay out one scene; return it with the question, the answer and the target box."""
    colours = list(COLOURS)
    rng.shuffle(colours)
    quadrants = [0, 1, 2, 3]
    rng.shuffle(quadrants)
    plates: list[Plate] = []
    regions: list[LargeRegion] = []
    frames: list[LargeFrame] = []
    target: int | None = None

    def add_large(what: Literal["region", "frame"], quadrant: int) -> None:
        obj = _make_large(rng, what, quadrant, colours.pop(), canvas)
        if isinstance(obj, LargeRegion):
            regions.append(obj)
        else:
            frames.append(obj)

    if family in DETAIL_FAMILIES:
        kind = _PLATE_KIND[family]
        n_plates = rng.choice((2, 3, 3, 4, 4))
        values: list[str] = []
        while len(values) < n_plates:  # distinct answers: a reader that ignores the query is right by chance only
            value = detail_value(rng, kind)
            if value not in values:
                values.append(value)
        for value, quadrant in zip(values, quadrants[:n_plates], strict=True):
            plates.append(_make_plate(rng, kind, value, quadrant, colours.pop(), canvas))
        for quadrant in quadrants[n_plates:]:
            pick = rng.random()
            if pick < 0.35:
                add_large("region", quadrant)
            elif pick < 0.7:
                add_large("frame", quadrant)
        target = 0  # the first plate (the quadrant order is already shuffled)
        plate = plates[0]
        question = TEMPLATES[family].format(colour=plate.colour, position=POSITIONS[plate.quadrant])
        answer, box = plate.value, plate.box
    elif family == "colour":
        add_large("region", quadrants[0])
        for quadrant in quadrants[1:]:
            pick = rng.random()
            if pick < 0.55:
                plates.append(
                    _make_plate(
                        rng, rng.choice(("code", "letter", "shape", "pattern")), "", quadrant, colours.pop(), canvas
                    )
                )
            elif pick < 0.8:
                add_large("frame", quadrant)
        question, answer, box = TEMPLATES["colour"], regions[0].colour, regions[0].box
    elif family == "count":
        n_frames = int(rng.choice(COUNTS))
        for quadrant in quadrants[:n_frames]:
            add_large("frame", quadrant)
        for quadrant in quadrants[n_frames:]:
            pick = rng.random()
            if pick < 0.6:
                plates.append(
                    _make_plate(
                        rng, rng.choice(("code", "letter", "shape", "pattern")), "", quadrant, colours.pop(), canvas
                    )
                )
            elif pick < 0.85:
                add_large("region", quadrant)
        question, answer = TEMPLATES["count"], str(n_frames)
        box = (
            min(f.box[0] for f in frames),
            min(f.box[1] for f in frames),
            max(f.box[2] for f in frames),
            max(f.box[3] for f in frames),
        )
    else:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    # Plates of the coarse families carry a random detail too, so every plate in the benchmark looks alike.
    plates = [p if p.value else dataclasses.replace(p, value=detail_value(rng, p.kind)) for p in plates]
    taken = [p.box for p in plates] + [r.box for r in regions] + [f.box for f in frames]
    clutter = _make_clutter(rng, canvas, taken)
    background: Literal["blotches", "gradient", "flat"] = rng.choice(("blotches", "blotches", "gradient", "flat"))
    scene = Scene(
        canvas=canvas,
        background=background,
        background_seed=rng.getrandbits(63),
        tint=rng.randint(-10, 10),
        plates=tuple(plates),
        regions=tuple(regions),
        frames=tuple(frames),
        clutter=clutter,
        target=target,
    )
    return scene, question, answer, box


def _check_args(split: str, index: int, families: Sequence[str], min_side: int, max_side: int) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    if not families:
        raise ValueError("families must not be empty")
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown families {unknown}; expected a subset of {FAMILIES}")
    if not MIN_CANVAS_SIDE <= min_side <= max_side:
        raise ValueError(f"need {MIN_CANVAS_SIDE} <= min_side <= max_side, got {min_side} and {max_side}")


def generate_item(
    split: str,
    index: int,
    *,
    seed: int = 0,
    families: Sequence[str] | None = None,
    min_side: int = 896,
    max_side: int = 4096,
) -> SyntheticItem:
    """Item ``index`` of ``split``: a pure function of its arguments (see the module docstring).

    ``families`` restricts and orders the round-robin (default :data:`FAMILIES`); repeat a name to weight it, e.g.
    ``FAMILIES + ("colour", "count")`` for more gate negatives. ``min_side``/``max_side`` bound both canvas sides.
    """
    fams = tuple(FAMILIES if families is None else families)
    _check_args(split, index, fams, min_side, max_side)
    family = fams[index % len(fams)]
    rng = random.Random(_rng_seed(split, seed, index))
    canvas = _canvas(rng, min_side, max_side)
    scene, question, answer, box = _scene_for(rng, family, canvas)
    image, content_box = _render(scene)
    return SyntheticItem(
        uid=f"{split}-{seed}-{index:06d}-{family}",
        image=image,
        question=question,
        answer=answer,
        box=box,
        needs_detail=family in DETAIL_FAMILIES,
        family=family,
        canvas=canvas,
        content_box=content_box if content_box is not None else box,
        split=split,
        seed=seed,
        index=index,
        scene=scene,
    )


def iterate(
    split: str,
    n: int,
    *,
    seed: int = 0,
    start: int = 0,
    families: Sequence[str] | None = None,
    min_side: int = 896,
    max_side: int = 4096,
) -> Iterator[SyntheticItem]:
    """Items ``start .. start + n - 1`` of ``split``, each exactly :func:`generate_item` of its index."""
    for index in range(start, start + n):
        yield generate_item(split, index, seed=seed, families=families, min_side=min_side, max_side=max_side)


def with_answer(item: SyntheticItem, answer: str) -> SyntheticItem:
    """The same scene with the target plate showing ``answer`` instead: a counterfactual twin for tests and probes.

    Everything else (canvas, background, other plates, clutter, the box) is unchanged. Detail families only.
    """
    scene = item.scene
    if scene.target is None:
        raise ValueError(f"{item.family!r} items have no detail target to change")
    if answer not in ANSWER_VOCAB[item.family]:
        raise ValueError(f"{answer!r} is not an answer of family {item.family!r}")
    plates = list(scene.plates)
    plate = plates[scene.target] = dataclasses.replace(plates[scene.target], value=answer)
    # Plates are opaque, drawn last and never overlap, so redrawing the target on a copy gives exactly the pixels of a
    # full render of the new scene (the tests check this), at the cost of one copy.
    image = item.image.copy()
    content_box = _draw_plate(image, ImageDraw.Draw(image), plate)
    new_scene = dataclasses.replace(scene, plates=tuple(plates))
    return dataclasses.replace(item, image=image, answer=answer, scene=new_scene, content_box=content_box)


# -------------------------------------------------------------------------------------------------------- drawing


def _background(scene: Scene) -> Image.Image:
    """A low-chroma textured background with grey speckle, built at C speed (a 4096^2 canvas in about 0.1 s)."""
    width, height = scene.canvas
    rng = np.random.default_rng(scene.background_seed)
    base = int(rng.integers(135, 200))
    if scene.background == "blotches":
        grid = rng.integers(base - 45, base + 45, size=(int(rng.integers(3, 9)), int(rng.integers(3, 9))))
        field = Image.fromarray(np.clip(grid, 0, 255).astype(np.uint8)).resize(
            (width, height), Image.Resampling.BICUBIC
        )
    elif scene.background == "gradient":
        corners = np.clip(rng.integers(base - 50, base + 50, size=(2, 2)), 0, 255).astype(np.uint8)
        # A 2x2 image resized bilinearly is a smooth ramp between its corners (Pillow keeps the corner centres).
        field = Image.fromarray(corners).resize((width, height), Image.Resampling.BILINEAR)
    else:
        field = Image.new("L", (width, height), base)
    pixels = np.array(field, dtype=np.uint8)
    flat = pixels.reshape(-1)
    # Sparse speckle instead of dense noise: as busy to look at, but an exported 4096^2 PNG stays a few MB.
    count = int(0.04 * flat.size)
    where = rng.integers(0, flat.size, size=count)
    offsets = rng.choice(np.array([-30, -18, 18, 30], dtype=np.int16), size=count)
    flat[where] = np.clip(flat[where].astype(np.int16) + offsets, 0, 255).astype(np.uint8)
    # Grey levels to a faint warm or cool tint through a palette: one C lookup instead of three channel passes.
    paletted = Image.frombuffer("P", (width, height), pixels.tobytes(), "raw", "P", 0, 1)
    levels = np.arange(256, dtype=np.int16)
    palette = np.stack(
        [np.clip(levels + scene.tint, 0, 255), levels, np.clip(levels - scene.tint, 0, 255)], axis=1
    ).astype(np.uint8)
    paletted.putpalette(palette.reshape(-1).tolist())
    return paletted.convert("RGB")


def _shape_polygon(shape: str, cx: float, cy: float, area: float) -> list[tuple[float, float]] | None:
    """Vertices of ``shape`` with ink area ``area`` centred on (cx, cy); None for the circle."""
    if shape == "square":
        h = math.sqrt(area) / 2
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "diamond":
        h = math.sqrt(2 * area) / 2
        return [(cx, cy - h), (cx + h, cy), (cx, cy + h), (cx - h, cy)]
    if shape == "triangle":
        side = math.sqrt(4 * area / math.sqrt(3))
        tri_h = side * math.sqrt(3) / 2
        # Centroid at the centre: one third of the height below it, two thirds above.
        return [(cx, cy - 2 * tri_h / 3), (cx + side / 2, cy + tri_h / 3), (cx - side / 2, cy + tri_h / 3)]
    if shape == "cross":
        arm = math.sqrt(9 * area / 5) / 2  # a plus sign whose bar thickness is a third of its extent
        t = arm / 3
        return [
            (cx - t, cy - arm), (cx + t, cy - arm), (cx + t, cy - t), (cx + arm, cy - t), (cx + arm, cy + t),
            (cx + t, cy + t), (cx + t, cy + arm), (cx - t, cy + arm), (cx - t, cy + t), (cx - arm, cy + t),
            (cx - arm, cy - t), (cx - t, cy - t),
        ]  # fmt: skip
    if shape == "circle":
        return None
    raise ValueError(f"unknown shape {shape!r}")


@functools.lru_cache(maxsize=256)
def _shape_mask(shape: str, size: int) -> Image.Image:
    """A ``size`` x ``size`` antialiased coverage mask (4x supersampled). Every shape covers the same area (40 % of
    the tile), so at coarse scale they all leave the same grey blob. Cached: never draw on the result."""
    ss = 4
    big = Image.new("L", (size * ss, size * ss), 0)
    draw = ImageDraw.Draw(big)
    centre = size * ss / 2
    area = 0.4 * (size * ss) ** 2
    poly = _shape_polygon(shape, centre, centre, area)
    if poly is None:
        r = math.sqrt(area / math.pi)
        draw.ellipse((centre - r, centre - r, centre + r, centre + r), fill=255)
    else:
        draw.polygon(poly, fill=255)
    return big.resize((size, size), Image.Resampling.BOX)


def _pattern_tile(pattern: str, size: int, ink: RGB, paper: RGB) -> Image.Image:
    """A 1-px pattern with 50 % duty: every pattern has the same mean, so none survives an antialiased downscale."""
    y, x = np.mgrid[0:size, 0:size]
    if pattern == "horizontal":
        on = y % 2 == 0
    elif pattern == "vertical":
        on = x % 2 == 0
    elif pattern == "checker":
        on = (x + y) % 2 == 0
    elif pattern == "diagonal":
        on = (x - y) % 4 < 2
    else:
        raise ValueError(f"unknown pattern {pattern!r}")
    tile = np.where(on[..., None], np.array(ink, np.uint8), np.array(paper, np.uint8)).astype(np.uint8)
    return Image.fromarray(tile)


def _glyph_cells(text: str, size: int) -> list[tuple[int, int, int]]:
    """Per character, ``(pen_x, ink_x0, ink_x1)`` relative to the left edge of the first :func:`_pitch`-wide cell:
    each glyph's ink centred in its own cell. The one layout both :func:`_draw_text_centered` and
    :func:`render_detail` use."""
    font = _font(size)
    pitch = _pitch(size)
    cells = []
    for i, char in enumerate(text):
        left, _, right, _ = (int(v) for v in font.getbbox(char))  # integral for a bitmap-rendered glyph
        ink_x0 = i * pitch + (pitch - (right - left)) // 2
        cells.append((ink_x0 - left, ink_x0, ink_x0 + right - left))
    return cells


def _draw_text_centered(draw: ImageDraw.ImageDraw, slot: Box, text: str, size: int, fill: RGB) -> Box:
    """Draw ``text`` centred in ``slot``, each character centred in its own :func:`_pitch`-wide cell on a common
    baseline; return the ink box."""
    font = _font(size)
    _, top, _, bottom = (int(v) for v in font.getbbox(text))
    x0 = (slot[0] + slot[2] - _pitch(size) * len(text)) // 2
    y = (slot[1] + slot[3] - (bottom - top)) // 2 - top
    cells = _glyph_cells(text, size)
    for char, (pen_x, _, _) in zip(text, cells, strict=True):
        draw.text((x0 + pen_x, y), char, font=font, fill=fill)
    return (x0 + cells[0][1], y + top, x0 + cells[-1][2], y + bottom)


def _draw_detail(
    image: Image.Image, draw: ImageDraw.ImageDraw, kind: str, value: str, slot: Box, size: int, ink: RGB, paper: RGB
) -> Box:
    if kind in ("code", "letter"):
        return _draw_text_centered(draw, slot, value, size, ink)
    x = (slot[0] + slot[2] - size) // 2
    y = (slot[1] + slot[3] - size) // 2
    if kind == "shape":
        image.paste(ink, (x, y, x + size, y + size), _shape_mask(value, size))
    else:
        image.paste(_pattern_tile(value, size, ink, paper), (x, y))
    return (x, y, x + size, y + size)


def render_detail(
    kind: PlateKind, value: str, size: int, colour: str | None = None
) -> tuple[Image.Image, list[tuple[float, float, str]]]:
    """A plate's detail alone, drawn exactly as on a ``colour`` plate (ink on its card's fill, at font or tile
    ``size``; the untinted paper without a colour), in a tight image; with where each thing it shows is centred: one
    ``(x, y, name)`` per glyph of a code, else one for the letter, shape or pattern. For teaching a vision tower to
    read before it answers (``qzoom.demo.base``)."""
    w, h = _content_size(kind, size)
    fill = plate_fill(colour) if colour is not None else _PLATE_FILL
    image = Image.new("RGB", (w, h), fill)
    ink = _draw_detail(image, ImageDraw.Draw(image), kind, value, (0, 0, w, h), size, _INK, fill)
    if kind not in ("code", "letter"):
        return image, [((ink[0] + ink[2]) / 2, (ink[1] + ink[3]) / 2, value)]
    # The slot is exactly the cells' width, so the first cell starts at x = 0.
    cy = (ink[1] + ink[3]) / 2
    cells = _glyph_cells(value, size)
    return image, [((x0 + x1) / 2, cy, char) for char, (_, x0, x1) in zip(value, cells, strict=True)]


def _render(scene: Scene) -> tuple[Image.Image, Box | None]:
    image = _background(scene)
    draw = ImageDraw.Draw(image)
    for region in scene.regions:
        x0, y0, x1, y1 = region.box
        shape = (x0, y0, x1 - 1, y1 - 1)  # PIL's rectangle and ellipse include their last pixel
        if region.ellipse:
            draw.ellipse(shape, fill=COLOURS[region.colour])
        else:
            draw.rectangle(shape, fill=COLOURS[region.colour])
    for frame in scene.frames:
        x0, y0, x1, y1 = frame.box
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=COLOURS[frame.colour], width=frame.border)
    for item in scene.clutter:
        grey: RGB = (item.grey, item.grey, item.grey)
        if item.kind == "code":
            _draw_text_centered(draw, item.box, item.value, item.size, grey)
        else:
            image.paste(grey, item.box, _shape_mask(item.value, item.size))
    content: Box | None = None
    for i, plate in enumerate(scene.plates):
        ink_box = _draw_plate(image, draw, plate)
        if i == scene.target:
            content = ink_box
    return image, content


def plate_fill(colour: str) -> RGB:
    """The fill of a ``colour`` plate's card: the light paper with :data:`_PLATE_TINT` of the colour mixed in.

    Why tinted: every token that shows a plate's detail then also shows which plate it is, so the question's colour
    word can pick the tokens to read in one attention step (with a white card, a tiny model has to find the coloured
    ring first and then look inside it); and at coarse scale the plate is a pale blob of its colour rather than a
    3-px ring. The card stays light (luminance 175 or more, the ink 22) and the detail is no more legible for it.
    """
    mixed = [round((1 - _PLATE_TINT) * p + _PLATE_TINT * c) for p, c in zip(_PLATE_FILL, COLOURS[colour], strict=True)]
    return (mixed[0], mixed[1], mixed[2])


def _draw_plate(image: Image.Image, draw: ImageDraw.ImageDraw, plate: Plate) -> Box:
    """Draw a plate over everything under its box (it is opaque there); return the ink box of its detail."""
    x0, y0, x1, y1 = plate.box
    fill = plate_fill(plate.colour)
    draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill, outline=COLOURS[plate.colour], width=plate.border)
    inner = (x0 + plate.border, y0 + plate.border, x1 - plate.border, y1 - plate.border)
    return _draw_detail(image, draw, plate.kind, plate.value, inner, plate.size, _INK, fill)


def render_plate(
    kind: PlateKind, value: str, size: int, colour: str, *, border: int = 3, pad: int = 7, card: int = 0
) -> Image.Image:
    """One plate alone, drawn exactly as in a scene at native scale (border, tinted card at least ``card`` px a side,
    detail at ``size``), in an image of its outer size. For short training sequences about one or two plates
    (``qzoom.demo.base``)."""
    content_w, content_h = _content_size(kind, size)
    w, h = max(card, content_w + 2 * (pad + border)), max(card, content_h + 2 * (pad + border))
    image = Image.new("RGB", (w, h))
    plate = Plate(quadrant=0, colour=colour, kind=kind, value=value, box=(0, 0, w, h), border=border, size=size)
    _draw_plate(image, ImageDraw.Draw(image), plate)
    return image


def render_scene(scene: Scene) -> Image.Image:
    """Draw ``scene`` (the image of the item it came from)."""
    return _render(scene)[0]


# ------------------------------------------------------------------------------------------------- views and crops


def coarse_size(
    width: int, height: int, max_tokens: int = COARSE_TOKENS, patch: int = PATCH_PX, min_pixels: int = 56 * 56
) -> tuple[int, int]:
    """(width, height) of the view the Qwen2-VL resize rule gives at ``max_tokens`` merged tokens."""
    return resized_wh((width, height), factor=patch, min_pixels=min_pixels, max_pixels=max_tokens * patch * patch)


def coarse_view(image: Image.Image, max_tokens: int = COARSE_TOKENS, patch: int = PATCH_PX) -> Image.Image:
    """The whole image at a ``max_tokens`` budget, resized as the Qwen2-VL PIL image processor does (bicubic)."""
    return image.resize(coarse_size(*image.size, max_tokens=max_tokens, patch=patch), Image.Resampling.BICUBIC)


def crop_box_around(
    item: SyntheticItem, size: int, *, rng: random.Random | None = None, around: Sequence[int] | None = None
) -> Box:
    """A ``size`` x ``size`` box of the original image that contains ``around`` (default ``item.box``, the target).

    Centred on it, or at a uniformly random offset that still contains it when ``rng`` is given (so a model trained
    on crops does not learn that the answer is always in the middle). The box is clamped to the canvas, and grows to
    the target's extent on an axis where the target is larger than ``size``. Pass ``around=item.content_box`` (or a
    margin around it) for a crop of the detail alone, smaller than its plate's card.
    """
    width, height = item.canvas
    x0, y0, x1, y1 = item.box if around is None else (int(v) for v in around)

    def axis(lo: int, hi: int, limit: int) -> tuple[int, int]:
        span = min(max(size, hi - lo), limit)
        if hi - lo >= span:
            start = max(0, min(lo, limit - span))
        else:
            earliest, latest = max(0, hi - span), min(lo, limit - span)
            start = rng.randint(earliest, latest) if rng is not None else (lo + hi - span) // 2
            start = max(earliest, min(start, latest))
        return start, start + span

    cx0, cx1 = axis(x0, x1, width)
    cy0, cy1 = axis(y0, y1, height)
    return (cx0, cy0, cx1, cy1)


def crop_around(item: SyntheticItem, size: int, *, rng: random.Random | None = None) -> Image.Image:
    """The native-resolution crop of :func:`crop_box_around` (no resampling: what a perfect zoom would show)."""
    return item.image.crop(crop_box_around(item, size, rng=rng))


def crop_with_answer(
    item: SyntheticItem, box: Sequence[int], answer: str | None = None, *, origin: tuple[int, int] = (0, 0)
) -> Image.Image:
    """The native crop ``box`` (canvas pixels) of ``item``'s image, with the target plate showing ``answer`` when one
    is given.

    The same pixels as cropping :func:`with_answer` of the item, without copying the whole canvas: a training loop can
    turn one rendered scene into many examples at the cost of a crop. ``origin`` is the canvas position of
    ``item.image``'s top-left pixel when the item keeps only a region of its canvas (a training pool holds the
    neighbourhood of the target, not a 4096 px canvas); ``box`` must lie in that region. Detail families only when
    ``answer`` is set.
    """
    x0, y0, x1, y1 = (int(v) for v in box)
    ox, oy = origin
    crop = item.image.crop((x0 - ox, y0 - oy, x1 - ox, y1 - oy))
    if answer is None:
        return crop
    scene = item.scene
    if scene.target is None:
        raise ValueError(f"{item.family!r} items have no detail target to change")
    if answer not in ANSWER_VOCAB[item.family]:
        raise ValueError(f"{answer!r} is not an answer of family {item.family!r}")
    plate = scene.plates[scene.target]
    px0, py0, px1, py1 = plate.box
    moved = dataclasses.replace(plate, value=answer, box=(px0 - x0, py0 - y0, px1 - x0, py1 - y0))
    _draw_plate(crop, ImageDraw.Draw(crop), moved)
    return crop


# ----------------------------------------------------------------------------------------------------------- scoring

_NUMBER_WORDS = {
    "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip


def normalize_answer(s: str) -> str:
    """The canonical form scored by :func:`exact_match`.

    NFKC, lower case, number words to digits, a leading article dropped ("a" only before a word), then everything but
    letters and digits removed: ``" The K7X. "`` -> ``"k7x"``, ``"Three"`` -> ``"3"``, ``"a Circle!"`` -> ``"circle"``,
    ``"k-7 x"`` -> ``"k7x"``.
    """
    words = re.findall(r"[^\W_]+", unicodedata.normalize("NFKC", s).lower())
    # "a" only before a word ("a circle"): a spelled-out code such as "A 7X" keeps its first letter.
    if len(words) > 1 and (words[0] in ("the", "an") or (words[0] == "a" and words[1].isalpha() and len(words[1]) > 2)):
        words = words[1:]
    return "".join(_NUMBER_WORDS.get(word, word) for word in words)


def exact_match(pred: str, answer: str) -> bool:
    """True when the two answers normalise to the same non-empty string."""
    norm = normalize_answer(answer)
    return bool(norm) and normalize_answer(pred) == norm


def box_contains(box: Sequence[float], point: Sequence[float]) -> bool:
    """Whether ``point`` (x, y) lies in ``box`` (x0, y0, x1, y1), x1/y1 exclusive."""
    x0, y0, x1, y1 = box
    x, y = point
    return x0 <= x < x1 and y0 <= y < y1


def box_contains_center(pred_box: Sequence[float], gt_box: Sequence[float]) -> bool:
    """Whether the proposed box contains the centre of the ground-truth box (the zoom-box hit criterion)."""
    x0, y0, x1, y1 = gt_box
    return box_contains(pred_box, ((x0 + x1) / 2, (y0 + y1) / 2))


# ------------------------------------------------------------------------------------------------------------ export


def export(
    out_dir: Path,
    split: str,
    n: int,
    *,
    seed: int = 0,
    families: Sequence[str] | None = None,
    min_side: int = 896,
    max_side: int = 4096,
) -> Path:
    """Write the first N items of SPLIT (train, val or test) to OUT_DIR for inspection: one PNG per item and an
    ``items.jsonl`` index next to them.

    Each JSONL line holds uid, image (the PNG's file name), question, answer, box ([x0, y0, x1, y1] in original
    pixels, x1/y1 exclusive), content_box (the answer's ink; the box itself for coarse questions), needs_detail,
    family, canvas ([width, height]), split, seed, index and generator_version. Items are generated, not stored: the
    same split, seed and index always give the same item, so an export is a snapshot for looking at, not the
    benchmark. A 4096 px item is a PNG of a few MB. Returns the path of the JSONL file.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jsonl = out_dir / "items.jsonl"
    with jsonl.open("w", encoding="utf-8") as fh:
        for item in iterate(split, n, seed=seed, families=families, min_side=min_side, max_side=max_side):
            name = f"{item.uid}.png"
            item.image.save(out_dir / name, format="PNG", compress_level=6)
            record = {
                "uid": item.uid,
                "image": name,
                "question": item.question,
                "answer": item.answer,
                "box": list(item.box),
                "content_box": list(item.content_box),
                "needs_detail": item.needs_detail,
                "family": item.family,
                "canvas": list(item.canvas),
                "split": item.split,
                "seed": item.seed,
                "index": item.index,
                "generator_version": GENERATOR_VERSION,
            }
            fh.write(json.dumps(record) + "\n")
    return jsonl
