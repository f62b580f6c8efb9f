"""The MCP server mounted in the service at /mcp/: a real MCP client over streamable HTTP, against uvicorn on a
loopback port."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import time

import httpx
import uvicorn
from mcp import Client
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


def test_a_real_mcp_client_zooms_through_the_service():
    async def go(url):
        async with Client(url + "/mcp/", read_timeout_seconds=60) as client:
            names = sorted(t.name for t in (await client.list_tools()).tools)
            box = {"coords": [0.5, 0.5, 1.0, 1.0], "frame": "unit"}
            result = await client.call_tool("zoom", {"image_data": png_b64(IMAGE), "box": box})
            local = await client.call_tool("zoom", {"image_path": "/etc/hosts", "box": box})
            return names, result, local

    with LiveServer() as live:
        names, result, local = asyncio.run(go(live.url))
    assert names == ["gate", "propose", "zoom"]
    assert not result.is_error
    image = next(c for c in result.content if isinstance(c, ImageContent))
    text = next(c for c in result.content if isinstance(c, TextContent))
    assert json.loads(text.text)["box"] == [300, 200, 600, 400]
    assert Image.open(io.BytesIO(base64.b64decode(image.data))).size == (300, 200)
    assert local.is_error  # the service cannot be asked to read its own files


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
