"""The demo model's base trainer and its evaluation, on a micro model: training sees the inference sequence, a run
writes a loadable checkpoint, `qzoom eval demo` measures every configuration on the same items."""

from __future__ import annotations

import dataclasses
import json
import random

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from qzoom import roi
from qzoom.cli import app
from qzoom.demo.base import (
    FrozenTowerFeatures,
    GroundingProbe,
    ProbedHead,
    _attention_share_loss,
    _code_phase_batch,
    _draw_batch,
    _ground_phase_batch,
    _grounding_loss,
    _pointer_loss,
    _reading_loss,
    _referent_loss,
    answer_loss_and_hits,
    train_base,
)
from qzoom.demo.examples import (
    COARSE_READ_GROUPS,
    READ_CLASSES,
    READ_GROUPS,
    READ_LOGITS,
    REFERENTS,
    ExampleBuilder,
    ItemPool,
    _grid_box_around,
    answer_drill,
    answer_pointers,
    coarse_reading_targets,
    collate,
    image_keys,
    model_inputs,
    pool_item,
    reading_drill,
    referent_drill,
    referent_of,
)
from qzoom.demo.model import (
    BaseRecipe,
    build_demo_model,
)
from qzoom.engine import QZoomEngine
from qzoom.evals.demo import (
    TARGETS,
    DemoReport,
    RunStats,
    evaluate_demo,
    format_report,
    uncached_engine,
    write_model_card,
)
from qzoom.evals.synthetic import (
    ANSWER_VOCAB,
    COLOURS,
    DETAIL_FAMILIES,
    POSITIONS,
    TEMPLATES,
    box_contains,
    boxes_overlap,
    crop_box_around,
    crop_with_answer,
    generate_item,
    plate_fill,
    render_plate,
    with_answer,
)
from qzoom.schemas import AskOptions

MICRO = BaseRecipe(
    hidden_size=32,
    num_heads=2,
    num_kv_heads=1,
    vision_hidden_size=32,
    vision_heads=1,
    read_steps=2,
    read_batch_size=2,
    drill_steps=2,
    drill_batch_size=2,
    crop_steps=2,
    mixed_steps=2,
    ground_steps=2,
    batch_size=2,
    mixed_batch_size=3,
    pool_size=3,
    referent_steps=2,
    referent_batch_size=2,
    pointer_heads=((3, 1),),
    fused_decoy_frac=0.5,  # every kind of example the recipe can draw is drawn in the micro run
    drill_position_frac=0.5,
    code_steps=2,
)


@pytest.fixture(scope="module")
def micro_dir(tmp_path_factory):
    torch.set_num_threads(1)
    return train_base(tmp_path_factory.mktemp("base"), MICRO, progress=False, log=lambda _: None)


def test_crop_with_answer_is_a_crop_of_with_answer_even_from_a_region():
    item = generate_item("train", 0, families=("code",))
    box = crop_box_around(item, 140, rng=random.Random(3))
    expected = np.asarray(with_answer(item, "HX7").image.crop(box))
    assert np.array_equal(np.asarray(crop_with_answer(item, box, "HX7")), expected)
    region = pool_item(item, 4 * 784, 256 * 784, reach=200)
    assert region.item.image.size < item.image.size  # the pool keeps the target's neighbourhood only
    assert np.array_equal(np.asarray(crop_with_answer(region.item, box, "HX7", origin=region.origin)), expected)
    with pytest.raises(ValueError, match="not an answer of family"):
        crop_with_answer(item, box, "circle")


def test_fused_example_is_the_sequence_a_zoom_step_builds():
    model, processor = build_demo_model(MICRO)
    engine = QZoomEngine(model, processor)
    item = generate_item("train", 3, families=("letter",), min_side=900, max_side=1100)
    builder = ExampleBuilder(engine, MICRO.min_pixels, MICRO.max_pixels)
    p = pool_item(item, MICRO.min_pixels, MICRO.max_pixels, reach=MICRO.crop_max)
    example = builder.fused(p, None)

    st = engine.new_state(
        item.image, item.question, AskOptions(min_pixels=MICRO.min_pixels, max_pixels=MICRO.max_pixels)
    )
    engine.prepare([st])
    engine.encode([st])
    engine.prefill([st])
    proposal = engine.proposal_from_grid_boxes(st, [_grid_box_around(item.box, p.grid_hw, item.canvas, None)])
    engine.zoom([st], [proposal])
    n = st.input_ids.shape[0]
    assert torch.equal(example.input_ids[:n], st.input_ids)
    assert torch.allclose(example.positions[:, :n], st.positions)
    assert [g.tolist() for g in example.grids] == [st.grid_thw.tolist(), engine._block_grid_thw(st.blocks[1]).tolist()]
    # The answer follows the prompt: the labels cover exactly its tokens and <|im_end|>.
    answer_ids = example.input_ids[n:].tolist()
    assert processor.tokenizer.decode(answer_ids) == item.answer + "<|im_end|>"
    assert (example.labels[:n] == -100).all() and example.labels[n:].tolist() == answer_ids


def test_fused_examples_with_a_decoy_splice_both_crops_and_aim_at_the_target():
    # The SD-RPN's two heaviest blobs are often the named plate and a look-alike: the example is the sequence a zoom
    # step on both boxes builds (either order), and grounding and pointers rest on the target's crop only.
    model, processor = build_demo_model(MICRO)
    engine = QZoomEngine(model, processor)
    item = generate_item("train", 5, families=("code",))
    builder = ExampleBuilder(engine, MICRO.min_pixels, MICRO.max_pixels)
    assert pool_item(item, MICRO.min_pixels, MICRO.max_pixels, reach=MICRO.crop_max).decoy is None  # only if asked
    p = pool_item(item, MICRO.min_pixels, MICRO.max_pixels, reach=MICRO.crop_max, decoy=True)
    assert p.decoy is not None
    decoy_box = p.decoy[1]
    target_box = _grid_box_around(item.box, p.grid_hw, item.canvas, None)
    target_plate = item.scene.plates[item.scene.target]
    (decoy_plate,) = [
        pl
        for pl in item.scene.plates
        if pl is not target_plate and roi.covering_grid_box(pl.box, p.grid_hw, item.canvas) == decoy_box
    ]
    assert decoy_plate.kind == target_plate.kind  # a look-alike
    # Clear of the target's cells, so its crop never shows the target.
    assert not boxes_overlap(decoy_box.as_list(), target_box.as_list())
    for decoy_first in (True, False):
        example = builder.fused(p, None, "ACE", decoy_first=decoy_first)
        boxes = [decoy_box, target_box] if decoy_first else [target_box, decoy_box]
        st = engine.new_state(
            item.image, item.question, AskOptions(min_pixels=MICRO.min_pixels, max_pixels=MICRO.max_pixels)
        )
        engine.prepare([st])
        engine.encode([st])
        engine.prefill([st])
        engine.zoom([st], [engine.proposal_from_grid_boxes(st, boxes)])
        n = st.input_ids.shape[0]
        assert torch.equal(example.input_ids[:n], st.input_ids)
        assert torch.allclose(example.positions[:, :n], st.positions)
        assert len(example.grids) == len(example.image_keys) == 3
        aimed, other = (st.blocks[2], st.blocks[1]) if decoy_first else (st.blocks[1], st.blocks[2])
        assert example.target is not None
        crop_tokens = example.target[example.target >= st.blocks[0].end]
        assert crop_tokens.tolist() == list(range(aimed.start, aimed.end))
        for _, tokens in example.pointer or []:
            assert ((tokens >= aimed.start) & (tokens < aimed.end)).all()
        assert not ((example.target >= other.start) & (example.target < other.end)).any()
    # `make` adds the decoy to the share of fused examples it is told, and none at 0.
    rng = random.Random(1)
    assert all(len(builder.make(p, "fused", rng, (112, 448)).grids) == 2 for _ in range(5))
    builder.decoy_frac = 1.0
    assert all(len(builder.make(p, "fused", rng, (112, 448)).grids) == 3 for _ in range(5))


def test_collate_pads_right_and_keeps_image_order():
    model, processor = build_demo_model(MICRO)
    engine = QZoomEngine(model, processor)
    builder = ExampleBuilder(engine, MICRO.min_pixels, MICRO.max_pixels)
    rng = random.Random(0)
    pools = [pool_item(generate_item("train", i), MICRO.min_pixels, MICRO.max_pixels, 448) for i in (0, 5)]
    examples = [builder.make(pools[0], "fused", rng, (112, 168)), builder.make(pools[1], "coarse", rng, (112, 168))]
    batch = collate(examples, engine.pad_id)
    lengths = [e.input_ids.shape[0] for e in examples]
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert batch["image_grid_thw"].shape[0] == 3  # coarse + crop of the first, coarse of the second
    assert torch.equal(batch["pixel_values"][: examples[0].pixel_values[0].shape[0]], examples[0].pixel_values[0])


def test_frozen_tower_features_give_the_stock_forward_and_are_reused_for_pooled_views():
    model, processor = build_demo_model(MICRO)
    model.requires_grad_(False)
    engine = QZoomEngine(model, processor)
    builder = ExampleBuilder(engine, MICRO.min_pixels, MICRO.max_pixels)
    rng = random.Random(0)
    detail = pool_item(generate_item("train", 0, families=("letter",)), MICRO.min_pixels, MICRO.max_pixels, 448)
    coarse = pool_item(generate_item("train", 1, families=("count",)), MICRO.min_pixels, MICRO.max_pixels, 448)
    examples = [
        builder.make(detail, "fused", rng, (112, 168)),  # coarse view (kept) + a crop drawn afresh
        builder.make(coarse, "fused", rng, (112, 168)),  # coarse view + the item's fixed zoom crop (both kept)
        builder.make(detail, "crop", rng, (112, 168)),
        builder.make(coarse, "coarse", rng, (112, 168)),
    ]
    keys = image_keys(examples)
    uid_d, uid_c = detail.item.uid, coarse.item.uid
    assert keys == [f"{uid_d}:coarse", None, f"{uid_c}:coarse", f"{uid_c}:zoom", None, f"{uid_c}:coarse"]
    batch = collate(examples, engine.pad_id)
    tower = FrozenTowerFeatures(model, capacity=8)
    with torch.no_grad():
        stock, _ = answer_loss_and_hits(model, batch)
        first, _ = answer_loss_and_hits(model, batch, tower.inputs_embeds(batch, keys))
        again, _ = answer_loss_and_hits(model, batch, tower.inputs_embeds(batch, keys))
    torch.testing.assert_close(first, stock, atol=1e-5, rtol=1e-5)
    assert torch.equal(again, first)
    # The first call computed all six (the repeated coarse view too: it was not kept yet), the second only the two
    # images drawn afresh.
    assert (tower.hits, tower.misses) == (4, 8)
    assert list(tower.kept) == [f"{uid_d}:coarse", f"{uid_c}:zoom", f"{uid_c}:coarse"]  # least recently used first
    small = FrozenTowerFeatures(model, capacity=1)
    small.image_features(batch, keys)
    assert list(small.kept) == [f"{uid_c}:coarse"]  # the least recently used went first
    with pytest.raises(ValueError, match="5 image keys for 6 images"):
        tower.image_features(batch, keys[:-1])


@pytest.mark.parametrize(
    ("family", "answer"), [("letter", "K"), ("code", "7EA"), ("shape", "cross"), ("pattern", "checker")]
)
def test_reading_targets_mark_the_tokens_that_show_each_glyph(family, answer):
    model, processor = build_demo_model(MICRO)
    builder = ExampleBuilder(QZoomEngine(model, processor), MICRO.min_pixels, MICRO.max_pixels)
    item = generate_item("train", 11, families=(family,))
    plate = item.scene.plates[item.scene.target or 0]
    p = pool_item(item, MICRO.min_pixels, MICRO.max_pixels, reach=448)
    example = builder.crop(p, 448, random.Random(1), answer)  # wider than the card: some tokens lie off it
    assert example.reading is not None
    _, gh, gw = (int(v) // m for v, m in zip(example.grids[0], (1, 2, 2), strict=True))
    assert example.reading.shape == (gh * gw, len(READ_CLASSES))
    what = READ_GROUPS[0]
    marked = [(t, READ_CLASSES[c]) for t, c in example.reading.nonzero().tolist()]
    shown = [(t, name) for t, name in marked if name in what]
    values = [answer] if family in ("shape", "pattern") else list(answer)
    assert sorted(name for _, name in shown) == sorted(values)
    # Each marked token's 28x28 cell of the crop holds ink of the detail (dark pixels on the light plate).
    pixels = example.pixel_values[0].reshape(gh * gw, -1)  # 4 patches of one merged token per row, normalised
    for token, _ in shown:
        assert pixels[token].min() < -1.0  # CLIP-normalised ink (22 of 255) is about -1.5; the plate is about 1.8
    # Glyphs of a code carry their place in it, on the same token, left to right; other details carry none.
    places = sorted((name, t) for t, name in marked if name.startswith("glyph "))
    if family == "code":
        assert [t for _, t in places] == [t for t, name in sorted(shown, key=lambda tn: answer.index(tn[1]))]
        assert [t % gw for _, t in places] == sorted(t % gw for _, t in places)
    else:
        assert places == []
    # The plate's colour on the tokens over its card (every token with a glyph among them), and on nothing else.
    on = {t for t, name in marked if name.startswith("on ")}
    assert {name for t, name in marked if name.startswith("on ")} == {f"on {plate.colour}"}
    assert {t for t, _ in shown} <= on and len(on) < gh * gw


@pytest.mark.parametrize("side", [56, 84, 140])
def test_crops_are_whole_tokens_so_the_processor_does_not_resample_them(side):
    model, processor = build_demo_model(MICRO)
    builder = ExampleBuilder(QZoomEngine(model, processor), MICRO.min_pixels, MICRO.max_pixels)
    for index in range(6):  # plates of every kind, some wider than the smaller sides asked for
        item = generate_item("train", index, families=("code", "letter", "shape", "pattern"))
        example = builder.crop(pool_item(item, MICRO.min_pixels, MICRO.max_pixels, reach=300), side, random.Random(0))
        _, gh, gw = example.grids[0].tolist()
        x0, y0, x1, y1 = item.content_box
        # Grid of 14 px patches == the crop's own size / 14: no resize happened, and the whole detail is inside.
        assert gh * 14 >= y1 - y0 and gw * 14 >= x1 - x0 and gh * 14 % 28 == 0 and gw * 14 % 28 == 0
        assert gh * 14 >= side - 14 and gw * 14 >= side - 14


def test_a_zoomed_out_crop_shows_more_of_the_canvas_at_the_same_side():
    model, processor = build_demo_model(MICRO)
    builder = ExampleBuilder(QZoomEngine(model, processor), MICRO.min_pixels, MICRO.max_pixels)
    item = generate_item("train", 2, families=("letter",))
    p = pool_item(item, MICRO.min_pixels, MICRO.max_pixels, reach=448)
    native = builder.crop(p, 112, None, "K")
    zoomed = builder.crop(p, 112, None, "K", zoom=2.0)
    assert native.grids[0].tolist() == zoomed.grids[0].tolist() == [1, 8, 8]  # 112 px either way

    # The letter is half as tall in the zoomed-out crop, and still marked on the token that shows its ink.
    def ink_rows(example) -> int:
        pixels = example.pixel_values[0].reshape(-1, 3, 2, 14, 14)[:, 0, 0]  # channel 0 of the first frame
        return int((pixels.amin(dim=-1) < -1.0).sum())

    assert ink_rows(zoomed) < 0.7 * ink_rows(native)
    assert zoomed.reading is not None
    marked = [READ_CLASSES[c] for _, c in zoomed.reading.nonzero().tolist()]
    assert "K" in marked


def test_reading_drills_mark_what_they_draw_on_the_token_that_shows_it():
    rng = random.Random(0)
    seen = set()
    colours = set()
    for _ in range(60):
        side = rng.choice((56, 84))
        image, targets = reading_drill(rng, side, rng.choice((1.0, 1.5, 2.0)))  # native or downscaled
        g = side // 28
        assert image.size == (side, side) and targets.shape == (g * g, len(READ_CLASSES))
        dark = np.asarray(image.convert("L")) < 128
        marked = [(t, READ_CLASSES[c]) for t, c in targets.nonzero().tolist()]
        for token, name in marked:
            if name in READ_GROUPS[0]:
                row, col = divmod(token, g)
                assert dark[row * 28 : (row + 1) * 28, col * 28 : (col + 1) * 28].any()  # the token shows ink
                seen.add(name)
        # Every token is on the card, and the card is the colour its tokens are marked with.
        on = {name for _, name in marked if name.startswith("on ")}
        assert len(on) == 1 and sum(name.startswith("on ") for _, name in marked) == g * g
        colour = on.pop().removeprefix("on ")
        pixels = np.asarray(image).reshape(-1, 3).astype(int)  # the card's fill, give or take the bicubic resize
        assert (np.abs(pixels - np.array(plate_fill(colour))).max(axis=1) <= 3).any()
        colours.add(colour)
        places = [name for _, name in marked if name.startswith("glyph ")]
        assert len(places) == len(set(places))  # a glyph's place in its code is marked once at most
        if not any(name in READ_GROUPS[0] for _, name in marked):  # a code that ran off the image entirely is
            assert not dark[4:-4, 4:-4].any()  # rare but allowed; never ink unmarked
    assert {"circle", "checker"} & seen and len(seen) > 12  # every kind of detail comes up
    assert len(colours) >= 5  # and plates of every colour
    image_a, targets_a = reading_drill(random.Random(7), 84)
    image_b, targets_b = reading_drill(random.Random(7), 84)
    assert image_a.tobytes() == image_b.tobytes() and torch.equal(targets_a, targets_b)


@pytest.mark.parametrize("family", ["letter", "colour", "count"])
def test_coarse_views_mark_each_token_with_the_colour_and_kind_of_object_under_it(family):
    recipe = BaseRecipe()
    item = generate_item("train", 3, seed=0, families=(family,), min_side=896, max_side=4096)
    p = pool_item(item, recipe.min_pixels, recipe.max_pixels, reach=recipe.crop_max)
    targets = coarse_reading_targets(p)
    gh, gw = p.grid_hw
    assert targets.shape == (gh * gw, len(READ_CLASSES))
    scene = item.scene

    def token_at(x: float, y: float) -> int:  # canvas pixels -> row-major coarse token
        return int(y * gh / scene.canvas[1]) * gw + int(x * gw / scene.canvas[0])

    def marks(token: int) -> set[str]:
        return {READ_CLASSES[c] for c in targets[token].nonzero()[:, 0].tolist()}

    # Each family's scene has the kind of object its question is about: plates, a large region, large frames.
    assert {"letter": scene.plates, "colour": scene.regions, "count": scene.frames}[family]
    for plate in scene.plates:
        x0, y0, x1, y1 = plate.box
        assert marks(token_at((x0 + x1) / 2, (y0 + y1) / 2)) == {f"on {plate.colour}", "is plate"}
    for region in scene.regions:
        x0, y0, x1, y1 = region.box
        assert marks(token_at((x0 + x1) / 2, (y0 + y1) / 2)) == {f"on {region.colour}", "is region"}
    for frame in scene.frames:  # a hollow ring: marked along it, not inside
        x0, y0, x1, y1 = frame.box
        assert marks(token_at((x0 + x1) / 2, (y0 + y1) / 2)) == set()
        ring = [t for t in range(gh * gw) if marks(t) == {f"on {frame.colour}", "is frame"}]
        assert len(ring) >= 4
    # Only the colour and kind groups are marked (no glyph can be read there), and most of the view is background.
    glyph_columns = len(READ_GROUPS[0]) + len(READ_GROUPS[1])
    assert COARSE_READ_GROUPS == (2, 3) and not targets[:, :glyph_columns].any()
    assert 0 < int(targets.any(-1).sum()) < gh * gw // 2


def test_reading_loss_weighs_marked_and_empty_tokens_alike_and_splits_two_glyphs():
    hidden = 8
    reader = torch.nn.Linear(hidden, READ_LOGITS)
    torch.nn.init.zeros_(reader.weight)
    torch.nn.init.zeros_(reader.bias)
    marks = torch.zeros(5, len(READ_CLASSES))
    marks[0, 3] = 1.0
    marks[1, [2, 4]] = 1.0  # two glyph centres on one token: half each
    batch = {"reading": marks, "reading_mask": torch.tensor([True, True, True, True, False])}
    merged = torch.zeros(5, hidden)
    n_what = len(READ_GROUPS[0]) + 1
    others = sum(np.log(len(group) + 1) for group in READ_GROUPS[1:])  # nothing marked there: one mean each
    # Uniform logits: every token costs log(classes + 1) in its group; "what" has both means, the others one.
    assert _reading_loss(reader, merged, batch).item() == pytest.approx(2 * np.log(n_what) + others, rel=1e-5)
    # Class 2 raised by 2 (partition Z = e^2 + n_what - 1): the two-glyph token pays log Z - 1 (half its target on
    # class 2), the one-glyph and the empty tokens log Z each: (2 log Z - 1) / 2 + log Z.
    with torch.no_grad():
        reader.bias[2] = 2.0
    z = np.exp(2.0) + n_what - 1
    assert _reading_loss(reader, merged, batch).item() == pytest.approx(2 * np.log(z) - 0.5 + others, rel=1e-5)
    # A token marked in a later group pays there: its group's logits start one "nothing" further on per group.
    colour = READ_CLASSES.index("on red")
    marks[0, colour] = 1.0
    with torch.no_grad():
        reader.bias[colour + 2] = 5.0  # the colour group is the third: its logits are shifted by two "nothing"s
    colour_only = {"reading": marks[:1], "reading_mask": torch.tensor([True])}
    n_colour = len(READ_GROUPS[2]) + 1
    colour_cost = np.log(np.exp(5.0) + n_colour - 1) - 5.0
    expected = np.log(z) + np.log(len(READ_GROUPS[1]) + 1) + colour_cost + np.log(len(READ_GROUPS[3]) + 1)
    assert _reading_loss(reader, merged[:1], colour_only).item() == pytest.approx(expected, rel=1e-5)
    # Scoring only some groups (coarse views mark no glyphs): the other groups cost nothing, marked or not.
    assert _reading_loss(reader, merged[:1], colour_only, groups=(2,)).item() == pytest.approx(colour_cost, rel=1e-5)
    assert _reading_loss(reader, merged[:1], colour_only, groups=(2, 3)).item() == pytest.approx(
        colour_cost + np.log(len(READ_GROUPS[3]) + 1), rel=1e-5
    )
    # A batch with no labelled token costs nothing.
    none = {"reading": marks, "reading_mask": torch.zeros(5, dtype=torch.bool)}
    assert _reading_loss(reader, merged, none).item() == 0.0


def test_collate_marks_reading_targets_of_crops_only():
    model, processor = build_demo_model(MICRO)
    engine = QZoomEngine(model, processor)
    builder = ExampleBuilder(engine, MICRO.min_pixels, MICRO.max_pixels)
    rng = random.Random(0)
    p = pool_item(generate_item("train", 0, families=("letter",)), MICRO.min_pixels, MICRO.max_pixels, 448)
    crop, fused = builder.make(p, "crop", rng, (112, 140)), builder.make(p, "fused", rng, (112, 140))
    batch = collate([fused, crop], engine.pad_id)
    n_tokens = [int(g.prod()) // 4 for g in batch["image_grid_thw"]]
    assert batch["reading"].shape[0] == sum(n_tokens) == batch["reading_mask"].shape[0]
    assert batch["reading_mask"].tolist() == [False] * (n_tokens[0] + n_tokens[1]) + [True] * n_tokens[2]
    assert torch.equal(batch["reading"][-n_tokens[2] :], crop.reading)


def test_whole_view_batches_show_small_scenes_whole_and_coarse_families_at_the_budget():
    # A whole-view step: detail questions on small canvases seen whole (the named plate among others, 1-3x below
    # native scale), or coarse questions on the coarse view; never crops, so the batch has one sequence length class.
    recipe = dataclasses.replace(MICRO, scene_frac=1.0, scene_batch_size=8, pool_size=4)
    model, processor = build_demo_model(recipe)
    engine = QZoomEngine(model, processor)
    builder = ExampleBuilder(engine, recipe.min_pixels, recipe.max_pixels)
    sides = (recipe.scene_min_side, recipe.scene_max_side)
    pools = {
        "detail": ItemPool(recipe, ("letter",), 0, "detail", progress=False),
        "coarse": ItemPool(recipe, ("colour", "count"), 100, "coarse", progress=False),
        "scene": ItemPool(recipe, ("code", "letter"), 200, "scene", progress=False, sides=sides),
    }
    assert all(min(p.item.canvas) >= sides[0] and max(p.item.canvas) <= sides[1] for p in pools["scene"].items)
    batch = _draw_batch(builder, pools, random.Random(3), recipe, mixed=False)
    assert len(batch) == 8 and {e.view for e in batch} == {"coarse"}
    families = {e.family for e in batch}
    assert families & {"code", "letter"} and families & {"colour", "count"}
    for e in batch:
        _, gh, gw = (int(v) for v in e.grids[0])
        assert gh * gw // 4 <= 256 and e.reading is None
        if e.family in ("code", "letter"):  # a 448-1344 px canvas at the 256-token budget: at most 3x smaller
            assert min(gh, gw) * 14 >= sides[0] / (sides[1] / 448)
    assert all(len(p.item.scene.plates) >= 2 for p in pools["scene"].items)  # the question has to pick one
    # The start of phase 1: crops of the one-thing plates only, whole-view steps or not.
    pools["detail"] = ItemPool(recipe, ("code", "letter", "shape"), 300, "mixed", progress=False)
    singles = _draw_batch(builder, pools, random.Random(3), recipe, mixed=False, singles_only=True)
    assert len(singles) == recipe.batch_size and {e.view for e in singles} == {"crop"}
    assert {e.family for e in singles} <= {"letter", "shape"}


def test_ground_phase_mixes_its_coarse_views_with_reading_batches():
    # Its own batches (ground loss weights): coarse views of detail and coarse questions, the detail targets marked.
    # The rest: mixed-phase batches, whose crops and fused sequences keep the model reading.
    recipe = dataclasses.replace(MICRO, scene_frac=0.0, mixed_batch_size=12, pool_size=4, mix_crop=0.5, mix_fused=0.5)
    model, processor = build_demo_model(recipe)
    builder = ExampleBuilder(QZoomEngine(model, processor), recipe.min_pixels, recipe.max_pixels)
    pools = {
        "detail": ItemPool(recipe, ("letter",), 0, "detail", progress=False),
        "coarse": ItemPool(recipe, ("colour", "count"), 100, "coarse", progress=False),
    }
    own = dataclasses.replace(recipe, ground_mixed_frac=0.0)
    batch, is_own = _ground_phase_batch(builder, pools, random.Random(1), own)
    assert is_own and len(batch) == 12 and {e.view for e in batch} == {"coarse"}
    assert {e.family for e in batch} == {"letter", "colour", "count"}
    assert all((e.target is not None) == (e.family == "letter") for e in batch)
    mixed = dataclasses.replace(recipe, ground_mixed_frac=1.0)
    batch, is_own = _ground_phase_batch(builder, pools, random.Random(1), mixed)
    assert not is_own and {e.view for e in batch} == {"crop", "fused"}
    rng = random.Random(2)
    half = dataclasses.replace(recipe, ground_mixed_frac=0.5)
    owns = [_ground_phase_batch(builder, pools, rng, half)[1] for _ in range(12)]
    assert 0 < sum(owns) < 12
    # Unreadable answers (the detail questions' coarse views) take their own answer weight; the rest keep 1.
    quiet = dataclasses.replace(own, unreadable_answer_weight=0.0)
    batch, _ = _ground_phase_batch(builder, pools, random.Random(1), quiet)
    assert [e.answer_weight for e in batch] == [0.0 if e.family == "letter" else 1.0 for e in batch]
    assert collate(batch, builder.engine.pad_id)["answer_weight"].tolist() == [e.answer_weight for e in batch]


def test_code_phase_draws_crops_and_fused_sequences_of_codes_only():
    recipe = dataclasses.replace(MICRO, mixed_batch_size=6, pool_size=6)
    model, processor = build_demo_model(recipe)
    builder = ExampleBuilder(QZoomEngine(model, processor), recipe.min_pixels, recipe.max_pixels)
    pool = ItemPool(recipe, ("code", "letter", "code_at"), 0, "detail", progress=False)
    batch = _code_phase_batch(builder, pool, random.Random(4), recipe)
    assert [e.view for e in batch] == ["crop", "fused"] * 3
    assert {e.family for e in batch} <= {"code", "code_at"}
    # Each shows a fresh code on the target (the pool holds two code items; the answers are drawn anew each time), and
    # the pointer targets are set for every glyph of it.
    tokenizer = processor.tokenizer
    answers = [tokenizer.decode(e.input_ids[e.labels != -100], skip_special_tokens=True) for e in batch]
    assert len(set(answers)) > 2 and all(len(a) == 3 for a in answers)
    assert all(e.pointer is not None and len(e.pointer) == 3 for e in batch)
    letters = ItemPool(recipe, ("letter",), 0, "letters", progress=False)
    with pytest.raises(ValueError, match="needs code items"):
        _code_phase_batch(builder, letters, random.Random(4), recipe)


def test_answer_loss_weighs_each_sample_and_counts_every_scored_token():
    model, processor = build_demo_model(MICRO)
    engine = QZoomEngine(model, processor)
    builder = ExampleBuilder(engine, MICRO.min_pixels, MICRO.max_pixels)
    rng = random.Random(0)
    examples = [builder.drill(*answer_drill(rng, 0.0)) for _ in range(2)]
    batch = collate(examples, engine.pad_id)
    with torch.no_grad():
        logits = model(**model_inputs(batch)).logits[:, :-1].float()
        target = batch["labels"][:, 1:]
        tokens = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="none")
        plain, hits = answer_loss_and_hits(model, batch)  # weights 1: the mean over scored tokens
        first_only, _ = answer_loss_and_hits(model, {**batch, "answer_weight": torch.tensor([1.0, 0.0])})
        none, _ = answer_loss_and_hits(model, {**batch, "answer_weight": torch.zeros(2)})
    scored = target != -100
    assert plain.item() == pytest.approx(tokens[scored].mean().item(), rel=1e-5)
    assert first_only.item() == pytest.approx(tokens[0][scored[0]].sum().item() / scored.sum().item(), rel=1e-5)
    assert none.item() == 0.0 and hits.shape == (2,)


def test_answer_drills_ask_about_one_of_one_or_two_plates_drawn_as_in_a_scene():
    rng = random.Random(0)
    pairs = 0
    for _ in range(40):
        image, question, answer, family, box = answer_drill(rng, pair_frac=0.5)
        plate = image.crop(box)
        assert COLOURS[question.split()[-2]] == plate.getpixel((0, 0))  # the box is the named plate's border
        assert image.width % 28 == 0 and image.height % 28 == 0 and image.width * image.height <= 14 * 28 * 28 * 4
        assert question == TEMPLATES[family].format(colour=question.split()[-2])
        colour = question.split()[-2]
        pixels = {tuple(int(v) for v in p) for p in np.asarray(image).reshape(-1, 3)}
        # The named plate is there (its border and tinted card); a second plate has another colour.
        assert COLOURS[colour] in pixels and plate_fill(colour) in pixels
        others = [c for c in COLOURS if c != colour and COLOURS[c] in pixels]
        assert len(others) <= 1
        pairs += len(others)
        assert answer in ANSWER_VOCAB[family]
    assert 10 <= pairs <= 30  # about half the drills show two plates
    a, b = answer_drill(random.Random(5), 0.5), answer_drill(random.Random(5), 0.5)
    assert a[0].tobytes() == b[0].tobytes() and a[1:] == b[1:]


def test_quadrant_drills_name_the_code_plate_by_the_quadrant_it_lies_in():
    rng = random.Random(3)
    seen = 0
    for _ in range(80):
        image, question, answer, family, box = answer_drill(rng, pair_frac=1.0, position_frac=1.0)
        if family != "code_at":
            assert family != "code"  # every pair of codes is a quadrant pair at position_frac 1
            continue
        seen += 1
        assert image.width % 28 == 0 and image.height % 28 == 0
        position = next(name for name in POSITIONS if f"the {name} frame" in question)
        assert question == TEMPLATES["code_at"].format(position=position)
        quadrant = POSITIONS.index(position)
        half_w, half_h = image.width // 2, image.height // 2
        col, row = quadrant % 2, quadrant // 2
        # The named plate lies wholly inside its quadrant; the other plate's border colour lies outside it.
        assert col * half_w <= box[0] and box[2] <= (col + 1) * half_w
        assert row * half_h <= box[1] and box[3] <= (row + 1) * half_h
        own = image.getpixel((box[0], box[1]))
        pixels = np.asarray(image)
        other = [c for c in COLOURS.values() if c != own and np.all(pixels == np.array(c, np.uint8), -1).any()]
        assert len(other) == 1
        ys, xs = np.nonzero(np.all(pixels == np.array(other[0], np.uint8), -1))
        other_quadrant = 2 * int(ys.mean() >= half_h) + int(xs.mean() >= half_w)
        assert other_quadrant != quadrant
        assert answer in ANSWER_VOCAB["code_at"]
    assert seen >= 10
    # By default (and at 0) the pairs of codes are named by colour.
    assert all(answer_drill(rng, 1.0)[3] != "code_at" for _ in range(40))


def test_answer_drills_draw_the_answer_on_the_named_plate():
    # Reading the plate of the named colour with the benchmark's own renderer gives the answer: find the plate's
    # border box and compare its pixels with render_plate of the answer at every size and padding it could have.
    rng = random.Random(2)
    for _ in range(12):
        image, question, answer, family, _ = answer_drill(rng, pair_frac=1.0)
        colour = question.split()[-2]
        border = np.all(np.asarray(image) == np.array(COLOURS[colour], dtype=np.uint8), axis=-1)
        ys, xs = np.nonzero(border)
        plate = image.crop((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1))
        kind = family
        sizes = range(10, 40)
        matches = [
            (size, b, pad)
            for size in sizes
            for b in range(3, 7)
            for pad in range(5, 10)
            if render_plate(kind, answer, size, colour, border=b, pad=pad).tobytes() == plate.tobytes()
        ]
        assert matches, (question, answer)


def test_the_grounding_probe_sees_the_attention_the_model_computes():
    # The probe's logits, softmaxed under the causal and padding mask, are the stock eager attention weights of
    # that head, on a padded batch of a crop, a coarse view and a fused sequence.
    model, processor = build_demo_model(MICRO)
    model.config._attn_implementation = "eager"
    model.config.text_config._attn_implementation = "eager"
    engine = QZoomEngine(model, processor)
    builder = ExampleBuilder(engine, MICRO.min_pixels, MICRO.max_pixels)
    rng = random.Random(0)
    p = pool_item(generate_item("train", 2, families=("code",)), MICRO.min_pixels, MICRO.max_pixels, 448)
    batch = collate([builder.make(p, view, rng, (112, 140)) for view in ("crop", "coarse", "fused")], engine.pad_id)
    heads = ((1, 1), (3, 0))
    probe = GroundingProbe(engine, heads)
    with torch.no_grad():
        out = model(**model_inputs(batch), output_attentions=True)
    probe.remove()
    valid = batch["attention_mask"].bool()  # rows of padding are not compared
    sample, row = valid.nonzero(as_tuple=True)
    allowed = (torch.arange(valid.shape[1])[None, :] <= row[:, None]) & valid[sample]
    for (layer, head), probed in zip(heads, probe.heads, strict=True):
        probs = probed.logits(sample, row).masked_fill(~allowed, float("-inf")).softmax(-1)
        real = out.attentions[layer][:, head]
        assert torch.allclose(probs, real[sample, row], atol=1e-5)
    with pytest.raises(ValueError, match="not in this model"):
        GroundingProbe(engine, ((4, 0),))


def _given(*logits: torch.Tensor) -> list[ProbedHead]:
    """Hand-made attention logits ``(B, n, n)`` as probed heads: the logits as queries, the identity as keys."""
    return [ProbedHead(lg, torch.eye(lg.shape[-1]).expand_as(lg), 1.0) for lg in logits]


def test_grounding_loss_is_the_log_share_of_image_attention_off_the_target():
    # Two samples of 6 tokens: [text, img, img, img, img, answer-predicting text, answer]; targets on tokens 1-2.
    image_id = 7
    ids = torch.tensor([[1, 7, 7, 7, 7, 2, 3], [1, 7, 7, 7, 7, 2, 3]])
    labels = torch.full_like(ids, -100)
    labels[:, 6] = 3  # position 5 predicts the answer token
    ground = torch.zeros_like(ids, dtype=torch.bool)
    ground[0, 1:3] = True
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids), "ground": ground}
    uniform = torch.zeros(2, 7, 7)
    # Even over 4 image tokens, 2 of them the target: log 2. The second sample marks no target: not counted.
    assert _grounding_loss(_given(uniform), batch, image_id).item() == pytest.approx(np.log(2.0), rel=1e-5)
    focused = uniform.clone()
    focused[:, 5, 1:3] = 20.0  # the answer-predicting row looks at the target
    assert _grounding_loss(_given(focused), batch, image_id).item() == pytest.approx(0.0, abs=1e-6)
    # Mass on text tokens does not count against the target: only the image share matters.
    on_text = uniform.clone()
    on_text[:, 5, 0] = 20.0
    assert _grounding_loss(_given(on_text), batch, image_id).item() == pytest.approx(np.log(2.0), rel=1e-4)
    # Averaged over heads; nothing marked, nothing owed.
    assert _grounding_loss(_given(uniform, focused), batch, image_id).item() == pytest.approx(np.log(2.0) / 2, rel=1e-5)
    none = {**batch, "ground": torch.zeros_like(ground)}
    assert _grounding_loss(_given(uniform), none, image_id).item() == 0.0


def _full_matrix_share_loss(heads, batch, image_id, targets, rows):
    """The attention share loss as written before it computed rows only: every head's whole (B, n, n) logits."""
    n = rows.shape[1]
    allowed = torch.ones(n, n, dtype=torch.bool).tril()[None] & batch["attention_mask"].bool()[:, None, :]
    image = (batch["input_ids"] == image_id).float()[:, None, :]
    loss = torch.zeros(())
    for head in heads:
        logits = torch.matmul(head.query, head.key.transpose(-2, -1)) * head.scaling
        probs = logits.masked_fill(~allowed, float("-inf")).softmax(-1)
        share = (probs * targets.float()).sum(-1) / (probs * image).sum(-1).clamp_min(1e-9)
        loss = loss - share[rows].clamp_min(1e-6).log().mean()
    return loss / len(heads)


def test_the_share_loss_of_probed_rows_equals_that_of_the_full_logits():
    # The probe computes only the rows that count; loss and gradients are those of the whole (B, n, n) logits, on a
    # padded batch whose samples have different numbers of rows (one none), for targets per row and per sample.
    torch.manual_seed(0)
    b, n, hd, image_id = 3, 12, 8, 7
    ids = torch.full((b, n), 7)
    ids[:, :2] = 1
    mask = torch.ones(b, n, dtype=torch.long)
    mask[1, 9:] = 0
    pointer = torch.zeros(b, n, n, dtype=torch.bool)
    pointer[0, 8, 3] = pointer[0, 10, 4] = pointer[1, 6, 4] = pointer[1, 8, 5] = True
    batch = {"input_ids": ids, "attention_mask": mask, "pointer": pointer}
    query = torch.randn(b, n, hd, requires_grad=True)
    key = torch.randn(b, n, hd, requires_grad=True)
    ground = torch.zeros(b, 1, n, dtype=torch.bool)
    ground[:, 0, 3:6] = True
    for targets in (pointer, ground):
        losses, grads = [], []
        for share_loss in (_attention_share_loss, _full_matrix_share_loss):
            loss = share_loss([ProbedHead(query, key, 0.5)], batch, image_id, targets, pointer.any(-1))
            query.grad = key.grad = None
            loss.backward()
            losses.append(loss.item())
            grads.append((query.grad.clone(), key.grad.clone()))
        assert losses[0] > 0.1 and losses[0] == pytest.approx(losses[1], rel=1e-6)
        for probed, full in zip(grads[0], grads[1], strict=True):
            assert probed.abs().max() > 0 and torch.allclose(probed, full, atol=1e-6)


def _pointed_cells(example, gw, start):
    """(answer character, (row, column) of each token it points at), in answer order."""
    first = int(torch.nonzero(example.labels != -100)[0, 0])
    answer = example.input_ids[first:].tolist()
    return [(answer[row - first + 1], [divmod(int(t) - start, gw) for t in tokens]) for row, tokens in example.pointer]


@pytest.mark.parametrize(
    ("family", "answer"), [("code", "7EA"), ("code_at", "HX4"), ("letter", "K"), ("shape", "cross")]
)
def test_crops_point_each_answer_character_at_the_token_that_shows_it(family, answer):
    model, processor = build_demo_model(MICRO)
    engine = QZoomEngine(model, processor)
    builder = ExampleBuilder(engine, MICRO.min_pixels, MICRO.max_pixels)
    p = pool_item(generate_item("train", 11, families=(family,)), MICRO.min_pixels, MICRO.max_pixels, reach=448)
    example = builder.crop(p, 168, random.Random(1), answer)
    _, gh, gw = (int(v) // m for v, m in zip(example.grids[0], (1, 2, 2), strict=True))
    start = int(torch.nonzero(example.input_ids == engine.image_token_id)[0, 0])
    cells = _pointed_cells(example, gw, start)
    # One row per answer character (not <|im_end|>), each on one token of the crop.
    assert len(cells) == len(answer) and all(len(where) == 1 for _, where in cells)
    tokens = [where[0] for _, where in cells]
    assert all(0 <= r < gh and 0 <= c < gw for r, c in tokens)
    # The token holds ink (the detail), as the reading head's marks say.
    pixels = example.pixel_values[0].reshape(gh * gw, -1)
    assert all(pixels[r * gw + c].min() < -1.0 for r, c in tokens)
    if family.startswith("code"):  # a code's glyphs in order, left to right on one row
        assert len({r for r, _ in tokens}) == 1 and [c for _, c in tokens] == sorted({c for _, c in tokens})
    else:  # a one-thing answer: every character reads the one token
        assert len(set(tokens)) == 1
    # The pointers are the reading marks' tokens: a glyph's place for codes, the value for the rest.
    assert [p.tolist() for p in answer_pointers(example.reading, answer, family)] == [[r * gw + c] for r, c in tokens]


def test_answer_drills_point_into_the_named_plate_and_fused_sequences_into_the_crop():
    model, processor = build_demo_model(MICRO)
    engine = QZoomEngine(model, processor)
    builder = ExampleBuilder(engine, MICRO.min_pixels, MICRO.max_pixels)
    rng = random.Random(4)
    for _ in range(10):
        image, question, answer, family, box = answer_drill(rng, pair_frac=1.0)  # two plates: the other one is ink too
        example = builder.drill(image, question, answer, family, box)
        gw = image.width // 28
        start = int(torch.nonzero(example.input_ids == engine.image_token_id)[0, 0])
        cells = _pointed_cells(example, gw, start)
        assert len(cells) == len(answer)
        for _, where in cells:
            for r, c in where:  # the token's centre lies on the asked-about plate
                assert box[0] - 14 <= (c + 0.5) * 28 < box[2] + 14 and box[1] - 14 <= (r + 0.5) * 28 < box[3] + 14
    p = pool_item(generate_item("train", 5, families=("code",)), MICRO.min_pixels, MICRO.max_pixels, 448)
    example = builder.fused(p, random.Random(0), "ACE")
    coarse_end = builder._state(p.coarse, p.item.question).blocks[0].end  # the crop's tokens come after these
    rows = [row for row, _ in example.pointer]
    assert len(rows) == 3 and rows == sorted(rows) and rows[0] + 1 == int(torch.nonzero(example.labels != -100)[0, 0])
    for _, tokens in example.pointer:
        assert (tokens >= coarse_end).all() and (example.input_ids[tokens] == engine.image_token_id).all()
    # Coarse views and the coarse families point nowhere.
    assert builder.coarse(p).pointer is None
    colour = pool_item(generate_item("train", 6, families=("colour",)), MICRO.min_pixels, MICRO.max_pixels, 448)
    assert not builder.fused(colour, None).pointer


def test_pointer_loss_is_the_log_share_of_each_rows_image_attention_on_its_character():
    # One sample: [text, img x4, row predicting char 1, row predicting char 2, end]; char 1 at token 1, char 2 at 3.
    image_id = 7
    ids = torch.tensor([[1, 7, 7, 7, 7, 2, 3, 4]])
    pointer = torch.zeros(1, 8, 8, dtype=torch.bool)
    pointer[0, 5, 1] = True
    pointer[0, 6, 3] = True
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pointer": pointer}
    uniform = torch.zeros(1, 8, 8)
    assert _pointer_loss(_given(uniform), batch, image_id).item() == pytest.approx(np.log(4.0), rel=1e-5)
    right = uniform.clone()
    right[0, 5, 1] = right[0, 6, 3] = 20.0
    assert _pointer_loss(_given(right), batch, image_id).item() == pytest.approx(0.0, abs=1e-6)
    swapped = uniform.clone()
    swapped[0, 5, 3] = swapped[0, 6, 1] = 20.0  # reading the glyphs in the wrong order costs
    assert _pointer_loss(_given(swapped), batch, image_id).item() > 10.0
    # A row looking at its glyph pays nothing; the other row's share averages in.
    half = uniform.clone()
    half[0, 5, 1] = 20.0
    assert _pointer_loss(_given(half), batch, image_id).item() == pytest.approx(np.log(4.0) / 2, rel=1e-4)
    assert _pointer_loss(_given(uniform), {**batch, "pointer": torch.zeros_like(pointer)}, image_id).item() == 0.0


@pytest.mark.parametrize("family", sorted(DETAIL_FAMILIES))
def test_referent_is_the_colour_or_quadrant_the_question_names(family):
    for colour in COLOURS:
        for position in POSITIONS:
            question = TEMPLATES[family].format(colour=colour, position=position)
            named = position if family == "code_at" else colour
            assert REFERENTS[referent_of(question)] == named
    # Nothing named, or two names at once: no label.
    assert referent_of(TEMPLATES["colour"]) is None
    assert referent_of(TEMPLATES["count"]) is None
    assert referent_of("Is the red frame left of the blue frame?") is None


def test_examples_carry_the_referent_of_their_question_and_collate_keeps_it():
    model, processor = build_demo_model(MICRO)
    engine = QZoomEngine(model, processor)
    builder = ExampleBuilder(engine, MICRO.min_pixels, MICRO.max_pixels)
    detail = pool_item(generate_item("train", 5, families=("code_at",)), MICRO.min_pixels, MICRO.max_pixels, 448)
    coarse = pool_item(generate_item("train", 6, families=("count",)), MICRO.min_pixels, MICRO.max_pixels, 448)
    examples = [builder.coarse(detail), builder.coarse(coarse), builder.fused(detail, None)]
    target = detail.item.scene.plates[detail.item.scene.target]
    assert examples[0].referent == REFERENTS.index(POSITIONS[target.quadrant])
    assert examples[1].referent is None
    assert collate(examples, engine.pad_id)["referent"].tolist() == [examples[0].referent, -100, examples[0].referent]


def test_referent_drills_ask_a_detail_question_about_a_blank_image():
    rng = random.Random(0)
    names = set()
    for _ in range(60):
        image, question, answer, family = referent_drill(rng)
        assert image.size == (56, 56) and image.getcolors() == [(56 * 56, image.getpixel((0, 0)))]  # one grey
        assert family in DETAIL_FAMILIES and answer in ANSWER_VOCAB[family]
        assert question in {TEMPLATES[family].format(colour=c, position=p) for c in COLOURS for p in POSITIONS}
        names.add(referent_of(question))
    assert len(names) == len(REFERENTS)  # every colour and quadrant comes up


def test_referent_loss_reads_the_answer_positions_of_samples_that_name_something():
    # Two samples of 5 tokens; positions 2 and 3 predict the two answer tokens; the second sample names nothing.
    labels = torch.full((2, 5), -100)
    labels[:, 3:5] = 9
    batch = {"labels": labels, "referent": torch.tensor([4, -100])}
    hidden = torch.zeros(2, 5, 3)
    hidden[0, 2:4] = torch.tensor([1.0, 0.0, 0.0])  # the rows the loss reads
    hidden[0, 0:2] = torch.tensor([0.0, 1.0, 0.0])  # prompt rows: not read
    head = torch.nn.Linear(3, len(REFERENTS), bias=False)
    with torch.no_grad():
        head.weight.zero_()
        head.weight[4, 0] = 30.0  # the first feature says "referent 4"
    assert _referent_loss(head, hidden, batch).item() == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        head.weight[4, 0], head.weight[2, 0] = 0.0, 30.0  # now it says "referent 2"
    assert _referent_loss(head, hidden, batch).item() == pytest.approx(30.0, rel=1e-4)
    # Prompt rows and samples without a referent cost nothing; none at all: zero.
    with torch.no_grad():
        head.weight.zero_()
        head.weight[2, 1] = 30.0
    assert _referent_loss(head, hidden, batch).item() == pytest.approx(np.log(len(REFERENTS)), rel=1e-5)
    assert _referent_loss(head, hidden, {**batch, "referent": torch.tensor([-100, -100])}).item() == 0.0


def test_examples_mark_the_target_plate_for_grounding():
    model, processor = build_demo_model(MICRO)
    engine = QZoomEngine(model, processor)
    builder = ExampleBuilder(engine, MICRO.min_pixels, MICRO.max_pixels)
    rng = random.Random(0)
    item = generate_item("train", 4, families=("letter",))
    p = pool_item(item, MICRO.min_pixels, MICRO.max_pixels, 448)
    coarse = builder.make(p, "coarse", rng, (112, 140))
    # Coarse view: the cells under the plate's box, which hold its (downscaled) tinted card.
    assert coarse.target is not None and 1 <= len(coarse.target) <= 9
    assert (coarse.input_ids[coarse.target] == engine.image_token_id).all()
    h, w = (int(v) // 2 for v in coarse.grids[0][1:])
    start = int((coarse.input_ids == engine.image_token_id).nonzero()[0, 0])
    x0, y0, x1, y1 = item.box
    cx, cy = (x0 + x1) / 2 / item.canvas[0] * w, (y0 + y1) / 2 / item.canvas[1] * h
    assert start + int(cy) * w + int(cx) in coarse.target.tolist()
    # Crop: the plate's tokens; fused: the coarse cells and the zoomed crop; coarse families: nothing to find.
    crop = builder.make(p, "crop", rng, (112, 140))
    assert crop.target is not None and crop.reading is not None
    shows = {int(t) for t in crop.reading[:, : len(READ_GROUPS[0])].any(-1).nonzero()[:, 0]}
    first = int((crop.input_ids == engine.image_token_id).nonzero()[0, 0])
    assert shows and {first + t for t in shows} <= set(crop.target.tolist())
    fused = builder.make(p, "fused", rng, (112, 140))
    assert fused.target is not None and len(fused.target) > len(coarse.target)
    other = pool_item(generate_item("train", 5, families=("colour",)), MICRO.min_pixels, MICRO.max_pixels, 448)
    assert builder.make(other, "coarse", rng, (112, 140)).target is None
    batch = collate([coarse, crop], engine.pad_id)
    assert batch["ground"][0].nonzero()[:, 0].tolist() == coarse.target.tolist()


def test_the_vision_tower_stays_as_phase_0_left_it(tmp_path, monkeypatch):
    # Phase 0 replaced by a no-op: the saved tower is then exactly the seeded initial one, while the decoder moved.
    import qzoom.demo.base as base_module

    monkeypatch.setattr(base_module, "pretrain_reading", lambda *args, **kwargs: None)
    initial, _ = build_demo_model(MICRO)
    out = train_base(tmp_path / "frozen", MICRO, progress=False, log=lambda _: None)
    trained = QZoomEngine.from_pretrained(out).model
    for (name, before), after in zip(
        initial.model.visual.state_dict().items(), trained.model.visual.state_dict().values(), strict=True
    ):
        assert torch.equal(before, after), name
    lm_before = initial.model.language_model.layers[0].mlp.up_proj.weight
    assert not torch.equal(lm_before, trained.model.language_model.layers[0].mlp.up_proj.weight)
    thawed = train_base(
        tmp_path / "thawed", dataclasses.replace(MICRO, freeze_vision=False), progress=False, log=lambda _: None
    )
    tower = QZoomEngine.from_pretrained(thawed).model.model.visual.patch_embed.proj.weight
    assert not torch.equal(tower, initial.model.visual.patch_embed.proj.weight)


def test_train_base_writes_a_loadable_qzoom_checkpoint(micro_dir):
    engine = QZoomEngine.from_pretrained(micro_dir)
    assert engine.has_gate and engine.has_rpn
    assert engine.settings.max_pixels == MICRO.max_pixels and engine.settings.min_pixels == MICRO.min_pixels
    lm = engine.model.model.language_model
    # The branches start as copies of the layers above K (Stages 1 and 3 train them).
    assert torch.equal(lm.twig_layers[0].mlp.up_proj.weight, lm.layers[MICRO.twig_k].mlp.up_proj.weight)
    assert engine.model.config.qzoom_base_recipe["crop_steps"] == MICRO.crop_steps
    assert engine.model.config.qzoom_base_recipe["ground_steps"] == MICRO.ground_steps


def test_eval_demo_measures_every_configuration_on_the_same_items(micro_dir):
    report = evaluate_demo(uncached_engine(micro_dir), 7, budgets=(384,), chunk=4)
    assert set(report.runs) == {"coarse@256", "baseline@384", "qzoom@256", "forced@256", "gt-box@256"}
    assert all(len(r.correct) == 7 and r.seconds > 0 for r in report.runs.values())
    assert report.families == ["code", "code_at", "letter", "shape", "pattern", "colour", "count"]
    assert all(report.runs["forced@256"].zoomed) and not any(report.runs["coarse@256"].zoomed)
    # The answers were read beside boxes the SD-RPN proposed; on the ground-truth box it was not asked.
    forced = report.runs["forced@256"]
    assert all(b in proposed for bs, proposed in zip(forced.boxes, forced.proposed, strict=True) for b in bs)
    assert report.runs["gt-box@256"].proposed == [[]] * len(report.detail)
    # The diagnostic zooms once on the coarse cells around the ground-truth box: its box holds the whole target.
    runs = zip(report.runs["gt-box@256"].boxes, report.gt_boxes, report.image_sizes, report.detail, strict=True)
    for boxes, gt, (w, h), detail in runs:
        assert len(boxes) == 1
        assert box_contains(boxes[0], gt[:2]) and box_contains(boxes[0], (gt[2] - 2, gt[3] - 2))
        if detail:  # a plate's cells, not the whole image
            assert (boxes[0][2] - boxes[0][0]) * (boxes[0][3] - boxes[0][1]) < 0.5 * w * h
    assert max(report.runs["baseline@384"].visual_tokens) > max(report.runs["coarse@256"].visual_tokens)
    table = format_report(report)
    for target in TARGETS:
        assert target.name in table
    assert "median share of the image" in table


def test_model_card_states_the_numbers_the_command_and_the_targets_missed(micro_dir, tmp_path):
    report = evaluate_demo(uncached_engine(micro_dir), 7, budgets=(384,), chunk=7)
    model_dir = tmp_path / "card"
    model_dir.mkdir()
    (model_dir / "config.json").write_text((micro_dir / "config.json").read_text())
    card = write_model_card(model_dir, report, items=7, seed=0, budgets=(384,)).read_text()
    assert "`qzoom eval demo --items 7 --seed 0 --budgets 384`" in card and "`qzoom train demo OUT`" in card
    assert format_report(report) in card
    missed = [t.name for t in TARGETS if not t.met(report)]
    assert missed  # a random micro model meets no accuracy target
    status = card.split("## Status\n", 1)[1].split("\n## ", 1)[0]
    assert all(name in status for name in missed)
    assert not any(t.name in status for t in TARGETS if t.met(report))


def test_model_card_says_how_the_checkpoint_makes_its_boxes(micro_dir, tmp_path):
    report = evaluate_demo(uncached_engine(micro_dir), 1, budgets=(), chunk=1)
    model_dir = tmp_path / "card"
    model_dir.mkdir()
    config = json.loads((micro_dir / "config.json").read_text())

    def boxes_line(**settings: object) -> str:
        (model_dir / "config.json").write_text(json.dumps({**config, **settings}))
        card = write_model_card(model_dir, report, items=1, seed=0, budgets=()).read_text()
        return next(line for line in card.splitlines() if line.startswith("- Boxes:"))

    assert "one box around every cell above `roi_thresh` 0.1 (the paper's box)" in boxes_line(roi_thresh=0.1)
    line = boxes_line(roi_thresh=0.1, box_mode="components", roi_peak_frac=0.5)
    assert "the heaviest connected component of the cells above `roi_thresh` 0.1 that also reach 0.5 of" in line
    line = boxes_line(roi_thresh=0.2, max_boxes=2)
    assert "the 2 heaviest connected components" in line and "one sequence (`multi_box` joint)" in line
    line = boxes_line(roi_thresh=0.2, max_boxes=2, multi_box="best")
    assert "the most confident answer is kept (`multi_box` best)" in line
    assert "multi_box" not in boxes_line(roi_thresh=0.1, box_mode="components", multi_box="best")  # one box: no choice


def test_rpn_box_share_is_the_median_box_area_over_detail_questions():
    report = DemoReport(small_budget=256, budgets=())
    report.detail = [True, True, True, False]
    report.image_sizes = [(100, 100), (200, 100), (100, 100), (100, 100)]
    report.runs["forced@256"] = RunStats("forced@256")
    # 10% of the first image, the whole second one, none proposed on the third, a coarse question ignored.
    report.runs["forced@256"].proposed = [[[0, 0, 10, 100]], [[0, 0, 200, 100]], [], [[0, 0, 1, 1]]]
    assert report.rpn_box_share() == 1.0
    report.runs["forced@256"].proposed[1] = [[0, 0, 50, 100]]  # a quarter
    assert report.rpn_box_share() == 0.25
    report.runs["forced@256"].proposed[1] = [[0, 0, 50, 50], [100, 0, 200, 25]]  # two boxes: 1/8 + 1/8 of it
    assert report.rpn_box_share() == 0.25


def test_rpn_hit_rate_counts_a_target_inside_any_box_of_the_step():
    report = DemoReport(small_budget=256, budgets=())
    report.detail = [True, True, True, False]
    report.gt_boxes = [(40, 40, 60, 60)] * 4  # centre (50, 50)
    report.runs["forced@256"] = RunStats("forced@256")
    report.runs["forced@256"].proposed = [
        [[0, 0, 10, 10], [45, 45, 55, 55]],  # the second box holds the centre
        [[0, 0, 10, 10], [70, 70, 90, 90]],  # neither does
        [],  # no box proposed
        [[45, 45, 55, 55]],  # a coarse question: not scored
    ]
    assert report.rpn_hit_rate() == pytest.approx(1 / 3)


def _report_with_runs(points: dict[str, tuple[list[bool], float]]) -> DemoReport:
    report = DemoReport(small_budget=256, budgets=(1024,))
    report.detail = [True, False, True, False]
    for name, (correct, seconds) in points.items():
        report.runs[name] = RunStats(name, correct=correct, seconds=seconds)
    return report


def test_item_pool_renders_ahead_without_changing_what_it_holds():
    # The worker thread renders the next items by index; the pool takes them in order, so its contents are those of
    # the sequential pool after the same refreshes (the training data does not depend on the thread's timing).
    recipe = dataclasses.replace(MICRO, pool_size=3)
    ahead = ItemPool(recipe, ("letter", "colour"), 40, "ahead", progress=False, prefetch=2)
    plain = ItemPool(recipe, ("letter", "colour"), 40, "plain", progress=False, prefetch=0)
    for pool in (ahead, plain):
        pool.refresh(4)
    for a, b in zip(ahead.items, plain.items, strict=True):
        assert (a.item.index, a.item.question, a.item.answer) == (b.item.index, b.item.question, b.item.answer)
        assert a.coarse.tobytes() == b.coarse.tobytes()
    assert [p.item.index for p in plain.items] == [46, 44, 45]  # 40..42 first; 43..46 replace them round the ring
    # Closed after training: the worker stops, a closed pool renders nothing more, what it holds stays.
    ahead.close()
    plain.close()  # no worker: nothing to stop
    with pytest.raises(RuntimeError, match="shutdown"):
        ahead.refresh(1)
    assert [p.item.index for p in ahead.items] == [46, 44, 45]


def test_pareto_plot_draws_every_configuration_of_the_report(tmp_path):
    from PIL import Image

    from qzoom.evals.demo import plot_pareto

    report = _report_with_runs(
        {
            "coarse@256": ([False, True, False, True], 1.0),
            "baseline@1024": ([True, True, False, True], 4.0),
            "qzoom@256": ([True, True, True, True], 1.5),
            "forced@256": ([True, False, True, True], 2.0),
        }
    )
    path = plot_pareto(report, tmp_path / "pareto.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 300 and image.height > 200
        # Not a blank canvas: the points and the curve put colour on it.
        colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
    assert colours is not None and len(colours) > 20


def test_eval_demo_command_writes_the_plot(micro_dir, tmp_path):
    out = CliRunner().invoke(
        app,
        [
            "eval",
            "demo",
            "--model",
            str(micro_dir),
            "--items",
            "2",
            "--budgets",
            "384",
            "--plot",
            str(tmp_path / "p.png"),
        ],
    )
    assert out.exit_code == 0, out.output
    assert (tmp_path / "p.png").stat().st_size > 1000 and "baseline@384" in out.output


def test_eval_demo_command_rejects_bad_input(micro_dir):
    runner = CliRunner()
    out = runner.invoke(app, ["eval", "demo", "--model", str(micro_dir / "nope")])
    assert out.exit_code == 2 and "does not exist" in out.output
    out = runner.invoke(app, ["eval", "demo", "--model", str(micro_dir), "--budgets", "big"])
    assert out.exit_code == 2 and "--budgets" in out.output
