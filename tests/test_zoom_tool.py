"""The `zoom` tool executed in process: caller boxes in every frame, SD-RPN boxes for a query, image sources."""

from __future__ import annotations

import asyncio
import base64
import io

import pytest
from PIL import Image
from pydantic import ValidationError

from conftest import scene
from qzoom.agent.tool import ImageStore, UnknownImage, ZoomToolRunner, png_b64
from qzoom.worker import Worker

IMAGE = scene(800, 600, 21)


def run(engine, fn):
    async def go():
        async with Worker(engine) as worker:
            return await fn(ZoomToolRunner(worker))

    return asyncio.run(go())


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


@pytest.mark.parametrize(
    ("box", "expected"),
    [
        ({"coords": [100, 50, 300, 250], "frame": "original_px"}, [100, 50, 300, 250]),
        ({"coords": [0.5, 0.5, 1.0, 1.0], "frame": "unit"}, [400, 300, 800, 600]),
        ({"coords": [0, 0, 250, 500], "frame": "permille"}, [0, 0, 200, 300]),
        ({"coords": [0, 0, 200, 150], "frame": "resized_px", "resized_width": 400, "resized_height": 300},
         [0, 0, 400, 300]),
        ({"coords": [10, 10, 12, 12], "frame": "original_px"}, [0, 0, 28, 28]),  # grown to 28 px, slid inside
    ],
)  # fmt: skip
def test_caller_boxes_in_every_frame_become_original_pixels(engine, box, expected):
    async def go(runner):
        image_id = runner.images.put(IMAGE)
        return await runner.zoom(runner.parse({"image_id": image_id, "box": box}))

    res = run(engine, go)
    assert res.box == expected and res.box_source == "caller" and res.requested_box == box["coords"]
    crop = decode(res.crop_png_b64)
    assert list(crop.size) == res.crop_wh == [expected[2] - expected[0], expected[3] - expected[1]]
    assert crop.convert("RGB").getpixel((0, 0)) == IMAGE.getpixel((expected[0], expected[1]))


def test_margin_and_output_size(engine):
    async def go(runner):
        return await runner.zoom(
            runner.parse({"image_data": png_b64(IMAGE), "box": {"coords": [200, 200, 400, 300], "frame": "original_px"},
                          "margin": 0.5, "output_max_side": 100})
        )  # fmt: skip

    res = run(engine, go)
    assert res.box == [100, 150, 500, 350]
    assert res.crop_wh == [100, 50] and decode(res.crop_png_b64).size == (100, 50)


def test_query_takes_the_sd_rpn_box_with_gate_score_and_heatmap(engine):
    async def go(runner):
        return await runner.zoom(runner.parse({"image_data": "data:image/png;base64," + png_b64(IMAGE),
                                               "query": "What is written in the red box?"}))  # fmt: skip

    res = run(engine, go)
    assert res.box_source == "sd_rpn" and res.frame is None
    assert 0.0 <= res.gate_score <= 1.0
    assert res.heatmap.grid_hw[0] * res.heatmap.grid_hw[1] >= res.heatmap.cells_above
    x0, y0, x1, y1 = res.box
    assert 0 <= x0 < x1 <= 800 and 0 <= y0 < y1 <= 600
    # The same proposal the engine makes for that question.
    st = engine.new_state(IMAGE, "What is written in the red box?")
    engine.prepare([st])
    engine.encode([st])
    engine.prefill([st])
    (proposal,) = engine.propose([st])
    expected = proposal.boxes[0].as_list() if proposal.boxes else [0, 0, 800, 600]
    assert res.box == expected


def test_image_sources_are_checked(engine, tmp_path):
    path = tmp_path / "pic.png"
    IMAGE.save(path)

    async def go(runner):
        with pytest.raises(ValidationError, match="only by the local stdio server"):
            runner.parse({"image_path": str(path), "box": {"coords": [0, 0, 1, 1], "frame": "unit"}})
        with pytest.raises(UnknownImage, match="upload the image first"):
            await runner.zoom(runner.parse({"image_id": "abc123", "box": {"coords": [0, 0, 1, 1], "frame": "unit"}}))
        local = ZoomToolRunner(runner.worker, allow_image_path=True)
        res = await local.zoom(local.parse({"image_path": str(path), "box": {"coords": [0, 0, 1, 1], "frame": "unit"}}))
        return res

    assert run(engine, go).box == [0, 0, 800, 600]


def test_image_store_is_bounded_lru():
    store = ImageStore(max_images=2)
    ids = [store.put(scene(60, 40, s)) for s in range(3)]
    with pytest.raises(UnknownImage):
        store.get(ids[0])
    assert store.get(ids[2]).size == (60, 40)
