"""The `zoom` tool against a running service: `QZoomClient` over HTTP (an ASGI transport into the real app),
behind the same LangChain tool as the in-process runner."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import httpx
import pytest
from langchain_core.messages import ToolMessage
from PIL import Image

from conftest import MAX_PIXELS, MIN_PIXELS, make_tiny_model, scene
from qzoom.engine import QZoomEngine
from qzoom.offline import build_processor, build_tokenizer
from qzoom.service.app import create_app
from qzoom.settings import Settings
from qzoom.tools.http_client import QZoomClient, QZoomHTTPError
from qzoom.tools.langchain_tool import make_zoom_tool

IMAGE = scene(640, 480, 31)


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def with_service(check):
    model = make_tiny_model()

    def factory(settings, cache):
        processor = build_processor(build_tokenizer(), min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
        return QZoomEngine(model, processor, name="tiny", cache=cache)

    app = create_app(factory, Settings(api_keys=["secret"], redis_url=None))

    async def go():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://qzoom") as probe:
                for _ in range(600):
                    if (await probe.get("/readyz")).status_code == 200:
                        break
                    await asyncio.sleep(0.05)
            async with QZoomClient("http://qzoom", api_key="secret", transport=transport) as client:
                return await check(client, transport)

    return asyncio.run(go())


def test_langchain_tool_zooms_through_the_service():
    async def check(client, transport):
        image_id = await client.upload(png(IMAGE))
        tool = make_zoom_tool(client)
        call = {"image_id": image_id, "box": {"coords": [0.5, 0.0, 1.0, 0.5], "frame": "unit"}}
        message = await tool.ainvoke({"type": "tool_call", "id": "c1", "name": "zoom", "args": call})
        missing = await tool.ainvoke(
            {"type": "tool_call", "id": "c2", "name": "zoom", "args": {**call, "image_id": "f" * 32}}
        )
        return message, missing

    message, missing = with_service(check)
    assert isinstance(message, ToolMessage)
    text, image = message.content
    assert json.loads(text["text"])["box"] == [320, 0, 640, 240] and message.artifact["box"] == [320, 0, 640, 240]
    crop = Image.open(io.BytesIO(base64.b64decode(image["base64"])))
    assert crop.size == (320, 240)
    assert crop.convert("RGB").getpixel((0, 0)) == IMAGE.getpixel((320, 0))
    assert "upload the image first" in str(missing.content) and "404" in str(missing.content)


def test_client_reports_service_errors_with_their_code():
    async def check(client, transport):
        async with QZoomClient("http://qzoom", api_key="wrong", transport=transport) as intruder:
            with pytest.raises(QZoomHTTPError) as denied:
                await intruder.upload(png(IMAGE))
        with pytest.raises(QZoomHTTPError) as not_image:
            await client.upload(b"hello, not an image")
        with pytest.raises(ValueError, match="local stdio"):
            client.parse({"image_path": "/etc/passwd", "box": {"coords": [0, 0, 1, 1], "frame": "unit"}})
        return denied.value, not_image.value

    denied, not_image = with_service(check)
    assert (denied.status, denied.code) == (401, "unauthorized")
    assert not_image.status == 415 and "PNG" in not_image.message
