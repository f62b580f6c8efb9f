"""The zoom tool through the third-party clients that agent builders use, installed in qzoom's own environment:
langchain-mcp-adapters over streamable HTTP with one persistent session (over stdio: tests/test_readme_tools.py),
LangChain's `bind_tools(strict=True)` checked by the `openai` package's strict-schema pass, and the HTTP client's
503 retries."""

from __future__ import annotations

import asyncio
import base64
import copy
import io
import json

import httpx
import pytest
from langchain_mcp_adapters.client import MultiServerMCPClient
from langchain_mcp_adapters.tools import load_mcp_tools
from langchain_openai import ChatOpenAI
from openai.lib._pydantic import _ensure_strict_json_schema
from PIL import Image

from conftest import scene
from qzoom.tools.http_client import QZoomClient, QZoomHTTPError
from qzoom.tools.langchain_tool import make_zoom_tool
from qzoom.tools.schema import ZoomArgs, openai_tool, strict_parameters
from test_service_mcp import LiveServer

IMAGE = scene(640, 480, 61)


def png_b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def blocks(content):
    """The adapter's tool output: LangChain content blocks (text JSON summary, then the image)."""
    text = next(b for b in content if b["type"] == "text")
    image = next(b for b in content if b["type"] == "image")
    return json.loads(text["text"]), image


async def zoom_twice(servers: dict) -> list:
    """Two calls through one adapter session (the README's persistent-session pattern)."""
    box = {"coords": [0.5, 0.5, 1.0, 1.0], "frame": "unit"}
    async with MultiServerMCPClient(servers).session("qzoom") as session:
        tools = {t.name: t for t in await load_mcp_tools(session)}
        first = await tools["zoom"].ainvoke({"image_data": png_b64(IMAGE), "box": box})
        bad = await tools["zoom"].ainvoke({"image_data": png_b64(IMAGE), "box": {**box, "coords": [2, 2, 3, 3]}})
        return [sorted(tools), first, bad]


def check_adapter_results(names, first, bad):
    assert names == ["gate", "propose", "zoom"]
    summary, image = blocks(first)
    assert summary["box"] == [320, 240, 640, 480] and summary["found"] is True
    assert Image.open(io.BytesIO(base64.b64decode(image["base64"]))).size == (320, 240)
    assert "outside [0, 1]" in str(bad)  # a tool error reaches the agent as text naming the field


def test_langchain_mcp_adapters_over_http():
    with LiveServer(api_keys=["k1"]) as live:
        server = {"transport": "streamable_http", "url": live.url + "/mcp/", "headers": {"X-API-Key": "k1"}}
        check_adapter_results(*asyncio.run(zoom_twice({"qzoom": server})))


def test_the_langchain_tool_binds_the_strict_schema():
    """`tool_call_schema` is the strict schema; ChatOpenAI.bind_tools(strict=True) sends it unchanged, and the
    openai package's strict-schema helper has nothing left to change in it."""
    tool = make_zoom_tool(QZoomClient("http://unused"))
    schema = tool.tool_call_schema
    assert isinstance(schema, dict)
    assert schema["required"] == list(ZoomArgs.model_fields) and schema["additionalProperties"] is False
    assert '"default"' not in json.dumps(schema)

    model = ChatOpenAI(model="gpt-5", api_key="sk-test", base_url="http://127.0.0.1:9/v1")
    bound = model.bind_tools([tool], strict=True)
    (sent,) = bound.kwargs["tools"]  # type: ignore[attr-defined]
    assert sent["function"]["strict"] is True and sent["function"]["name"] == "zoom"
    parameters = sent["function"]["parameters"]  # LangChain inlines the $defs; the shape must stay strict
    assert_strict(parameters)
    assert openai_strict(parameters) == parameters  # the openai package's strict pass has nothing to change
    ours = openai_tool("chat")["function"]["parameters"]
    assert openai_strict(ours) == ours == strict_parameters(ZoomArgs)


def openai_strict(schema: dict) -> dict:
    """The openai package's strict-mode pass (what `pydantic_function_tool` runs) over a copy of a schema dict."""
    copied = copy.deepcopy(schema)
    return _ensure_strict_json_schema(copied, path=(), root=copied)


def assert_strict(node, path="#"):
    """Every object closed and fully required, no defaults, anywhere in the schema."""
    if isinstance(node, dict):
        assert "default" not in node, path
        if node.get("type") == "object" or "properties" in node:
            assert node.get("additionalProperties") is False, path
            assert sorted(node.get("required", [])) == sorted(node.get("properties", {})), path
        for key, value in node.items():
            assert_strict(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            assert_strict(value, f"{path}/{i}")


def test_the_http_client_retries_503_with_retry_after():
    calls: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(asyncio.get_event_loop().time())
        if len(calls) < 3:
            body = {"error": {"code": "overloaded", "message": "queue full"}}
            return httpx.Response(503, json=body, headers={"Retry-After": "0"})
        return httpx.Response(200, json={"image_id": "abc"})

    async def go(retries: int):
        calls.clear()
        async with QZoomClient("http://svc", transport=httpx.MockTransport(handler), retries=retries) as client:
            return await client.upload(b"png")

    assert asyncio.run(go(3)) == "abc" and len(calls) == 3
    with pytest.raises(QZoomHTTPError) as err:
        asyncio.run(go(1))
    assert err.value.status == 503 and err.value.code == "overloaded" and len(calls) == 2
