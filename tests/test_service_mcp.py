"""The MCP server mounted in the service at /mcp/: the MCP SDK's streamable-HTTP client against uvicorn on a
loopback port (JSON responses: a crop over 1 MiB comes back whole; the request cap is the service's 32 MB)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import time

import httpx
import numpy as np
import uvicorn
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.types import ImageContent, TextContent
from PIL import Image

from conftest import MAX_PIXELS, MIN_PIXELS, make_tiny_model, scene
from qzoom.engine import QZoomEngine
from qzoom.offline import build_processor, build_tokenizer
from qzoom.service.app import create_app
from qzoom.settings import Settings

IMAGE = scene(600, 400, 41)


def factory(settings, cache):
    processor = build_processor(build_tokenizer(), min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    return QZoomEngine(make_tiny_model(), processor, name="tiny", cache=cache)


class LiveServer:
    """uvicorn serving the app on 127.0.0.1 with a free port, in a background thread."""

    def __init__(self, **settings):
        app = create_app(factory, Settings(redis_url=None, **{"api_keys": [], **settings}))
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}"
        while httpx.get(self.url + "/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)


def png_b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def session(url: str):
    """An initialised MCP SDK client session over streamable HTTP (the caller enters it)."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def open_session():
        async with streamable_http_client(url + "/mcp/") as (read, write, _), ClientSession(read, write) as client:
            await client.initialize()
            yield client

    return open_session()


def test_a_real_mcp_client_zooms_through_the_service():
    async def go(url):
        async with session(url) as client:
            names = sorted(t.name for t in (await client.list_tools()).tools)
            box = {"coords": [0.5, 0.5, 1.0, 1.0], "frame": "unit"}
            result = await client.call_tool("zoom", {"image_data": png_b64(IMAGE), "box": box})
            local = await client.call_tool("zoom", {"image_path": "/etc/hosts", "box": box})
            return names, result, local

    with LiveServer() as live:
        names, result, local = asyncio.run(go(live.url))
    assert names == ["gate", "propose", "zoom"]
    assert not result.isError
    image = next(c for c in result.content if isinstance(c, ImageContent))
    text = next(c for c in result.content if isinstance(c, TextContent))
    assert json.loads(text.text)["box"] == [300, 200, 600, 400]
    assert Image.open(io.BytesIO(base64.b64decode(image.data))).size == (300, 200)
    assert local.isError  # the service cannot be asked to read its own files


def test_mcp_mount_asks_for_the_api_key_and_checks_the_host():
    with LiveServer(api_keys=["k1"]) as live:
        body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
        headers = {"Accept": "application/json, text/event-stream"}
        denied = httpx.post(live.url + "/mcp/", json=body, headers=headers)
        foreign = httpx.post(
            live.url + "/mcp/", json=body, headers={**headers, "X-API-Key": "k1", "Host": "evil.example"}
        )
        health = httpx.get(live.url + "/healthz")
    assert denied.status_code == 401 and denied.json()["error"]["code"] == "unauthorized"
    assert foreign.status_code == 421  # DNS-rebinding protection: an unknown Host is refused
    assert health.status_code == 200


def noise_png(w: int, h: int, seed: int = 0) -> bytes:
    """Random pixels: PNG cannot compress them, so the file is about 3 bytes a pixel."""
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_a_crop_over_1_mib_and_a_request_over_4_mib_pass_over_http():
    """A 4.3 MB image sent as image_data (over the SDK's 4 MiB default request cap), and its whole-image crop
    (over the 1 MiB SSE event cap of MCP clients) coming back: JSON responses carry any size."""
    data = noise_png(1200, 1200)
    assert len(base64.b64encode(data)) > 4 * 1024 * 1024

    async def go(url):
        async with session(url) as client:
            return await client.call_tool(
                "zoom",
                {"image_data": base64.b64encode(data).decode(), "box": {"coords": [0, 0, 1, 1], "frame": "unit"}},
            )

    with LiveServer() as live:
        result = asyncio.run(go(live.url))
    assert not result.isError, result.content
    image = next(c for c in result.content if isinstance(c, ImageContent))
    png = base64.b64decode(image.data)
    assert len(png) > 1024 * 1024 and result.structuredContent["crop_bytes"] == len(png)
    assert result.structuredContent["crop_mime_type"] == "image/png"
    crop = Image.open(io.BytesIO(png))
    assert crop.size == (1200, 1200) and crop.tobytes() == Image.open(io.BytesIO(data)).convert("RGB").tobytes()


def test_mcp_bodies_over_the_service_limit_get_the_services_413():
    with LiveServer(max_body_mb=1.0) as live:
        body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                "params": {"name": "zoom", "arguments": {"image_data": "A" * 1_100_000, "query": "q"}}}  # fmt: skip
        headers = {"Accept": "application/json, text/event-stream"}
        r = httpx.post(live.url + "/mcp/", json=body, headers=headers)
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "body_too_large" and "QZOOM_MAX_BODY_MB" in r.json()["error"]["message"]
