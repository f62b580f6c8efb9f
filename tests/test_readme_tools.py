"""The README section "The `zoom` tool for agents", run as written: its MCP host configuration starts `qzoom mcp`,
its LangGraph example answers through a zoom call, its OpenAI example executes a Responses-API function call."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import pytest
from langchain_core.language_models.fake_chat_models import FakeMessagesListChatModel
from langchain_core.messages import AIMessage, ToolMessage
from pydantic import Field
from typer.testing import CliRunner

from conftest import scene
from qzoom.agent.tool import ImageStore, ZoomToolRunner
from qzoom.cli import app
from qzoom.tools.schema import openai_tool
from qzoom.worker import Worker

README = Path(__file__).parent.parent / "README.md"
IMAGE = scene(640, 480, 51)
pytestmark = pytest.mark.filterwarnings("ignore:create_react_agent has been moved")


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
    # The command exists with that option (the stdio server itself is exercised in tests/test_mcp.py).
    res = CliRunner().invoke(app, [*server["args"][:1], "--help"])
    assert res.exit_code == 0 and "--model" in res.output


class ToolCallingFake(FakeMessagesListChatModel):
    """Replays its script; records what it was shown so the test can see the tool's result."""

    seen: list[list[Any]] = Field(default_factory=list)

    def bind_tools(self, tools: Any, **kwargs: Any) -> ToolCallingFake:  # type: ignore[override]
        return self

    async def _agenerate(self, messages, stop=None, run_manager=None, **kwargs):  # type: ignore[override]
        self.seen.append(list(messages))
        return await super()._agenerate(messages, stop=stop, run_manager=run_manager, **kwargs)


def test_langgraph_example(checkpoint):
    ns = run_python_blocks()
    image_id = ImageStore().put(IMAGE)  # content ids: the same id the example's runner will hand out
    call = {"name": "zoom", "args": {"image_id": image_id, "query": "What is written in the box?"}, "id": "c1",
            "type": "tool_call"}  # fmt: skip
    model = ToolCallingFake(responses=[AIMessage("", tool_calls=[call]), AIMessage("K7X")])
    answer = asyncio.run(ns["ask_agent"](model, checkpoint, IMAGE, "What is written in the box?"))
    assert answer == "K7X"
    (tool_msg,) = [m for m in model.seen[1] if isinstance(m, ToolMessage)]
    assert tool_msg.status == "success" and json.loads(tool_msg.content[0]["text"])["box_source"] == "sd_rpn"
    assert tool_msg.content[1]["type"] == "image"


def test_openai_example(engine):
    ns = run_python_blocks()
    assert ns["tools"] == [openai_tool("responses")]
    arguments = {"image_id": None, "image_data": None, "image_path": None, "query": None, "margin": None,
                 "output_max_side": None, "box": {"coords": [0, 0, 500, 500], "frame": "permille",
                                                  "resized_width": None, "resized_height": None}}  # fmt: skip

    async def go():
        async with Worker(engine) as worker:
            runner = ZoomToolRunner(worker)
            arguments["image_id"] = runner.images.put(IMAGE)
            output = [
                {"type": "message", "role": "assistant", "content": []},
                {"type": "function_call", "name": "zoom", "call_id": "call_9", "arguments": json.dumps(arguments)},
            ]
            return await ns["run_zoom_calls"](runner, output)

    (result,) = asyncio.run(go())
    assert result["type"] == "function_call_output" and result["call_id"] == "call_9"
    text, crop = result["output"]
    assert json.loads(text["text"])["box"] == [0, 0, 320, 240]
    assert crop["image_url"].startswith("data:image/png;base64,iVBORw0KGgo")
