"""The `zoom` tool schema (qzoom.tools.schema) and coordinate frames (qzoom.tools.frames).

Frames: conversions are exact inverses, clamping keeps its documented invariants, `smart_resize` equals
transformers'. Schema: arguments and results validate as documented, and the JSON schema is OpenAI-strict-valid,
checked structurally and against the committed snapshot `tests/snapshots/zoom_args.schema.json`.
"""

from __future__ import annotations

import base64
import io
import itertools
import json
import random
import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict, ValidationError

from qzoom.tools.frames import (
    Frame,
    clamp_box,
    convert,
    expand_box,
    from_original,
    resized_wh,
    smart_resize,
    to_original,
)
from qzoom.tools.schema import (
    LOCAL_STDIO_CONTEXT,
    ZOOM_TOOL_NAME,
    HeatmapSummary,
    ZoomArgs,
    ZoomBox,
    ZoomResult,
    decode_image_data,
    openai_tool,
    strict_parameters,
)

SNAPSHOT = Path(__file__).parent / "snapshots" / "zoom_args.schema.json"

# --------------------------------------------------------------------------------------------------------------
# Frames


def test_to_original_each_frame() -> None:
    wh = (2000, 1000)
    assert to_original([10, 20, 30, 40], Frame.ORIGINAL_PX, wh) == (10, 20, 30, 40)
    assert to_original([0.1, 0.2, 0.5, 1.0], Frame.UNIT, wh) == pytest.approx((200, 200, 1000, 1000))
    assert to_original([100, 200, 500, 1000], Frame.PERMILLE, wh) == pytest.approx((200, 200, 1000, 1000))
    assert to_original([50, 25, 250, 125], Frame.RESIZED_PX, wh, (1000, 500)) == (100, 50, 500, 250)
    assert to_original([50, 25, 250, 125], "resized_px", wh, (1000, 500)) == (100, 50, 500, 250)


def test_resized_frame_needs_resized_size() -> None:
    with pytest.raises(ValueError, match="needs resized_wh"):
        to_original([1, 2, 3, 4], Frame.RESIZED_PX, (100, 100))


@pytest.mark.parametrize(
    ("box", "problem"),
    [([1, 2, 3], "4 numbers"), ([1, 2, 3, "4"], "4 numbers"), ([1, 2, 3, float("nan")], "non-finite"), ("abcd", "4")],
)
def test_to_original_rejects_bad_boxes(box: Any, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        to_original(box, Frame.UNIT, (10, 10))


@pytest.mark.parametrize("wh", [(0, 10), (10.5, 10), (True, 10), (10,)])
def test_bad_image_size(wh: Any) -> None:
    with pytest.raises(ValueError, match="image_wh"):
        to_original([0, 0, 1, 1], Frame.UNIT, wh)


def test_round_trips_between_all_frames() -> None:
    rng = random.Random(0)
    for _ in range(200):
        wh = (rng.randint(1, 5000), rng.randint(1, 5000))
        rs = (rng.randint(1, 3000), rng.randint(1, 3000))
        x0, y0 = rng.uniform(0, wh[0]), rng.uniform(0, wh[1])
        box = (x0, y0, rng.uniform(x0, wh[0]), rng.uniform(y0, wh[1]))
        for src, dst in itertools.product(Frame, Frame):
            b = from_original(box, src, wh, rs)
            assert to_original(b, src, wh, rs) == pytest.approx(box, rel=1e-12, abs=1e-9)
            there = convert(b, src, dst, wh, rs)
            assert convert(there, dst, src, wh, rs) == pytest.approx(b, rel=1e-12, abs=1e-9)
            assert to_original(there, dst, wh, rs) == pytest.approx(box, rel=1e-12, abs=1e-9)


def test_frame_ranges_and_descriptions() -> None:
    assert Frame.UNIT.value_range == (0.0, 1.0)
    assert Frame.PERMILLE.value_range == (0.0, 1000.0)
    assert Frame.ORIGINAL_PX.value_range is None and Frame.RESIZED_PX.value_range is None
    assert all(f.description for f in Frame)
    assert [f.value for f in Frame] == ["original_px", "resized_px", "unit", "permille"]


def test_expand_box() -> None:
    assert expand_box([10, 20, 30, 60], 0) == (10, 20, 30, 60)
    assert expand_box([10, 20, 30, 60], 0.5) == (0, 0, 40, 80)
    assert expand_box([30, 60, 10, 20], 0.5) == (0, 0, 40, 80)
    with pytest.raises(ValueError, match="margin"):
        expand_box([0, 0, 1, 1], -0.1)


# --------------------------------------------------------------------------------------------------------------
# Clamping


@pytest.mark.parametrize(
    ("box", "image_wh", "min_side", "max_aspect", "expected"),
    [
        # inside, already big enough: only rounded outward
        ((10.2, 20.7, 100.5, 80.1), (200, 200), 28, 200, (10, 20, 101, 81)),
        # out of range: clipped
        ((-50, -10, 120, 300), (100, 200), 28, 200, (0, 0, 100, 200)),
        # inverted: the same box
        ((60, 70, 10, 20), (100, 100), 28, 200, (10, 20, 60, 70)),
        # tiny: grown symmetrically to 28 (Qwen2.5) ...
        ((50, 50, 52, 52), (100, 100), 28, 200, (37, 37, 65, 65)),
        # ... or 32 (Qwen3)
        ((50, 50, 52, 52), (100, 100), 32, 200, (35, 35, 67, 67)),
        # tiny at a corner: grown, then slid back inside
        ((0, 0, 2, 2), (100, 100), 28, 200, (0, 0, 28, 28)),
        ((98, 99, 100, 100), (100, 100), 28, 200, (72, 72, 100, 100)),
        # entirely off the image: becomes a min-side box at the border
        ((150, 150, 180, 190), (100, 100), 28, 200, (72, 72, 100, 100)),
        # a point
        ((40, 40, 40, 40), (100, 100), 28, 200, (26, 26, 54, 54)),
        # image smaller than the minimum side: the whole image along that axis
        ((2, 2, 4, 4), (20, 10), 28, 200, (0, 0, 20, 10)),
        ((2, 2, 4, 4), (20, 300), 28, 200, (0, 0, 20, 28)),
        # aspect cap: the short side grows (1000 x 2 -> 1000 x 10 at cap 100)
        ((0, 0, 1000, 2), (2000, 2000), 0, 100, (0, 0, 1000, 10)),
        ((500, 500, 502, 1500), (2000, 2000), 0, 100, (496, 500, 506, 1500)),
        # min side first, then the cap: 1000 x 28 is within 100, untouched
        ((0, 0, 1000, 2), (2000, 2000), 28, 100, (0, 0, 1000, 28)),
        # image too narrow for the cap: short side = whole image, long side shrunk about its centre
        ((0, 0, 1000, 5), (1000, 5), 28, 100, (250, 0, 750, 5)),
        # min_side 0 still yields a non-empty crop
        ((10.0, 10.0, 10.0, 10.0), (100, 100), 0, 200, (10, 10, 11, 11)),
        ((100, 100, 100, 100), (100, 100), 0, 200, (99, 99, 100, 100)),
    ],
)
def test_clamp_box_cases(
    box: tuple[float, ...], image_wh: tuple[int, int], min_side: int, max_aspect: float, expected: tuple[int, ...]
) -> None:
    got = clamp_box(box, image_wh, min_side=min_side, max_aspect=max_aspect)
    assert got == expected
    assert all(type(v) is int for v in got)
    assert clamp_box(got, image_wh, min_side=min_side, max_aspect=max_aspect) == got


def test_clamp_box_invariants_random() -> None:
    rng = random.Random(1)
    for _ in range(3000):
        w, h = (
            rng.choice([rng.randint(1, 40), rng.randint(1, 4000)]),
            rng.choice([rng.randint(1, 40), rng.randint(1, 4000)]),
        )
        box = tuple(rng.uniform(-0.2, 1.2) * d for d in (w, h, w, h))
        min_side = rng.choice([0, 28, 32])
        cap = rng.choice([1.0, 3.0, 100.0, 200.0])
        x0, y0, x1, y1 = b = clamp_box(box, (w, h), min_side=min_side, max_aspect=cap)
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h, (box, w, h, b)
        bw, bh = x1 - x0, y1 - y0
        # The cap holds unless the image itself cannot hold a capped box of at least one pixel.
        if max(w, h) <= cap * min(w, h) or cap * min(w, h) >= 1:
            assert max(bw, bh) <= cap * min(bw, bh) + 1e-9, (box, w, h, b, cap)
        # Each side reaches min(min_side, image side) unless the cap had to shrink it.
        shrunk = (bw == w or bh == h) and max(bw, bh) == max(1, int(cap * min(bw, bh)))
        if not shrunk:
            assert bw >= min(min_side, w) and bh >= min(min_side, h), (box, w, h, b)
        assert clamp_box(b, (w, h), min_side=min_side, max_aspect=cap) == b


def test_clamp_box_contains_the_clipped_input() -> None:
    rng = random.Random(2)
    for _ in range(500):
        w, h = rng.randint(50, 3000), rng.randint(50, 3000)
        x0, y0 = rng.uniform(0, w - 1), rng.uniform(0, h - 1)
        box = (x0, y0, rng.uniform(x0, w), rng.uniform(y0, h))
        if max(box[2] - box[0], box[3] - box[1]) > 200 * min(w, h):
            continue
        b = clamp_box(box, (w, h), min_side=28, max_aspect=200)
        assert b[0] <= box[0] and b[1] <= box[1] and b[2] >= box[2] and b[3] >= box[3]


@pytest.mark.parametrize(
    ("kw", "problem"),
    [({"min_side": -1, "max_aspect": 2}, "min_side"), ({"min_side": 2, "max_aspect": 0.5}, "max_aspect")],
)
def test_clamp_box_bad_parameters(kw: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        clamp_box((0, 0, 1, 1), (10, 10), **kw)


# --------------------------------------------------------------------------------------------------------------
# smart_resize equals Qwen's rule in transformers


def test_smart_resize_matches_transformers() -> None:
    ref = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl").smart_resize
    budgets = [(56 * 56, 28 * 28 * 1280), (112 * 112, 3840 * 3840), (40000, 2000000), (256 * 32 * 32, 12845056)]
    rng = random.Random(3)
    sizes = [(1, 1), (27, 29), (14, 14), (42, 42), (70, 98), (1080, 1920), (4000, 3000), (28, 5000), (13, 2000)]
    sizes += [(rng.randint(1, 8000), rng.randint(1, 8000)) for _ in range(300)]
    for (h, w), factor, (lo, hi) in itertools.product(sizes, (28, 32), budgets):
        if max(h, w) / min(h, w) > 200:
            with pytest.raises(ValueError, match="aspect ratio"):
                smart_resize(h, w, factor, lo, hi)
            continue
        assert smart_resize(h, w, factor, lo, hi) == ref(h, w, factor=factor, min_pixels=lo, max_pixels=hi), (h, w)


def test_smart_resize_known_values() -> None:
    assert smart_resize(1000, 700) == (1008, 700)
    assert smart_resize(1080, 1920, factor=32, min_pixels=56 * 56, max_pixels=1280 * 32 * 32) == (832, 1504)
    assert resized_wh((1920, 1080), factor=28, min_pixels=3136, max_pixels=12845056) == (1932, 1092)
    with pytest.raises(ValueError, match="positive integer"):
        smart_resize(0, 10)


# --------------------------------------------------------------------------------------------------------------
# ZoomArgs / ZoomBox


def _png(w: int = 8, h: int = 6) -> bytes:
    from PIL import Image  # tests may use PIL; the tool modules may not at import time

    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


PNG_B64 = base64.b64encode(_png()).decode()


def test_zoom_args_minimal_forms() -> None:
    a = ZoomArgs.model_validate({"image_id": "img-1", "box": {"coords": [10, 20, 30, 40], "frame": "original_px"}})
    assert a.box is not None and a.box.frame is Frame.ORIGINAL_PX and a.query is None and a.margin is None
    b = ZoomArgs.model_validate({"image_data": PNG_B64, "box": None, "query": "what does the sign say?"})
    assert b.image_bytes() == _png()
    c = ZoomArgs.model_validate({"image_data": "data:image/png;base64," + PNG_B64, "query": "q"})
    assert c.image_bytes() == _png()
    assert a.image_bytes() is None


def test_zoom_args_strict_mode_payload() -> None:
    # What an OpenAI strict-mode model sends: every key present, optional ones null.
    payload = {
        "image_id": None,
        "image_data": PNG_B64,
        "image_path": None,
        "box": {"coords": [100, 200, 300, 400], "frame": "resized_px", "resized_width": 1000, "resized_height": 800},
        "query": None,
        "margin": 0.1,
        "output_max_side": 512,
    }
    a = ZoomArgs.model_validate_json(json.dumps(payload))
    assert a.box is not None
    assert a.box.resized_wh == (1000, 800)
    assert a.box.to_original((2000, 1600)) == (200, 400, 600, 800)


def test_image_path_only_in_local_stdio_mode() -> None:
    data = {"image_path": "/tmp/picture.png", "query": "q"}
    with pytest.raises(ValidationError, match="only by the local stdio server"):
        ZoomArgs.model_validate(data)
    assert ZoomArgs.model_validate(data, context=LOCAL_STDIO_CONTEXT).image_path == "/tmp/picture.png"


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ({"query": "q"}, "exactly one of image_id"),
        ({"image_id": "a", "image_data": PNG_B64, "query": "q"}, "exactly one of image_id"),
        ({"image_id": " ", "query": "q"}, "image_id is empty"),
        ({"image_data": "not base64!!", "query": "q"}, "not valid base64"),
        ({"image_data": "data:text/plain,hello", "query": "q"}, "data URL must look like"),
        ({"image_data": "", "query": "q"}, "empty"),
        ({"image_id": "a"}, "give a box, or box null and a query"),
        ({"image_id": "a", "query": "  "}, "give a box, or box null and a query"),
        ({"image_id": "a", "query": "q", "margin": 1.5}, "margin must be between 0 and 1"),
        ({"image_id": "a", "query": "q", "margin": -0.1}, "margin must be between 0 and 1"),
        ({"image_id": "a", "query": "q", "output_max_side": 10}, "output_max_side must be between 28 and 8192"),
        ({"image_id": "a", "query": "q", "output_max_side": "512"}, "valid integer"),
        ({"image_id": "a", "query": "q", "zoom": 2}, "Extra inputs are not permitted"),
    ],
)
def test_zoom_args_errors(data: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        ZoomArgs.model_validate(data)


@pytest.mark.parametrize(
    ("box", "problem"),
    [
        ({"coords": [1, 2, 3], "frame": "original_px"}, "exactly 4 numbers"),
        ({"coords": [1, 2, 3, 4, 5], "frame": "original_px"}, "exactly 4 numbers"),
        ({"coords": [30, 2, 10, 40], "frame": "original_px"}, "x0 < x1 and y0 < y1"),
        ({"coords": [1, 2, "30", 40], "frame": "original_px"}, "valid number"),
        ({"coords": [1, 2, True, 40], "frame": "original_px"}, "valid number"),
        ({"coords": [0.1, 0.2, 1.3, 0.4], "frame": "unit"}, r"outside \[0, 1\]"),
        ({"coords": [10, 20, 1300, 400], "frame": "permille"}, r"outside \[0, 1000\]"),
        ({"coords": [1, 2, 30, 40], "frame": "resized_px"}, "needs resized_width and resized_height"),
        ({"coords": [1, 2, 30, 40], "frame": "resized_px", "resized_width": 0, "resized_height": 5}, "positive"),
        ({"coords": [0.1, 0.2, 0.3, 0.4], "frame": "unit", "resized_width": 100, "resized_height": 50}, "only for"),
        ({"coords": [1, 2, 30, 40], "frame": "pixels"}, "Input should be"),
        ({"coords": [1, 2, 30, 40]}, "Field required"),
    ],
)
def test_zoom_box_errors(box: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        ZoomArgs.model_validate({"image_id": "a", "box": box})


def test_decode_image_data_whitespace() -> None:
    wrapped = "\n".join(PNG_B64[i : i + 76] for i in range(0, len(PNG_B64), 76))
    assert decode_image_data(wrapped) == _png()


# --------------------------------------------------------------------------------------------------------------
# ZoomResult


def test_zoom_result_caller_box() -> None:
    r = ZoomResult(
        crop_png_b64=PNG_B64,
        crop_wh=[8, 6],
        box=[10, 20, 90, 80],
        image_wh=[640, 480],
        found=True,
        box_source="caller",
        frame=Frame.UNIT,
        requested_box=[0.015625, 0.041666, 0.140625, 0.166666],
        gate_score=None,
        heatmap=None,
    )
    summary = json.loads(r.summary_json())
    assert "crop_png_b64" not in summary
    assert summary["box"] == [10, 20, 90, 80] and summary["frame"] == "unit" and summary["box_source"] == "caller"
    assert ZoomResult.model_validate_json(r.model_dump_json()) == r


def test_zoom_result_sd_rpn_box() -> None:
    heat = HeatmapSummary(grid_hw=[17, 23], threshold=0.3, max_prob=0.91, mean_prob=0.05, cells_above=12)
    r = ZoomResult.model_validate(
        {
            "crop_png_b64": PNG_B64,
            "crop_wh": [8, 6],
            "box": [0, 0, 640, 480],
            "image_wh": [640, 480],
            "found": False,
            "box_source": "sd_rpn",
            "gate_score": 0.87,
            "heatmap": heat.model_dump(),
        }
    )
    assert r.frame is None and r.requested_box is None and r.heatmap == heat


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"crop_png_b64": base64.b64encode(b"GIF89a....").decode()}, "base64-encoded PNG"),
        ({"box": [10, 20, 700, 80]}, "must satisfy 0 <= x0 < x1 <= 640"),
        ({"box": [10, 20, 10, 80]}, "must satisfy"),
        ({"box": [10, 20, 90]}, "4 integers"),
        ({"image_wh": [640]}, "image_wh must be"),
        ({"frame": None}, "caller box must report its frame"),
        ({"gate_score": 0.5}, "SD-RPN boxes only"),
        ({"box_source": "sd_rpn"}, "no caller frame"),
        ({"box_source": "sd_rpn", "frame": None, "requested_box": None}, "must carry its heatmap"),
        ({"found": False}, "a caller's box is always found"),
    ],
)
def test_zoom_result_errors(change: dict[str, Any], problem: str) -> None:
    base: dict[str, Any] = {
        "crop_png_b64": PNG_B64,
        "crop_wh": [8, 6],
        "box": [10, 20, 90, 80],
        "image_wh": [640, 480],
        "found": True,
        "box_source": "caller",
        "frame": "original_px",
        "requested_box": [10, 20, 90, 80],
        "gate_score": None,
        "heatmap": None,
    }
    with pytest.raises(ValidationError, match=problem):
        ZoomResult.model_validate({**base, **change})


@pytest.mark.parametrize(
    ("change", "problem"),
    [({"max_prob": 1.5}, "probability"), ({"grid_hw": [0, 3]}, "grid_hw"), ({"cells_above": 7}, "cells_above")],
)
def test_heatmap_errors(change: dict[str, Any], problem: str) -> None:
    base = {"grid_hw": [2, 3], "threshold": 0.5, "max_prob": 0.9, "mean_prob": 0.2, "cells_above": 2}
    with pytest.raises(ValidationError, match=problem):
        HeatmapSummary.model_validate({**base, **change})


# --------------------------------------------------------------------------------------------------------------
# OpenAI strict mode


def _objects(node: Any, path: str = "#") -> list[tuple[str, dict[str, Any]]]:
    """Every object schema in ``node``, found independently of the module's own checker."""
    found = []
    if isinstance(node, dict):
        if node.get("type") == "object" or "properties" in node:
            found.append((path, node))
        for k, v in node.items():
            found += _objects(v, f"{path}/{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            found += _objects(v, f"{path}/{i}")
    return found


def _keys(node: Any) -> set[str]:
    """All schema keywords used (property names excluded)."""
    keys: set[str] = set()
    if isinstance(node, dict):
        for k, v in node.items():
            keys.add(k)
            if k in ("properties", "$defs", "definitions"):
                for sub in v.values():
                    keys |= _keys(sub)
            else:
                keys |= _keys(v)
    elif isinstance(node, list):
        for v in node:
            keys |= _keys(v)
    return keys


@pytest.mark.parametrize("model", [ZoomArgs, ZoomBox, ZoomResult, HeatmapSummary])
def test_schemas_are_strict_valid(model: type[BaseModel]) -> None:
    for schema in (model.model_json_schema(), strict_parameters(model)):
        assert schema["type"] == "object" and "anyOf" not in schema
        objects = _objects(schema)
        assert objects
        for path, obj in objects:
            assert obj.get("additionalProperties") is False, path
            assert sorted(obj["required"]) == sorted(obj["properties"]), path
        assert not _keys(schema) & {"default", "format", "minItems", "maxItems", "minimum", "maximum", "prefixItems"}


def test_optional_fields_are_required_but_nullable() -> None:
    schema = ZoomArgs.model_json_schema()
    assert schema["required"] == list(schema["properties"])
    for name in ("image_id", "image_data", "image_path", "box", "query", "margin", "output_max_side"):
        assert {"type": "null"} in schema["properties"][name]["anyOf"], name


def test_strict_schema_snapshot() -> None:
    schema = strict_parameters(ZoomArgs)
    assert schema == ZoomArgs.model_json_schema()  # already strict: openai's helper changes nothing
    assert SNAPSHOT.exists(), f"missing snapshot; write json.dumps(strict_parameters(ZoomArgs), indent=2) to {SNAPSHOT}"
    assert json.loads(SNAPSHOT.read_text()) == schema, (
        "the zoom tool's strict schema changed: review and update the snapshot"
    )


def test_openai_tool_shapes() -> None:
    chat = openai_tool()
    assert chat["type"] == "function" and chat["function"]["strict"] is True
    assert re.fullmatch(r"[a-zA-Z0-9_-]{1,64}", chat["function"]["name"]) and chat["function"]["name"] == ZOOM_TOOL_NAME
    assert chat["function"]["parameters"] == strict_parameters(ZoomArgs)
    flat = openai_tool("responses")
    assert (
        flat["name"] == ZOOM_TOOL_NAME
        and flat["strict"] is True
        and flat["parameters"] == chat["function"]["parameters"]
    )


def test_lenient_validation_of_omitted_fields_is_compatible_with_required_schema() -> None:
    # Non-strict clients (MCP hosts, LangChain) may omit nullable keys; pydantic fills null.
    class Probe(BaseModel):
        model_config = ConfigDict(extra="forbid")

    assert Probe.model_validate({}) == Probe()
    a = ZoomArgs.model_validate({"image_id": "x", "query": "q"})
    assert a.model_dump() == {
        "image_id": "x",
        "image_data": None,
        "image_path": None,
        "box": None,
        "query": "q",
        "margin": None,
        "output_max_side": None,
    }
