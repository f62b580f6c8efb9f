"""The LangChain `zoom` tool (qzoom.tools.langchain_tool) inside a LangGraph prebuilt agent driven by a fake chat
model: the model calls `zoom`, gets the crop (image block + text block), and answers from it."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from typing import Any

from langchain.agents import create_agent
from langchain_core.language_models.fake_chat_models import FakeMessagesListChatModel
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from PIL import Image
from pydantic import Field

from conftest import scene
from qzoom.agent.tool import ZoomToolRunner
from qzoom.tools.langchain_tool import make_zoom_tool
from qzoom.tools.schema import ZoomArgs
from qzoom.worker import Worker

IMAGE = scene(640, 480, 41)
# `langchain.agents.create_agent` is its successor, but `langchain` is not a dependency; langgraph's still works.


class ToolCallingFake(FakeMessagesListChatModel):
    """Replays its scripted messages; accepts `bind_tools` (the prebuilt agent calls it) and ignores the tools."""

    seen: list[list[Any]] = Field(default_factory=list)

    def bind_tools(self, tools: Any, **kwargs: Any) -> ToolCallingFake:  # type: ignore[override]
        return self

    async def _agenerate(self, messages, stop=None, run_manager=None, **kwargs):  # type: ignore[override]
        self.seen.append(list(messages))
        return await super()._agenerate(messages, stop=stop, run_manager=run_manager, **kwargs)


def run_agent(engine, script):
    async def go():
        async with Worker(engine) as worker:
            runner = ZoomToolRunner(worker)
            image_id = runner.images.put(IMAGE)
            model = ToolCallingFake(responses=script(image_id), seen=[])
            agent = create_agent(model, [make_zoom_tool(runner)])
            out = await agent.ainvoke({"messages": [HumanMessage("What is in the top-right quarter?")]})
            return out["messages"], model.seen

    return asyncio.run(go())


def test_agent_calls_zoom_and_answers_from_the_crop(engine):
    box = {"coords": [0.5, 0.0, 1.0, 0.5], "frame": "unit"}

    def script(image_id):
        call = {"name": "zoom", "args": {"image_id": image_id, "box": box}, "id": "call_1", "type": "tool_call"}
        return [AIMessage("", tool_calls=[call]), AIMessage("A coloured box with the text K7X.")]

    messages, seen = run_agent(engine, script)
    tool_msgs = [m for m in messages if isinstance(m, ToolMessage)]
    assert len(tool_msgs) == 1 and tool_msgs[0].status == "success" and tool_msgs[0].name == "zoom"
    text, image = tool_msgs[0].content
    assert text["type"] == "text" and image["type"] == "image" and image["mime_type"] == "image/png"
    summary = json.loads(text["text"])
    assert summary["box"] == [320, 0, 640, 240] and summary["box_source"] == "caller"
    crop = Image.open(io.BytesIO(base64.b64decode(image["base64"])))
    assert crop.size == (320, 240)
    artifact = tool_msgs[0].artifact
    assert artifact["box"] == summary["box"] and artifact["crop_png_b64"] == image["base64"]
    assert messages[-1].content == "A coloured box with the text K7X."
    # The second model turn saw the tool's result (image and text), not the artifact.
    assert any(isinstance(m, ToolMessage) and m.content == tool_msgs[0].content for m in seen[1])


def test_bad_call_reaches_the_model_as_text_naming_the_field(engine):
    def script(image_id):
        bad = {"image_id": image_id, "box": {"coords": [0, 0, 2, 1], "frame": "unit"}}
        call = {"name": "zoom", "args": bad, "id": "call_1", "type": "tool_call"}
        return [AIMessage("", tool_calls=[call]), AIMessage("Sorry.")]

    messages, _ = run_agent(engine, script)
    (tool_msg,) = [m for m in messages if isinstance(m, ToolMessage)]
    assert "box:" in tool_msg.content and "outside [0, 1]" in tool_msg.content
    assert messages[-1].content == "Sorry."


def test_tool_schema_is_the_zoom_args_schema(engine):
    async def go():
        async with Worker(engine) as worker:
            return make_zoom_tool(ZoomToolRunner(worker))

    tool = asyncio.run(go())
    assert tool.name == "zoom" and tool.args_schema is ZoomArgs and tool.response_format == "content_and_artifact"
