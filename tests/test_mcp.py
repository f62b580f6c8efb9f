"""The MCP server (qzoom.tools.mcp_server): the SDK's in-memory client session against the tiny engine, and `qzoom
mcp` as a real stdio subprocess driven by the SDK's stdio client."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import json
import sys

import pytest
from mcp import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.shared.memory import create_connected_server_and_client_session
from mcp.types import ImageContent, TextContent
from PIL import Image
from typer.testing import CliRunner

from conftest import scene
from qzoom.agent.tool import ZoomToolRunner, png_b64
from qzoom.cli import app
from qzoom.guards import ACCEPTED, too_large
from qzoom.tools.mcp_server import build_mcp_server
from qzoom.tools.schema import ZoomArgs
from qzoom.worker import Worker

IMAGE = scene(640, 480, 31)


def with_client(engine, fn, *, allow_image_path: bool = False):
    async def go():
        async with Worker(engine) as worker:
            runner = ZoomToolRunner(worker, allow_image_path=allow_image_path)
            server = build_mcp_server(lambda: runner)
            async with create_connected_server_and_client_session(server, raise_exceptions=True) as client:
                return await fn(client, runner)

    return asyncio.run(go())


def blocks(result):
    image, text = result.content
    assert isinstance(image, ImageContent) and isinstance(text, TextContent)
    assert image.mimeType == "image/png"
    return Image.open(io.BytesIO(base64.b64decode(image.data))), json.loads(text.text)


def test_tools_are_listed_with_pydantic_input_schemas(engine):
    async def go(client, runner):
        return {t.name: t for t in (await client.list_tools()).tools}

    tools = with_client(engine, go)
    assert set(tools) == {"zoom", "gate", "propose"}
    assert tools["zoom"].inputSchema == ZoomArgs.model_json_schema()
    assert tools["gate"].inputSchema["required"] == ["image_id", "image_data", "image_path", "query"]
    assert tools["propose"].inputSchema["additionalProperties"] is False


def test_zoom_with_a_box_returns_image_text_and_structured_content(engine):
    async def go(client, runner):
        image_id = runner.images.put(IMAGE)
        return await client.call_tool(
            "zoom", {"image_id": image_id, "box": {"coords": [0.5, 0, 1, 0.5], "frame": "unit"}}
        )

    res = with_client(engine, go)
    assert not res.isError
    crop, summary = blocks(res)
    assert summary["box"] == [320, 0, 640, 240] and summary["box_source"] == "caller"
    assert list(crop.size) == summary["crop_wh"] == [320, 240]
    assert crop.convert("RGB").getpixel((0, 0)) == IMAGE.getpixel((320, 0))
    assert res.structuredContent == summary and "crop_png_b64" not in summary


def test_zoom_with_a_query_uses_the_sd_rpn(engine):
    async def go(client, runner):
        return await client.call_tool("zoom", {"image_data": png_b64(IMAGE), "query": "What is in the red box?"})

    res = with_client(engine, go)
    assert not res.isError
    crop, summary = blocks(res)
    x0, y0, x1, y1 = summary["box"]
    assert summary["box_source"] == "sd_rpn" and 0 <= x0 < x1 <= 640 and 0 <= y0 < y1 <= 480
    assert list(crop.size) == summary["crop_wh"] == [x1 - x0, y1 - y0]
    assert 0.0 <= summary["gate_score"] <= 1.0 and summary["heatmap"]["grid_hw"]
    assert res.structuredContent == summary


def test_bad_arguments_are_tool_errors_naming_the_field(engine):
    async def go(client, runner):
        image_id = runner.images.put(IMAGE)
        box = {"coords": [0, 0, 2, 1], "frame": "unit"}
        return [
            await client.call_tool("zoom", {"image_id": image_id, "box": box}),
            await client.call_tool("zoom", {"image_id": image_id, "query": "q", "zoom_level": 3}),
            await client.call_tool("zoom", {"image_id": image_id, "box": {"coords": [0, 0, 1, 1], "frame": "pct"}}),
            await client.call_tool("zoom", {"image_id": "nope", "query": "q"}),
            await client.call_tool("zoom", {"image_path": "/tmp/x.png", "query": "q"}),
            await client.call_tool("gate", {"image_id": image_id}),
            await client.call_tool("propose", {"image_id": image_id, "query": "q", "max_boxes": 99}),
        ]

    results = with_client(engine, go)
    assert all(r.isError for r in results)
    texts = [r.content[0].text for r in results]
    assert "box:" in texts[0] and "outside [0, 1]" in texts[0]
    assert "zoom_level: unknown field; accepted fields: image_id, image_data, image_path, box" in texts[1]
    assert "box.frame:" in texts[2] and "'original_px'" in texts[2]
    assert "unknown image_id 'nope'" in texts[3]
    assert "image_path is accepted only by the local stdio server" in texts[4]
    assert "query: required field is missing" in texts[5]
    assert "max_boxes must be between 1 and 8" in texts[6]


def test_gate_and_propose(engine):
    async def go(client, runner):
        image_id = runner.images.put(IMAGE)
        gate = await client.call_tool("gate", {"image_id": image_id, "query": "What is written in the box?"})
        propose = await client.call_tool(
            "propose", {"image_id": image_id, "query": "What is written in the box?", "max_boxes": 3}
        )
        return gate, propose

    gate, propose = with_client(engine, go)
    assert not gate.isError and not propose.isError
    g = json.loads(gate.content[0].text)
    assert g == gate.structuredContent
    assert 0.0 <= g["gate_score"] <= 1.0 and isinstance(g["needs_detail"], bool)
    assert g["needs_detail"] == (g["gate_score"] >= engine.settings.high_res_thresh)
    p = propose.structuredContent
    assert p["image_wh"] == [640, 480] and 1 <= len(p["boxes"]) <= 3
    for x0, y0, x1, y1 in p["boxes"]:
        assert 0 <= x0 < x1 <= 640 and 0 <= y0 < y1 <= 480
    assert p["gate_score"] == pytest.approx(g["gate_score"], abs=1e-6)  # same image and question: the same gate
    rows, cols = p["heatmap"]["grid_hw"]
    assert 0 <= p["heatmap"]["cells_above"] <= rows * cols


def test_image_path_is_read_in_local_mode(engine, tmp_path):
    path = tmp_path / "pic.png"
    IMAGE.save(path)

    async def go(client, runner):
        return await client.call_tool("zoom", {"image_path": str(path), "box": {"coords": [0, 0, 100, 50],
                                                                               "frame": "original_px"}})  # fmt: skip

    _, summary = blocks(with_client(engine, go, allow_image_path=True))
    assert summary["box"] == [0, 0, 100, 50]


def test_qzoom_mcp_over_stdio(tmp_path):
    """`qzoom mcp --model DIR` in a subprocess, driven by the SDK's stdio client: list tools, zoom a local file."""
    model = tmp_path / "tiny"
    init = CliRunner().invoke(app, ["init-tiny", str(model)])  # in process: saves a second interpreter start
    assert init.exit_code == 0, init.output
    path = tmp_path / "pic.png"
    IMAGE.save(path)
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "qzoom.cli", "mcp", "--model", str(model)],
        env={"QZOOM_MAX_PIXELS_IN": "500000"},  # the service's pixel cap applies over stdio too
    )
    box = {"coords": [100, 200, 300, 400], "frame": "permille"}

    async def go():
        async with stdio_client(params) as (read, write), ClientSession(read, write) as client:
            await client.initialize()
            names = sorted(t.name for t in (await client.list_tools()).tools)
            res = await client.call_tool("zoom", {"image_path": str(path), "box": box})
            big = await client.call_tool("zoom", {"image_data": png_b64(scene(1000, 600, 3)), "box": box})
            tga = await client.call_tool("zoom", {"image_data": encoded(IMAGE, "TGA"), "box": box})
            return names, res, big, tga

    names, res, big, tga = asyncio.run(go())
    assert names == ["gate", "propose", "zoom"]
    assert not res.isError
    crop, summary = blocks(res)
    assert summary["box"] == [64, 96, 192, 192] and crop.size == (128, 96)
    assert big.isError and big.content[0].text == too_large(600000, 500000, (1000, 600)).args[0]
    assert tga.isError and tga.content[0].text == f"the image is not a readable image; accepted formats: {ACCEPTED}"


def encoded(image: Image.Image, fmt: str) -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def test_the_input_guards_answer_over_mcp_as_over_rest(engine):
    """The same refusals, word for word, as the REST error model: an unaccepted format, an image over the cap."""

    async def go(client, runner):
        runner.max_pixels = 200_000
        box = {"coords": [0, 0, 1, 1], "frame": "unit"}
        return (
            await client.call_tool("zoom", {"image_data": encoded(IMAGE, "TGA"), "box": box}),
            await client.call_tool("propose", {"image_data": encoded(IMAGE, "PCX"), "query": "q"}),
            await client.call_tool("zoom", {"image_data": encoded(IMAGE, "PNG"), "box": box}),
        )

    tga, pcx, big = with_client(engine, go)
    for res in (tga, pcx):
        assert res.isError and res.content[0].text == f"the image is not a readable image; accepted formats: {ACCEPTED}"
    assert big.isError and big.content[0].text == too_large(640 * 480, 200_000, (640, 480)).args[0]


def test_qzoom_mcp_with_a_missing_model_fails_before_the_protocol_starts():
    missing = CliRunner().invoke(app, ["mcp", "--model", "/nonexistent/ckpt"])
    assert missing.exit_code == 2 and "model directory /nonexistent/ckpt does not exist" in missing.output


def test_tools_list_output_schemas_annotations_and_the_server_version(engine):
    """outputSchema matches the structured content (the SDK client validates it), the tools say they only read, and
    serverInfo names qzoom's version."""
    from importlib.metadata import version

    async def go(client, runner):
        tools = {t.name: t for t in (await client.list_tools()).tools}
        image_id = runner.images.put(IMAGE)
        zoom = await client.call_tool(
            "zoom", {"image_id": image_id, "box": {"coords": [0, 0, 0.5, 0.5], "frame": "unit"}}
        )
        return tools, zoom

    async def server_info():
        async with Worker(engine) as worker:
            runner = ZoomToolRunner(worker)
            server = build_mcp_server(lambda: runner)
            options = server.create_initialization_options()
            return options.server_name, options.server_version

    tools, zoom = with_client(engine, go)
    for tool in tools.values():
        assert tool.outputSchema is not None and tool.outputSchema["type"] == "object"
        a = tool.annotations
        assert (a.readOnlyHint, a.destructiveHint, a.idempotentHint, a.openWorldHint) == (True, False, True, False)
    assert set(tools["zoom"].outputSchema["required"]) >= {"box", "found", "crop_mime_type", "crop_bytes"}
    assert "found" in tools["propose"].outputSchema["required"]
    assert not zoom.isError and zoom.structuredContent["crop_mime_type"] == "image/png"
    png = base64.b64decode(zoom.content[0].data)
    assert zoom.structuredContent["crop_bytes"] == len(png)
    assert asyncio.run(server_info()) == ("qzoom", version("qzoom"))


def test_a_box_outside_the_image_is_an_error_naming_the_image_size(engine):
    async def go(client, runner):
        image_id = runner.images.put(IMAGE)
        outside = {"coords": [5000, 5000, 6000, 6000], "frame": "original_px"}
        edge = {"coords": [600, 400, 700, 500], "frame": "original_px"}  # overlaps: clipped, not refused
        return (
            await client.call_tool("zoom", {"image_id": image_id, "box": outside}),
            await client.call_tool("zoom", {"image_id": image_id, "box": edge}),
        )

    outside, edge = with_client(engine, go)
    assert outside.isError
    assert "lies entirely outside the image, which is 640x480 pixels" in outside.content[0].text
    assert "[5000.0, 5000.0, 6000.0, 6000.0]" in outside.content[0].text
    assert not edge.isError and edge.structuredContent["box"] == [600, 400, 640, 480]


def test_found_is_on_every_zoom_and_propose_result(engine):
    """A caller's box is found; the SD-RPN's is found unless no cell passes tau_roi, when the whole image comes back
    with found false (forced here with tau_roi = 1: a probability never exceeds it)."""

    async def go(client, runner):
        image_id = runner.images.put(IMAGE)
        query = "What is written in the box?"
        box = await client.call_tool("zoom", {"image_id": image_id, "box": {"coords": [0, 0, 1, 1], "frame": "unit"}})
        sd = await client.call_tool("zoom", {"image_id": image_id, "query": query})
        prop = await client.call_tool("propose", {"image_id": image_id, "query": query})
        return box, sd, prop

    box, sd, prop = with_client(engine, go)
    assert box.structuredContent["found"] is True
    assert sd.structuredContent["found"] is prop.structuredContent["found"] is True
    assert sd.structuredContent["box"] != [0, 0, 640, 480]
    engine.settings = dataclasses.replace(engine.settings, roi_thresh=1.0)  # this engine only (a fresh fixture)
    _, sd, prop = with_client(engine, go)
    assert sd.structuredContent["found"] is prop.structuredContent["found"] is False
    assert sd.structuredContent["box"] == [0, 0, 640, 480] and prop.structuredContent["boxes"] == [[0, 0, 640, 480]]
