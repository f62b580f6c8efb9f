"""The `zoom` tool (and `gate`, `propose`) as an MCP server, on the official `mcp` SDK (2.x, `MCPServer`).

    server = build_mcp_server(lambda: runner)          # runner: a ZoomToolRunner around a started Worker
    async with Client(server) as client:               # in-memory (tests); `qzoom mcp` serves it over stdio
        result = await client.call_tool("zoom", {"image_id": ..., "box": {"coords": [0, 0, .5, .5], "frame": "unit"}})

Contract
--------
* ``zoom``: arguments are exactly the fields of `ZoomArgs` (its JSON schema is the tool's input schema). The result
  holds three things: an image block (the crop, PNG), a text block with `ZoomResult.summary_json()` (everything but
  the PNG, box in original pixels: hosts that drop images still get the box), and ``structuredContent`` = the same
  summary as an object.
* ``gate``: image + question -> ``{"gate_score": float, "needs_detail": bool}`` (an error when the checkpoint has no
  gate). ``needs_detail`` compares the score with the checkpoint's tau_gate.
* ``propose``: image + question (+ ``max_boxes``) -> the SD-RPN's boxes in original pixels (largest first as the
  engine orders them; the whole image when no cell passed tau_roi), the gate score when there is a gate, and a
  `HeatmapSummary`.
* Bad arguments come back as a tool error (``isError: true``) whose text names each bad field and what it accepts;
  so do unknown image ids, unreadable images and an overloaded worker. Nothing a caller sends crashes the server.
* ``image_path`` is accepted only when the runner allows it (`run_stdio`, the local desktop mode).

Importing this module loads neither torch nor PIL (an agent host may import the tool package without them): the
engine, worker and runner are imported inside the functions that need them.
"""

from __future__ import annotations

import base64
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar

from mcp.server import MCPServer
from mcp.server.mcpserver import Image
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.mcpserver.tools import Tool
from mcp.server.mcpserver.utilities.func_metadata import ArgModelBase, FuncMetadata
from mcp.types import CallToolResult, TextContent
from pydantic import BaseModel, ConfigDict, ValidationError

from .schema import ZOOM_TOOL_DESCRIPTION, ZOOM_TOOL_NAME, ZoomArgs
from .tool_args import GateArgs, ProposeArgs, describe_validation_error

if TYPE_CHECKING:
    from qzoom.agent.tool import ZoomToolRunner

__all__ = ["GATE_TOOL_NAME", "PROPOSE_TOOL_NAME", "build_mcp_server", "run_stdio"]

logger = logging.getLogger(__name__)  # stdio carries the protocol on stdout: logs go to stderr via logging

GATE_TOOL_NAME = "gate"
PROPOSE_TOOL_NAME = "propose"

RunnerFactory = Callable[[], "ZoomToolRunner"]
Lifespan = Callable[[MCPServer[Any]], AbstractAsyncContextManager[Any]]
M = TypeVar("M", bound=BaseModel)

GATE_DESCRIPTION = (
    "Ask the Q-Zoom gate whether answering a question about an image needs a closer look (high-resolution "
    'detail). Returns {"gate_score": probability, "needs_detail": bool}.'
)
PROPOSE_DESCRIPTION = (
    "Ask the Q-Zoom region proposer (SD-RPN) where in an image the answer to a question is. Returns boxes "
    "[x0, y0, x1, y1] in original-image pixels (x1/y1 exclusive), the gate score, and a summary of the heatmap."
)


class _RawArguments(ArgModelBase):
    """Hands the raw argument object to the tool unvalidated: the tool validates it with its own pydantic model,
    so that the error text is ours and `image_path` is checked with the runner's permission (a validation context,
    which the SDK's argument model cannot pass)."""

    model_config = ConfigDict(extra="allow", arbitrary_types_allowed=True)

    def model_dump_one_level(self) -> dict[str, Any]:
        return {"arguments": dict(self.model_extra or {})}


def _tool(fn: Callable[..., Any], name: str, description: str, model: type[BaseModel]) -> Tool:
    """An SDK tool whose input schema is ``model``'s JSON schema (the one source of truth), not one derived from a
    Python signature."""
    return Tool(
        fn=fn,
        name=name,
        description=description,
        parameters=model.model_json_schema(),
        fn_metadata=FuncMetadata(arg_model=_RawArguments),
        is_async=True,
    )


def _validate(model: type[M], arguments: dict[str, Any], runner: ZoomToolRunner) -> M:
    try:
        return model.model_validate(arguments, context={"allow_image_path": runner.allow_image_path})
    except ValidationError as err:
        raise ToolError(describe_validation_error(err, model)) from None


async def _guarded(call: Callable[[], Awaitable[CallToolResult]]) -> CallToolResult:
    """Run one tool body, turning what a caller can cause into a readable tool error."""
    from qzoom.agent.tool import UnknownImage
    from qzoom.images import ImageError
    from qzoom.worker import Overloaded

    try:
        return await call()
    except ToolError:
        raise
    except ValidationError as err:
        raise ToolError(describe_validation_error(err, ZoomArgs)) from None
    except UnknownImage as err:
        raise ToolError(str(err.args[0]) if err.args else str(err)) from None
    except (ImageError, Overloaded, PermissionError, FileNotFoundError, ValueError) as err:
        raise ToolError(str(err)) from None


def build_mcp_server(
    runner_factory: RunnerFactory,
    *,
    name: str = "qzoom",
    lifespan: Lifespan | None = None,
) -> MCPServer[Any]:
    """An MCP server with the `zoom`, `gate` and `propose` tools, each call run by ``runner_factory()``.

    The factory is called per call, so the runner (and its worker) may be created later, in ``lifespan``.
    """

    async def zoom(arguments: dict[str, Any]) -> CallToolResult:
        runner = runner_factory()

        async def body() -> CallToolResult:
            args = _validate(ZoomArgs, arguments, runner)
            result = await runner.zoom(args)
            png = base64.b64decode(result.crop_png_b64)
            return CallToolResult(
                content=[
                    Image(data=png, format="png").to_image_content(),
                    TextContent(type="text", text=result.summary_json()),
                ],
                structured_content=result.model_dump(mode="json", exclude={"crop_png_b64"}),
            )

        return await _guarded(body)

    async def gate(arguments: dict[str, Any]) -> CallToolResult:
        runner = runner_factory()

        async def body() -> CallToolResult:
            args = _validate(GateArgs, arguments, runner)
            if not runner.worker.engine.has_gate:
                raise ToolError("this checkpoint has no gate (enable_high_res is false); use propose or zoom")
            score, threshold = await runner.gate(runner.load(args.zoom_args(runner)), args.query)
            out = {"gate_score": score, "needs_detail": score >= threshold}
            return _json_result(out)

        return await _guarded(body)

    async def propose(arguments: dict[str, Any]) -> CallToolResult:
        runner = runner_factory()

        async def body() -> CallToolResult:
            args = _validate(ProposeArgs, arguments, runner)
            if not runner.worker.engine.has_rpn:
                raise ToolError("this checkpoint has no region proposer (SD-RPN); send zoom a box instead")
            image = runner.load(args.zoom_args(runner))
            boxes_px, gate_score, heatmap = await runner.propose(image, args.query, max_boxes=args.max_boxes)
            out = {
                "boxes": [b.as_list() for b in boxes_px],
                "image_wh": [image.width, image.height],
                "gate_score": None if gate_score is None or not math.isfinite(gate_score) else float(gate_score),
                "heatmap": heatmap.model_dump(mode="json"),
            }
            return _json_result(out)

        return await _guarded(body)

    tools = [
        _tool(zoom, ZOOM_TOOL_NAME, ZOOM_TOOL_DESCRIPTION, ZoomArgs),
        _tool(gate, GATE_TOOL_NAME, GATE_DESCRIPTION, GateArgs),
        _tool(propose, PROPOSE_TOOL_NAME, PROPOSE_DESCRIPTION, ProposeArgs),
    ]
    return MCPServer(
        name,
        instructions="Query-aware zooming (Q-Zoom): crop the region of an image that a question needs.",
        tools=tools,
        lifespan=lifespan,
    )


def _json_result(out: dict[str, Any]) -> CallToolResult:
    import json

    return CallToolResult(content=[TextContent(type="text", text=json.dumps(out))], structured_content=out)


def run_stdio(model_dir: str | None) -> None:
    """Serve `zoom`, `gate` and `propose` over stdio (local desktop mode: ``image_path`` allowed).

    The checkpoint (``model_dir``, else ``QZOOM_MODEL``, else the shipped qzoom-tiny) is loaded and the worker
    started in the server's lifespan, i.e. once the host has started the process.
    """
    from qzoom.settings import get_settings

    settings = get_settings()
    path = model_dir or settings.model_dir()
    holder: dict[str, ZoomToolRunner] = {}

    def runner_factory() -> ZoomToolRunner:
        return holder["runner"]

    @asynccontextmanager
    async def lifespan(_: MCPServer[Any]) -> AsyncIterator[None]:
        from qzoom.agent.tool import ZoomToolRunner
        from qzoom.engine import QZoomEngine
        from qzoom.worker import Worker

        engine = QZoomEngine.from_pretrained(path, device=settings.torch_device(), dtype=settings.torch_dtype())
        async with Worker(engine) as worker:
            holder["runner"] = ZoomToolRunner(worker, allow_image_path=True)
            logger.info("qzoom mcp: serving %s over stdio", path)
            yield

    build_mcp_server(runner_factory, lifespan=lifespan).run("stdio")
