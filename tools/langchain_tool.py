"""The `zoom` tool as a LangChain tool (langchain-core), in process or against a running service.

    tool = make_zoom_tool(runner)                          # runner: a ZoomToolRunner around a started Worker
    tool = make_zoom_tool(QZoomClient("http://gpu-box:8000"))   # or the service, over HTTP (no torch here)
    agent = langchain.agents.create_agent(chat_model, [tool])
    await agent.ainvoke({"messages": [...]})               # async only: the worker lives on the event loop

Contract
--------
* name ``zoom``, ``args_schema`` = `ZoomArgs` (the one schema), ``response_format="content_and_artifact"``;
* ``tool_call_schema`` (what ``bind_tools`` sends to the model) is the OpenAI strict schema of `ZoomArgs`
  (`schema.strict_parameters`: every property required, optional ones nullable, ``additionalProperties: false``,
  no defaults), so ``bind_tools([tool], strict=True)`` sends a schema that strict mode accepts as is; LangChain's
  own subset model would drop ``required`` and add ``"default": null`` to every optional field;
* content (what the model sees): ``[text block with ZoomResult.summary_json(), image block with the crop as base64
  PNG]``; the text comes first so that integrations that keep only text still get the box in original pixels;
* artifact (``ToolMessage.artifact``, not shown to the model): ``ZoomResult.model_dump()`` (the PNG included);
* a bad call (an argument that fails validation, an unknown image id, an unreadable image) comes back to the model
  as the tool's text result naming the problem, so the agent can correct itself instead of crashing the graph.

The tool is async only (a `StructuredTool` with ``coroutine=`` and no ``func``): drive the agent with ``ainvoke`` /
``astream``. Importing this module loads no torch; the runner brings it.
"""

from __future__ import annotations

from typing import Any, Protocol

from langchain_core.messages.content import create_image_block, create_text_block
from langchain_core.tools import BaseTool, StructuredTool, ToolException
from pydantic import ValidationError

from .http_client import QZoomClient, QZoomHTTPError
from .schema import ZOOM_TOOL_DESCRIPTION, ZOOM_TOOL_NAME, ZoomArgs, ZoomResult, strict_parameters
from .tool_args import describe_validation_error

__all__ = ["ZoomBackend", "make_zoom_tool"]


class ZoomBackend(Protocol):
    """What executes the calls: `qzoom.agent.tool.ZoomToolRunner` (in process) or `QZoomClient` (over HTTP)."""

    def parse(self, arguments: dict[str, Any]) -> ZoomArgs: ...

    async def zoom(self, args: ZoomArgs) -> ZoomResult: ...


class _StrictSchemaTool(StructuredTool):
    """A StructuredTool whose tool-call schema is the strict JSON schema of its args model."""

    @property
    def tool_call_schema(self) -> dict[str, Any]:
        return {**strict_parameters(ZoomArgs), "title": self.name, "description": self.description}


def _tool_error(err: ValidationError | ToolException) -> str:
    if isinstance(err, ValidationError):
        return describe_validation_error(err, ZoomArgs)
    return str(err)


def make_zoom_tool(runner: ZoomBackend) -> BaseTool:
    """The `zoom` tool bound to ``runner``: a `ZoomToolRunner` (its worker, image store and image_path permission)
    or a `QZoomClient` (a running service)."""

    async def zoom(**arguments: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        if isinstance(runner, QZoomClient):
            return await _call(runner, arguments, ())
        from qzoom.agent.tool import UnknownImage
        from qzoom.images import ImageError
        from qzoom.worker import Overloaded

        return await _call(runner, arguments, (UnknownImage, ImageError, Overloaded))

    async def _call(
        backend: ZoomBackend, arguments: dict[str, Any], local_errors: tuple[type[Exception], ...]
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        caught: tuple[type[Exception], ...] = (PermissionError, FileNotFoundError, ValueError, *local_errors)
        try:
            # LangChain validated against ZoomArgs already (and passes only the fields the model sent, nested
            # ones as models); validate again with the backend's context, which is where image_path is allowed.
            args = backend.parse(arguments)
            result = await backend.zoom(args)
        except ValidationError as err:
            raise ToolException(describe_validation_error(err, ZoomArgs)) from None
        except QZoomHTTPError as err:
            raise ToolException(f"{err.message} (HTTP {err.status}, {err.code})") from None
        except caught as err:
            # UnknownImage is a KeyError, whose str() would quote the message; use the message itself.
            message = err.args[0] if isinstance(err, KeyError) and err.args else err
            raise ToolException(str(message)) from None
        content: list[dict[str, Any]] = [
            dict(create_text_block(result.summary_json())),
            dict(create_image_block(base64=result.crop_png_b64, mime_type="image/png")),
        ]
        return content, result.model_dump(mode="json")

    return _StrictSchemaTool(
        coroutine=zoom,
        name=ZOOM_TOOL_NAME,
        description=ZOOM_TOOL_DESCRIPTION,
        args_schema=ZoomArgs,
        response_format="content_and_artifact",
        handle_tool_error=_tool_error,
        handle_validation_error=_tool_error,
    )
