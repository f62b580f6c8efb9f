"""The MCP server (qzoom.tools.mcp_server): the SDK's in-memory client against the tiny engine, and `qzoom mcp`
as a real stdio subprocess driven by the SDK's stdio client."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import sys

import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from mcp.types import ImageContent, TextContent
from PIL import Image
from typer.testing import CliRunner

from conftest import scene
from qzoom.agent.tool import ZoomToolRunner, png_b64
from qzoom.cli import app
from qzoom.tools.mcp_server import build_mcp_server
from qzoom.tools.schema import ZoomArgs
from qzoom.worker import Worker

IMAGE = scene(640, 480, 31)


def with_client(engine, fn, *, allow_image_path: bool = False):
    async def go():
        async with Worker(engine) as worker:
            runner = ZoomToolRunner(worker, allow_image_path=allow_image_path)
            async with Client(build_mcp_server(lambda: runner), raise_exceptions=True) as client:
                return await fn(client, runner)

    return asyncio.run(go())


def blocks(result):
    image, text = result.content
    assert isinstance(image, ImageContent) and isinstance(text, TextContent)
    assert image.mime_type == "image/png"
    return Image.open(io.BytesIO(base64.b64decode(image.data))), json.loads(text.text)


def test_tools_are_listed_with_pydantic_input_schemas(engine):
    async def go(client, runner):
        return {t.name: t for t in (await client.list_tools()).tools}

    tools = with_client(engine, go)
    assert set(tools) == {"zoom", "gate", "propose"}
    assert tools["zoom"].input_schema == ZoomArgs.model_json_schema()
    assert tools["gate"].input_schema["required"] == ["image_id", "image_data", "image_path", "query"]
    assert tools["propose"].input_schema["additionalProperties"] is False


def test_zoom_with_a_box_returns_image_text_and_structured_content(engine):
    async def go(client, runner):
        image_id = runner.images.put(IMAGE)
        return await client.call_tool(
            "zoom", {"image_id": image_id, "box": {"coords": [0.5, 0, 1, 0.5], "frame": "unit"}}
        )

    res = with_client(engine, go)
    assert not res.is_error
    crop, summary = blocks(res)
    assert summary["box"] == [320, 0, 640, 240] and summary["box_source"] == "caller"
    assert list(crop.size) == summary["crop_wh"] == [320, 240]
    assert crop.convert("RGB").getpixel((0, 0)) == IMAGE.getpixel((320, 0))
    assert res.structured_content == summary and "crop_png_b64" not in summary


def test_zoom_with_a_query_uses_the_sd_rpn(engine):
    async def go(client, runner):
        return await client.call_tool("zoom", {"image_data": png_b64(IMAGE), "query": "What is in the red box?"})

    res = with_client(engine, go)
    assert not res.is_error
    crop, summary = blocks(res)
    x0, y0, x1, y1 = summary["box"]
    assert summary["box_source"] == "sd_rpn" and 0 <= x0 < x1 <= 640 and 0 <= y0 < y1 <= 480
    assert list(crop.size) == summary["crop_wh"] == [x1 - x0, y1 - y0]
    assert 0.0 <= summary["gate_score"] <= 1.0 and summary["heatmap"]["grid_hw"]
    assert res.structured_content == summary


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
    assert all(r.is_error for r in results)
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
    assert not gate.is_error and not propose.is_error
    g = json.loads(gate.content[0].text)
    assert g == gate.structured_content
    assert 0.0 <= g["gate_score"] <= 1.0 and isinstance(g["needs_detail"], bool)
    assert g["needs_detail"] == (g["gate_score"] >= engine.settings.high_res_thresh)
    p = propose.structured_content
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
    params = StdioServerParameters(command=sys.executable, args=["-m", "qzoom.cli", "mcp", "--model", str(model)])

    async def go():
        async with Client(params, read_timeout_seconds=60) as client:
            names = sorted(t.name for t in (await client.list_tools()).tools)
            res = await client.call_tool(
                "zoom", {"image_path": str(path), "box": {"coords": [100, 200, 300, 400], "frame": "permille"}}
            )
            return names, res

    names, res = asyncio.run(go())
    assert names == ["gate", "propose", "zoom"]
    assert not res.is_error
    crop, summary = blocks(res)
    assert summary["box"] == [64, 96, 192, 192] and crop.size == (128, 96)


def test_qzoom_mcp_with_a_missing_model_fails_before_the_protocol_starts():
    missing = CliRunner().invoke(app, ["mcp", "--model", "/nonexistent/ckpt"])
    assert missing.exit_code == 2 and "model directory /nonexistent/ckpt does not exist" in missing.output
