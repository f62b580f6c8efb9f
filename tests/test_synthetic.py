"""Tests for qzoom.evals.synthetic: determinism, splits, layout, scoring, export, and the coarse-vs-crop property."""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from qzoom.evals.synthetic import (
    ANSWER_CHARS,
    ANSWER_VOCAB,
    COARSE_FAMILIES,
    COLOURS,
    DETAIL_FAMILIES,
    FAMILIES,
    MAX_ASPECT,
    PATTERNS,
    POSITIONS,
    SHAPES,
    SPLITS,
    TEMPLATES,
    SyntheticItem,
    _font,
    box_contains,
    box_contains_center,
    coarse_size,
    coarse_view,
    crop_around,
    crop_box_around,
    exact_match,
    export,
    generate_item,
    iterate,
    normalize_answer,
    plate_fill,
    render_detail,
    render_plate,
    render_scene,
    with_answer,
)

# Small canvases keep most tests fast; the default 896-4096 range is exercised where the size matters.
SMALL = {"min_side": 256, "max_side": 512}


def _digest(image: Image.Image) -> str:
    return hashlib.sha256(image.tobytes()).hexdigest()


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32)


@pytest.fixture(scope="module")
def default_items() -> list[SyntheticItem]:
    """Two rounds of every family at the default canvas sizes (896-4096)."""
    return list(iterate("val", 2 * len(FAMILIES)))


# ------------------------------------------------------------------------------------------------ determinism, splits


def test_same_arguments_give_the_same_item() -> None:
    for index in (0, 3, 11):
        a = generate_item("train", index, seed=5, **SMALL)
        b = generate_item("train", index, seed=5, **SMALL)
        assert _digest(a.image) == _digest(b.image)
        assert (a.question, a.answer, a.box, a.content_box, a.canvas, a.uid) == (
            b.question,
            b.answer,
            b.box,
            b.content_box,
            b.canvas,
            b.uid,
        )
    # Order does not matter: item 11 drawn inside an iteration equals item 11 drawn alone.
    from_iter = list(iterate("train", 3, seed=5, start=10, **SMALL))[1]
    assert _digest(from_iter.image) == _digest(generate_item("train", 11, seed=5, **SMALL).image)
    # The scene alone redraws the image.
    assert _digest(render_scene(from_iter.scene)) == _digest(from_iter.image)


def test_splits_and_seeds_are_disjoint_streams() -> None:
    n = 40
    digests = {
        (split, seed): {_digest(item.image) for item in iterate(split, n, seed=seed, **SMALL)}
        for split in SPLITS
        for seed in (0, 1)
    }
    assert all(len(d) == n for d in digests.values())  # no repeats inside a stream either
    keys = list(digests)
    for i, a in enumerate(keys):
        for b in keys[i + 1 :]:
            assert not digests[a] & digests[b], f"{a} and {b} share an item"


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="split"):
        generate_item("valid", 0)
    with pytest.raises(ValueError, match="families"):
        generate_item("train", 0, families=["ocr"])
    with pytest.raises(ValueError, match="families"):
        generate_item("train", 0, families=[])
    with pytest.raises(ValueError, match="min_side"):
        generate_item("train", 0, min_side=900, max_side=800)
    with pytest.raises(ValueError, match="index"):
        generate_item("train", -1)


# ------------------------------------------------------------------------------------------------ families, questions


def test_every_family_appears_round_robin_with_its_template_and_vocabulary() -> None:
    items = list(iterate("test", 2 * len(FAMILIES), **SMALL))
    assert [it.family for it in items] == list(FAMILIES) * 2
    for it in items:
        assert it.needs_detail == (it.family in DETAIL_FAMILIES)
        assert it.answer in ANSWER_VOCAB[it.family]
        assert set(it.answer) <= set(ANSWER_CHARS)
        template = TEMPLATES[it.family]
        if "{colour}" in template:
            assert it.question in {template.format(colour=c) for c in COLOURS}
        elif "{position}" in template:
            assert it.question in {template.format(position=p) for p in POSITIONS}
        else:
            assert it.question == template
    assert set(FAMILIES) == DETAIL_FAMILIES | COARSE_FAMILIES
    assert not DETAIL_FAMILIES & COARSE_FAMILIES
    only = list(iterate("test", 4, families=["shape", "count"], **SMALL))
    assert [it.family for it in only] == ["shape", "count", "shape", "count"]


def test_the_question_names_exactly_one_object_and_distractors_differ() -> None:
    for it in iterate("train", 30, families=["code", "code_at", "letter", "shape", "pattern"], **SMALL):
        scene = it.scene
        assert scene.target is not None
        target = scene.plates[scene.target]
        assert len(scene.plates) >= 2
        colours = [p.colour for p in scene.plates] + [o.colour for o in (*scene.regions, *scene.frames)]
        assert len(colours) == len(set(colours))  # a colour word names one object
        assert len({p.quadrant for p in scene.plates}) == len(scene.plates)  # a position word names one plate
        assert len({p.value for p in scene.plates}) == len(scene.plates)  # ignoring the query is not enough
        assert target.value == it.answer and target.box == it.box
        named = POSITIONS[target.quadrant] if it.family == "code_at" else target.colour
        assert named in it.question


# ---------------------------------------------------------------------------------------------------------- geometry


def test_canvas_and_boxes_lie_inside_the_image(default_items: list[SyntheticItem]) -> None:
    for it in default_items:
        width, height = it.canvas
        assert 896 <= width <= 4096 and 896 <= height <= 4096
        assert max(width, height) <= MAX_ASPECT * min(width, height)
        assert it.image.size == it.canvas and it.image.mode == "RGB"
        for box in (it.box, it.content_box):
            x0, y0, x1, y1 = box
            assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
        cx0, cy0, cx1, cy1 = it.content_box
        assert it.box[0] <= cx0 and it.box[1] <= cy0 and cx1 <= it.box[2] and cy1 <= it.box[3]
        if it.needs_detail:
            quadrant = it.scene.plates[it.scene.target or 0].quadrant
            qx, qy = quadrant % 2, quadrant // 2
            # The plate lies inside its quadrant, so the position words are never ambiguous.
            assert qx * width // 2 <= it.box[0] and it.box[2] <= (qx + 1) * width // 2
            assert qy * height // 2 <= it.box[1] and it.box[3] <= (qy + 1) * height // 2


def test_detail_targets_are_small_and_coarse_targets_are_large(default_items: list[SyntheticItem]) -> None:
    for it in default_items:
        width, height = it.canvas
        to_coarse = coarse_size(width, height)[0] / width
        x0, y0, x1, y1 = it.box
        if it.needs_detail:
            # The answer's ink is at most three 28 px tokens wide natively, a few coarse pixels at most canvases.
            cx0, cy0, cx1, cy1 = it.content_box
            assert max(cx1 - cx0, cy1 - cy0) <= 84
            assert max(x1 - x0, y1 - y0) <= 0.15 * min(width, height)
            # The plate itself (where) stays visible at coarse scale: its card is about 1.6 coarse tokens a side, so
            # it fills at least one merged token whole wherever it lies.
            assert min(x1 - x0, y1 - y0) * to_coarse >= 40
        else:
            objects = it.scene.regions if it.family == "colour" else it.scene.frames
            for obj in objects:
                ox0, oy0, ox1, oy1 = obj.box
                assert min(ox1 - ox0, oy1 - oy0) >= 0.25 * min(width, height)
                assert min(ox1 - ox0, oy1 - oy0) * to_coarse >= 3 * 28  # at least three coarse tokens a side


def test_coarse_answers_are_drawn_where_the_box_says(default_items: list[SyntheticItem]) -> None:
    for it in default_items:
        pixels = np.asarray(it.image)
        if it.family == "colour":
            region = it.scene.regions[0]
            x0, y0, x1, y1 = region.box
            assert tuple(pixels[(y0 + y1) // 2, (x0 + x1) // 2]) == COLOURS[it.answer]
            assert it.box == region.box
        elif it.family == "count":
            assert len(it.scene.frames) == int(it.answer)
            for frame in it.scene.frames:
                x0, y0, x1, y1 = frame.box
                assert tuple(pixels[(y0 + y1) // 2, x0 + 1]) == COLOURS[frame.colour]  # the left bar
                assert box_contains(it.box, (x0, y0)) and box_contains(it.box, (x1 - 1, y1 - 1))


def test_the_detail_answer_is_drawn_inside_its_box() -> None:
    # A twin with another answer differs from the item only inside content_box (inside box): the answer is drawn
    # exactly where the box says, and nowhere else.
    for it in iterate("train", 20, families=sorted(DETAIL_FAMILIES), **SMALL):
        other = next(a for a in ANSWER_VOCAB[it.family] if a != it.answer)
        twin = with_answer(it, other)
        assert twin.box == it.box and twin.question == it.question and twin.answer == other
        assert _digest(render_scene(twin.scene)) == _digest(twin.image)  # the fast redraw equals a full render
        diff = np.abs(_pixels(it.image) - _pixels(twin.image)).max(axis=2)
        ys, xs = np.nonzero(diff)
        assert len(xs) > 0
        x0, y0, x1, y1 = it.box
        assert x0 <= xs.min() and xs.max() < x1 and y0 <= ys.min() and ys.max() < y1
        # Ink is dark on the light plate, and the plate's border has the named colour.
        cx0, cy0, cx1, cy1 = it.content_box
        assert np.asarray(it.image)[cy0:cy1, cx0:cx1].min() < 80
        plate = it.scene.plates[it.scene.target or 0]
        assert tuple(np.asarray(it.image)[(y0 + y1) // 2, x0 + 1]) == COLOURS[plate.colour]
    with pytest.raises(ValueError, match="answer"):
        with_answer(generate_item("train", 3, families=["shape"], **SMALL), "hexagon")
    with pytest.raises(ValueError, match="no detail"):
        with_answer(generate_item("train", 0, families=["colour"], **SMALL), "red")


def test_the_bundled_font_renders_at_every_size_used() -> None:
    heights = []
    for size in range(12, 23):
        font = _font(size)
        assert font.getname()[0] == "Aileron"  # Pillow's bundled font, not a system one
        image = Image.new("L", (120, 40), 255)
        ImageDraw.Draw(image).text((2, 2), "K7X", font=font, fill=0)
        ink = np.nonzero(np.asarray(image) < 128)
        assert len(ink[0]) > 20
        heights.append(int(ink[0].max() - ink[0].min()))
    assert heights == sorted(heights) and heights[-1] > heights[0]


@pytest.mark.parametrize("family", ["code", "letter", "shape", "pattern"])
def test_render_detail_draws_the_plates_ink_and_says_where_each_glyph_is(family):
    for index in range(3):
        it = generate_item("train", index, families=[family])
        plate = it.scene.plates[it.scene.target or 0]
        image, centres = render_detail(plate.kind, plate.value, plate.size, plate.colour)
        # On the plate's tinted card, as in the scene (inside the border, in the padding around the detail).
        x0, y0 = plate.box[0] + plate.border, plate.box[1] + plate.border
        assert plate_fill(plate.colour) == it.image.getpixel((x0 + 1, y0 + 1))
        assert plate_fill(plate.colour) in {tuple(int(v) for v in p) for p in np.asarray(image).reshape(-1, 3)}

        # The same ink as on the plate (up to where it sits): compare the dark masks cropped to their extent.
        def ink(img: Image.Image) -> np.ndarray:
            dark = np.asarray(img.convert("L")) < 128
            ys, xs = np.nonzero(dark)
            return dark[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]

        assert np.array_equal(ink(image), ink(it.image.crop(it.content_box)))
        names = [name for _, _, name in centres]
        assert names == (list(plate.value) if family == "code" else [plate.value])
        xs = [x for x, _, _ in centres]
        assert xs == sorted(xs)
        dark = np.asarray(image.convert("L")) < 128
        for x, y, _ in centres:  # every centre sits on its glyph: ink in its column band (a C's middle is hollow)
            assert dark[:, max(0, int(x) - 6) : int(x) + 7].any() and 0 <= y < image.height
        if family == "code":  # one glyph per 28 px token at native scale: centres a fixed pitch apart
            assert all(27.0 <= b - a <= 29.0 for a, b in itertools.pairwise(xs))


def test_render_plate_draws_a_plate_exactly_as_the_scene_does():
    for index in range(8):
        it = generate_item("train", index, families=["code", "letter", "shape", "pattern"])
        for plate in it.scene.plates:
            x0, y0, x1, y1 = plate.box
            content_w, content_h = (x1 - x0 - 2 * plate.border, y1 - y0 - 2 * plate.border)
            image = None
            card = min(x1 - x0, y1 - y0)  # a card side, or the detail's height with its padding (then below both)
            for pad in range(5, 10):  # the scene drew it with a padding of 5-9 px, not kept in the Plate
                drawn = render_plate(
                    plate.kind, plate.value, plate.size, plate.colour, border=plate.border, pad=pad, card=card
                )
                if drawn.size == (x1 - x0, y1 - y0):
                    image = drawn
            assert image is not None, (content_w, content_h)
            assert image.tobytes() == it.image.crop(plate.box).tobytes()


# ----------------------------------------------------------------------------------------- the Q-Zoom key property


def _twin_rms(item: SyntheticItem, twin: SyntheticItem) -> tuple[float, float, float]:
    """RMS of (item - twin) over the detail (both answers' ink boxes): native, in the 256-token coarse view, and the
    coarse max. (Over the whole plate the card, the same in both, would dilute both RMS values.)"""
    a_box, b_box = item.content_box, twin.content_box
    ink = (min(a_box[0], b_box[0]), min(a_box[1], b_box[1]), max(a_box[2], b_box[2]), max(a_box[3], b_box[3]))
    native = _pixels(item.image.crop(ink)) - _pixels(twin.image.crop(ink))
    a, b = coarse_view(item.image), coarse_view(twin.image)
    fx, fy = a.width / item.canvas[0], a.height / item.canvas[1]
    x0, y0, x1, y1 = ink
    # Every coarse pixel the detail touches.
    coarse_box = (int(x0 * fx), int(y0 * fy), int(np.ceil(x1 * fx)), int(np.ceil(y1 * fy)))
    coarse = _pixels(a.crop(coarse_box)) - _pixels(b.crop(coarse_box))
    return float(np.sqrt((native**2).mean())), float(np.sqrt((coarse**2).mean())), float(np.abs(coarse).max())


def test_the_coarse_view_loses_the_detail_and_a_native_crop_keeps_it() -> None:
    # Two items that differ only in the answer. In a native crop they differ by the full ink contrast; in the
    # 256-token coarse view (448x448 for a square) the difference over the target box keeps only a fraction of its
    # native RMS: for the 1-px patterns almost nothing at any canvas size (same mean, period 2), for text and shapes
    # a blur residue that shrinks with the downscale factor (2x at 896 px to 9x at 4096 px): under half the native
    # RMS from 6x on, where a 20-27 px glyph is 3-4 coarse pixels tall.
    rng = random.Random(0)
    ratios: dict[str, list[float]] = {f: [] for f in DETAIL_FAMILIES}
    for it in iterate("test", 30, families=["code", "letter", "shape", "pattern", "code_at"]):
        other = it.answer
        while other == it.answer:
            other = rng.choice(ANSWER_VOCAB[it.family])
        twin = with_answer(it, other)
        native_rms, coarse_rms, coarse_max = _twin_rms(it, twin)
        ratio = coarse_rms / native_rms
        ratios[it.family].append(ratio)
        scale = it.canvas[0] / coarse_size(*it.canvas)[0]
        if it.family == "pattern":
            assert ratio < 0.12 and coarse_max < 30, (it.uid, ratio, coarse_max)
        elif scale >= 6:  # a shape's outline differs from another's less than a glyph's does: a looser bound
            assert ratio < (0.6 if it.family == "shape" else 0.5), (it.uid, ratio)
        # The native crop shows the answer with full contrast: what Q-Zoom's crop feeds the model.
        crop_a, crop_b = crop_around(it, 448), crop_around(twin, 448)
        assert np.abs(_pixels(crop_a) - _pixels(crop_b)).max() > 150
        assert crop_a.tobytes() == it.image.crop(crop_box_around(it, 448)).tobytes()  # native pixels, no resampling
    everything = [r for family in ratios.values() for r in family]
    assert float(np.median(everything)) < 0.5  # the median detail keeps under half its contrast
    assert max(ratios["pattern"]) < 0.12


# --------------------------------------------------------------------------------------------------- crops and views


def test_crop_around_contains_the_target_at_native_resolution() -> None:
    rng = random.Random(1)
    for it in iterate("train", 14, **SMALL):
        for size in (64, 128, 224):
            for jitter in (None, rng):
                box = crop_box_around(it, size, rng=jitter)
                x0, y0, x1, y1 = box
                assert min(x0, y0) >= 0 and x1 <= it.canvas[0] and y1 <= it.canvas[1]
                tx0, ty0, tx1, ty1 = it.box
                assert x0 <= tx0 and y0 <= ty0 and tx1 <= x1 and ty1 <= y1
                assert x1 - x0 == min(max(size, tx1 - tx0), it.canvas[0])
                assert y1 - y0 == min(max(size, ty1 - ty0), it.canvas[1])
        assert crop_around(it, 96).size == (
            min(max(96, it.box[2] - it.box[0]), it.canvas[0]),
            min(max(96, it.box[3] - it.box[1]), it.canvas[1]),
        )


def test_coarse_size_follows_the_qwen_resize_rule() -> None:
    assert coarse_size(4096, 4096) == (448, 448)
    assert coarse_size(896, 896) == (448, 448)
    assert coarse_size(448, 448) == (448, 448)
    assert coarse_size(4096, 4096, max_tokens=64) == (224, 224)
    for w, h in ((896, 1433), (4000, 2600), (1234, 987), (100, 30)):
        cw, ch = coarse_size(w, h)
        assert cw % 28 == 0 and ch % 28 == 0 and cw * ch <= 256 * 28 * 28
    assert coarse_view(Image.new("RGB", (2000, 1500))).size == coarse_size(2000, 1500)


# ----------------------------------------------------------------------------------------------------------- scoring


def test_normalize_and_exact_match() -> None:
    assert normalize_answer(" The K7X. ") == "k7x"
    assert normalize_answer("k-7 x") == "k7x"
    assert normalize_answer("Three") == "3"
    assert normalize_answer("a Circle!") == "circle"
    assert normalize_answer("A 7X") == "a7x"  # a spelled-out code keeps its first letter
    assert normalize_answer("A") == "a"
    assert normalize_answer("ＡＣＥ") == "ace"  # NFKC folds full-width letters
    assert exact_match("red.", "red")
    assert exact_match("  CHECKER ", "checker")
    assert exact_match("4", "four") and exact_match("four", "4")
    assert exact_match("ace", "ACE")
    assert not exact_match("AC", "ACE")
    assert not exact_match("", "")  # an empty answer never scores
    assert not exact_match("square", "circle")
    for family in FAMILIES:
        for answer in ANSWER_VOCAB[family][:50]:
            assert exact_match(answer, answer) and exact_match(answer.lower(), answer)
    assert set(SHAPES) | set(PATTERNS) <= {normalize_answer(a) for a in SHAPES + PATTERNS}


def test_box_containment() -> None:
    box = (10, 20, 30, 40)
    assert box_contains(box, (10, 20))
    assert box_contains(box, (29.5, 39.9))
    assert not box_contains(box, (30, 25))  # x1 is exclusive
    assert not box_contains(box, (15, 40))  # y1 is exclusive
    assert not box_contains(box, (9.99, 25))
    assert box_contains_center((0, 0, 100, 100), (40, 40, 60, 60))
    assert box_contains_center((45, 45, 55, 55), (0, 0, 100, 100))  # a small box around the centre hits
    assert not box_contains_center((0, 0, 50, 50), (40, 40, 80, 80))  # the centre (60, 60) lies outside
    assert not box_contains_center((0, 0, 50, 50), (0, 0, 100, 100))  # centre (50, 50) on the exclusive edge


# ------------------------------------------------------------------------------------------------------------ export


def test_export_writes_jsonl_and_pngs_that_reload_to_the_same_items(tmp_path: Path) -> None:
    path = export(tmp_path / "set", "val", len(FAMILIES), seed=3, **SMALL)
    assert path == tmp_path / "set" / "items.jsonl"
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(records) == len(FAMILIES)
    assert {r["family"] for r in records} == set(FAMILIES)
    for record in records:
        item = generate_item("val", record["index"], seed=3, **SMALL)
        assert record["uid"] == item.uid
        assert record["question"] == item.question and record["answer"] == item.answer
        assert tuple(record["box"]) == item.box and tuple(record["content_box"]) == item.content_box
        assert record["needs_detail"] is item.needs_detail and record["family"] == item.family
        assert tuple(record["canvas"]) == item.canvas
        assert (record["split"], record["seed"]) == ("val", 3)
        with Image.open(path.parent / record["image"]) as png:
            assert png.format == "PNG" and png.mode == "RGB"
            assert png.tobytes() == item.image.tobytes()
