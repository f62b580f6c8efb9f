"""The README section "The `zoom` tool for agents", run as written: its MCP host configuration names `qzoom mcp`;
its persistent-session example drives `qzoom mcp` over stdio through langchain-mcp-adapters; its LangChain example
answers through `langchain.agents.create_agent` with a fake chat model; its OpenAI examples run the `openai` client
against a scripted server (Responses API: crop in the function output; Chat Completions: text in the tool message,
the crop in a following user message)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import sys
from pathlib import Path
from typing import Any

import httpx2
import pytest
from langchain_core.language_models.fake_chat_models import FakeMessagesListChatModel
from langchain_core.messages import AIMessage, ToolMessage
from openai import AsyncOpenAI
from PIL import Image
from pydantic import Field
from typer.testing import CliRunner

from conftest import scene
from qzoom.agent.tool import ImageStore, ZoomToolRunner
from qzoom.cli import app
from qzoom.worker import Worker

README = Path(__file__).parent.parent / "README.md"
IMAGE = scene(640, 480, 51)


def section_blocks(lang: str) -> list[str]:
    text = README.read_text()
    section = text.split("## The `zoom` tool for agents\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{lang}\n(.*?)```", section, flags=re.DOTALL)


def run_python_blocks() -> dict[str, Any]:
    namespace: dict[str, Any] = {"__name__": "readme"}
    for code in section_blocks("python"):
        exec(compile(code, str(README), "exec"), namespace)
    return namespace


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    res = CliRunner().invoke(app, ["init-tiny", str(out)])
    assert res.exit_code == 0, res.output
    return str(out)


def test_mcp_host_config_names_the_mcp_command():
    (config,) = section_blocks("json")
    server = json.loads(config)["mcpServers"]["qzoom"]
    assert server["command"] == "qzoom" and server["args"][:2] == ["mcp", "--model"]
    res = CliRunner().invoke(app, [*server["args"][:1], "--help"])
    assert res.exit_code == 0 and "--model" in res.output


def png_b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.slow
def test_persistent_mcp_session_over_stdio(checkpoint):
    """langchain-mcp-adapters against `qzoom mcp` over stdio: two calls, one session (one server process)."""
    ns = run_python_blocks()
    assert ns["SERVERS"]["qzoom"]["command"] == "qzoom" and ns["SERVERS"]["qzoom"]["args"][0] == "mcp"
    server = {
        "transport": "stdio",
        "command": sys.executable,
        "args": ["-m", "qzoom.cli", "mcp", "--model", checkpoint],
    }
    box = {"coords": [0.5, 0.5, 1.0, 1.0], "frame": "unit"}
    calls = [
        {"image_data": png_b64(IMAGE), "box": box},
        {"image_data": png_b64(IMAGE), "box": {**box, "coords": [2, 2, 3, 3]}},
    ]
    first, bad = asyncio.run(ns["zoom_many"](calls, {"qzoom": server}))
    text = next(b for b in first if b["type"] == "text")
    image = next(b for b in first if b["type"] == "image")
    summary = json.loads(text["text"])
    assert summary["box"] == [320, 240, 640, 480] and summary["found"] is True
    assert Image.open(io.BytesIO(base64.b64decode(image["base64"]))).size == (320, 240)
    assert "outside [0, 1]" in str(bad)  # the tool error reaches the agent as text


class ToolCallingFake(FakeMessagesListChatModel):
    """Replays its script; records what it was shown so the test can see the tool's result."""

    seen: list[list[Any]] = Field(default_factory=list)

    def bind_tools(self, tools: Any, **kwargs: Any) -> ToolCallingFake:  # type: ignore[override]
        return self

    async def _agenerate(self, messages, stop=None, run_manager=None, **kwargs):  # type: ignore[override]
        self.seen.append(list(messages))
        return await super()._agenerate(messages, stop=stop, run_manager=run_manager, **kwargs)


def test_langchain_create_agent_example(checkpoint):
    ns = run_python_blocks()
    from qzoom.models import DEMO_MODEL

    assert ns["ask_agent"].__defaults__ == (DEMO_MODEL,)  # the shipped demo model by default
    image_id = ImageStore().put(IMAGE)  # content ids: the same id the example's runner will hand out
    call = {"name": "zoom", "args": {"image_id": image_id, "query": "What is written in the box?"}, "id": "c1",
            "type": "tool_call"}  # fmt: skip
    model = ToolCallingFake(responses=[AIMessage("", tool_calls=[call]), AIMessage("K7X")])
    answer = asyncio.run(ns["ask_agent"](model, IMAGE, "What is written in the box?", checkpoint))
    assert answer == "K7X"
    (tool_msg,) = [m for m in model.seen[1] if isinstance(m, ToolMessage)]
    summary = json.loads(tool_msg.content[0]["text"])
    assert tool_msg.status == "success" and summary["box_source"] == "sd_rpn" and isinstance(summary["found"], bool)
    assert tool_msg.content[1]["type"] == "image"


class ScriptedOpenAI:
    """A scripted OpenAI server at the HTTP seam: answers each request with the next scripted body, keeps requests."""

    def __init__(self, bodies: list[dict[str, Any]]) -> None:
        self.bodies = bodies
        self.requests: list[dict[str, Any]] = []

    def handler(self, request: httpx2.Request) -> httpx2.Response:
        self.requests.append(json.loads(request.content))
        return httpx2.Response(200, json=self.bodies[len(self.requests) - 1])

    def client(self) -> AsyncOpenAI:
        http = httpx2.AsyncClient(transport=httpx2.MockTransport(self.handler))
        return AsyncOpenAI(api_key="sk-test", base_url="http://openai.test/v1", http_client=http)


def zoom_arguments(image_id: str) -> str:
    box = {"coords": [0, 0, 500, 500], "frame": "permille", "resized_width": None, "resized_height": None}
    return json.dumps({"image_id": image_id, "image_data": None, "image_path": None, "query": None, "margin": None,
                       "output_max_side": None, "box": box})  # fmt: skip


def run_with_runner(engine, fn):
    async def go():
        async with Worker(engine) as worker:
            runner = ZoomToolRunner(worker)
            return await fn(runner, runner.images.put(IMAGE))

    return asyncio.run(go())


def test_openai_responses_example(engine):
    ns = run_python_blocks()

    async def go(runner, image_id):
        calls = [
            {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "zoom",
             "arguments": zoom_arguments(image_id), "status": "completed"},
            {"type": "function_call", "id": "fc_2", "call_id": "call_2", "name": "zoom",
             "arguments": '{"image_id": "nope"}', "status": "completed"},
        ]  # fmt: skip
        answer = {"type": "message", "id": "m1", "role": "assistant", "status": "completed",
                  "content": [{"type": "output_text", "text": "K7X", "annotations": []}]}  # fmt: skip
        head = {"object": "response", "created_at": 0, "model": "gpt-5", "status": "completed"}
        server = ScriptedOpenAI([{**head, "id": "r1", "output": calls}, {**head, "id": "r2", "output": [answer]}])
        return await ns["ask_responses"](server.client(), runner, f"[image_id {image_id}] read it"), server

    answer, server = run_with_runner(engine, go)
    assert answer == "K7X"
    first, second = server.requests
    assert first["tools"][0]["name"] == "zoom" and first["tools"][0]["strict"] is True
    outputs = [i for i in second["input"] if i.get("type") == "function_call_output"]
    assert [o["call_id"] for o in outputs] == ["call_1", "call_2"]
    text, crop = outputs[0]["output"]
    assert json.loads(text["text"])["box"] == [0, 0, 320, 240]
    assert crop["type"] == "input_image" and crop["image_url"].startswith("data:image/png;base64,iVBORw0KGgo")
    assert len(outputs[1]["output"]) == 1 and "image_id" in outputs[1]["output"][0]["text"]  # error, as text


def test_openai_chat_completions_example(engine):
    ns = run_python_blocks()

    async def go(runner, image_id):
        tool_call = {
            "id": "call_1",
            "type": "function",
            "function": {"name": "zoom", "arguments": zoom_arguments(image_id)},
        }
        server = ScriptedOpenAI([
            {"id": "c1", "object": "chat.completion", "created": 0, "model": "gpt-5", "choices": [
                {"index": 0, "finish_reason": "tool_calls",
                 "message": {"role": "assistant", "content": None, "tool_calls": [tool_call]}}]},
            {"id": "c2", "object": "chat.completion", "created": 0, "model": "gpt-5", "choices": [
                {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "K7X"}}]},
        ])  # fmt: skip
        return await ns["ask_chat"](server.client(), runner, f"[image_id {image_id}] read it"), server

    answer, server = run_with_runner(engine, go)
    assert answer == "K7X"
    first, second = server.requests
    assert first["tools"][0]["function"]["strict"] is True
    roles = [m["role"] for m in second["messages"]]
    assert roles == ["user", "assistant", "tool", "user"]
    tool_msg, crops = second["messages"][2], second["messages"][3]
    assert isinstance(tool_msg["content"], str) and json.loads(tool_msg["content"])["box"] == [0, 0, 320, 240]
    images = [p for p in crops["content"] if p["type"] == "image_url"]
    assert len(images) == 1 and images[0]["image_url"]["url"].startswith("data:image/png;base64,iVBORw0KGgo")
