"""The `zoom` tool (and `gate`, `propose`) as an MCP server, on the official `mcp` SDK's public low-level server.

    server = build_mcp_server(lambda: runner)          # runner: a ZoomToolRunner around a started Worker
    async with create_connected_server_and_client_session(server) as client:     # in memory (tests)
        result = await client.call_tool("zoom", {"image_id": ..., "box": {"coords": [0, 0, .5, .5], "frame": "unit"}})

`qzoom mcp` serves it over stdio (`run_stdio`); the service mounts it at `/mcp/` over streamable HTTP
(`qzoom.service.mcp`, JSON responses: one JSON body per call, so crops of any allowed size arrive whole).

Why the low-level server: the tools' input schemas are the pydantic models' own JSON schemas (`ZoomArgs`, ...), the
one source of truth, and arguments are validated by those models so that the error text is ours and ``image_path``
is checked with the runner's permission (a validation context). `mcp.server.lowlevel.Server` takes the raw schema
and hands the raw arguments over; nothing of the SDK is subclassed. The SDK pin is 1.x because the LangChain MCP
adapters (langchain-mcp-adapters 0.3) require ``mcp<2``.

Contract
--------
* ``zoom``: arguments are exactly the fields of `ZoomArgs`. The result holds an image block (the crop, PNG), a text
  block with the summary JSON and ``structuredContent`` = the same summary as an object (`McpZoomOutput`: the
  `ZoomSummary` fields, ``found`` included, plus ``crop_mime_type`` and ``crop_bytes``, which say how the image
  block is encoded). Hosts that drop images still get the box in original pixels.
* ``gate``: image + question -> `GateOutput` ``{"gate_score", "needs_detail"}`` (an error when the checkpoint has
  no gate). ``needs_detail`` compares the score with the checkpoint's tau_gate.
* ``propose``: image + question (+ ``max_boxes``) -> `ProposeOutput`: the SD-RPN's boxes in original pixels
  (largest first; the whole image with ``found: false`` when no cell passed tau_roi), the gate score when there is
  a gate, and a `HeatmapSummary`.
* Every tool lists an ``outputSchema`` (its structured content validates against it) and annotations: read-only,
  non-destructive, idempotent, closed-world. ``serverInfo.version`` is qzoom's version.
* Bad arguments come back as a tool error (``isError: true``) whose text names each bad field and what it accepts;
  so do unknown image ids, images refused by the input guards (format, pixel cap: the same messages as REST), boxes
  outside the image and an overloaded worker. Nothing a caller sends crashes the server.
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
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any, TypeVar

from mcp import types
from mcp.server.lowlevel import Server
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .schema import ZOOM_TOOL_DESCRIPTION, ZOOM_TOOL_NAME, HeatmapSummary, ZoomArgs, ZoomSummary
from .tool_args import GateArgs, ProposeArgs, describe_validation_error

if TYPE_CHECKING:
    from qzoom.agent.tool import ZoomToolRunner

__all__ = [
    "GATE_TOOL_NAME",
    "PROPOSE_TOOL_NAME",
    "GateOutput",
    "McpZoomOutput",
    "ProposeOutput",
    "ToolFailure",
    "build_mcp_server",
    "run_stdio",
    "server_version",
]

logger = logging.getLogger(__name__)  # stdio carries the protocol on stdout: logs go to stderr via logging

GATE_TOOL_NAME = "gate"
PROPOSE_TOOL_NAME = "propose"

RunnerFactory = Callable[[], "ZoomToolRunner"]
Lifespan = Callable[[Server[Any, Any]], AbstractAsyncContextManager[Any]]
M = TypeVar("M", bound=BaseModel)

GATE_DESCRIPTION = (
    "Ask the Q-Zoom gate whether answering a question about an image needs a closer look (high-resolution "
    'detail). Returns {"gate_score": probability, "needs_detail": bool}.'
)
PROPOSE_DESCRIPTION = (
    "Ask the Q-Zoom region proposer (SD-RPN) where in an image the answer to a question is. Returns boxes "
    "[x0, y0, x1, y1] in original-image pixels (x1/y1 exclusive), found (false: nothing stood out and the box is "
    "the whole image), the gate score, and a summary of the heatmap."
)
# Every tool only reads the image it is given and computes: safe to call, repeat and run unattended.
_ANNOTATIONS = {"readOnlyHint": True, "destructiveHint": False, "idempotentHint": True, "openWorldHint": False}


class ToolFailure(Exception):
    """A call that cannot be served; its message goes back to the caller as the tool error's text."""


class McpZoomOutput(ZoomSummary):
    """The `zoom` tool's structured content: the summary plus how the crop's image block is encoded."""

    crop_mime_type: str = Field(description="MIME type of the image block that carries the crop")
    crop_bytes: int = Field(description="size of the encoded crop in bytes (before base64)")


class GateOutput(BaseModel):
    """The `gate` tool's structured content."""

    model_config = ConfigDict(extra="forbid")

    gate_score: float = Field(description="probability that the question needs detail beyond the coarse view")
    needs_detail: bool = Field(description="gate_score >= the checkpoint's tau_gate: Q-Zoom would zoom")


class ProposeOutput(BaseModel):
    """The `propose` tool's structured content."""

    model_config = ConfigDict(extra="forbid")

    boxes: list[list[int]] = Field(description="[x0, y0, x1, y1] in original-image pixels, x1/y1 exclusive")
    found: bool = Field(description="false when no cell passed tau_roi and the box is the whole image")
    image_wh: list[int] = Field(description="[width, height] of the original image")
    gate_score: float | None = Field(description="the gate's probability (null without a gate)")
    heatmap: HeatmapSummary


def server_version() -> str:
    """qzoom's installed version (what ``serverInfo.version`` reports)."""
    try:
        return version("qzoom")
    except PackageNotFoundError:  # a bare source tree without an install
        return "0+unknown"


@dataclass(frozen=True)
class _Spec:
    title: str
    description: str
    arguments: type[BaseModel]
    output: type[BaseModel]
    run: Callable[[ZoomToolRunner, dict[str, Any]], Awaitable[types.CallToolResult]]

    def tool(self, name: str) -> types.Tool:
        return types.Tool(
            name=name,
            title=self.title,
            description=self.description,
            inputSchema=self.arguments.model_json_schema(),
            outputSchema=self.output.model_json_schema(),
            annotations=types.ToolAnnotations(title=self.title, **_ANNOTATIONS),
        )


def _validate(model: type[M], arguments: dict[str, Any], runner: ZoomToolRunner) -> M:
    try:
        return model.model_validate(arguments, context={"allow_image_path": runner.allow_image_path})
    except ValidationError as err:
        raise ToolFailure(describe_validation_error(err, model)) from None


def _result(content: list[types.ContentBlock], out: BaseModel) -> types.CallToolResult:
    return types.CallToolResult(content=content, structuredContent=out.model_dump(mode="json"))


def _json_result(out: BaseModel) -> types.CallToolResult:
    return _result([types.TextContent(type="text", text=out.model_dump_json())], out)


async def _zoom(runner: ZoomToolRunner, arguments: dict[str, Any]) -> types.CallToolResult:
    result = await runner.zoom(_validate(ZoomArgs, arguments, runner))
    png = base64.b64decode(result.crop_png_b64)
    out = McpZoomOutput(**result.summary().model_dump(), crop_mime_type="image/png", crop_bytes=len(png))
    image = types.ImageContent(type="image", data=result.crop_png_b64, mimeType="image/png")
    return _result([image, types.TextContent(type="text", text=out.model_dump_json())], out)


async def _gate(runner: ZoomToolRunner, arguments: dict[str, Any]) -> types.CallToolResult:
    args = _validate(GateArgs, arguments, runner)
    if not runner.worker.engine.has_gate:
        raise ToolFailure("this checkpoint has no gate (enable_high_res is false); use propose or zoom")
    score, threshold = await runner.gate(runner.load(args.zoom_args(runner)), args.query)
    return _json_result(GateOutput(gate_score=score, needs_detail=score >= threshold))


async def _propose(runner: ZoomToolRunner, arguments: dict[str, Any]) -> types.CallToolResult:
    args = _validate(ProposeArgs, arguments, runner)
    if not runner.worker.engine.has_rpn:
        raise ToolFailure("this checkpoint has no region proposer (SD-RPN); send zoom a box instead")
    image = runner.load(args.zoom_args(runner))
    boxes_px, found, gate_score, heatmap = await runner.propose(image, args.query, max_boxes=args.max_boxes)
    out = ProposeOutput(
        boxes=[b.as_list() for b in boxes_px],
        found=found,
        image_wh=[image.width, image.height],
        gate_score=None if gate_score is None or not math.isfinite(gate_score) else float(gate_score),
        heatmap=heatmap,
    )
    return _json_result(out)


SPECS: dict[str, _Spec] = {
    ZOOM_TOOL_NAME: _Spec("Zoom into an image", ZOOM_TOOL_DESCRIPTION, ZoomArgs, McpZoomOutput, _zoom),
    GATE_TOOL_NAME: _Spec("Does the question need detail?", GATE_DESCRIPTION, GateArgs, GateOutput, _gate),
    PROPOSE_TOOL_NAME: _Spec("Where is the answer?", PROPOSE_DESCRIPTION, ProposeArgs, ProposeOutput, _propose),
}


def _error(message: str) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(type="text", text=message)], isError=True)


async def _call(runner_factory: RunnerFactory, name: str, arguments: dict[str, Any]) -> types.CallToolResult:
    """Run one tool call, turning what a caller can cause into a readable tool error."""
    from qzoom.agent.tool import UnknownImage
    from qzoom.images import ImageError
    from qzoom.worker import Overloaded

    spec = SPECS.get(name)
    if spec is None:
        return _error(f"unknown tool {name!r}; the tools are: {', '.join(SPECS)}")
    try:
        return await spec.run(runner_factory(), arguments)
    except ToolFailure as err:
        return _error(str(err))
    except ValidationError as err:
        return _error(describe_validation_error(err, spec.arguments))
    except UnknownImage as err:
        return _error(str(err.args[0]) if err.args else str(err))
    except (ImageError, Overloaded, PermissionError, FileNotFoundError, ValueError) as err:
        return _error(str(err))


def build_mcp_server(
    runner_factory: RunnerFactory,
    *,
    name: str = "qzoom",
    lifespan: Lifespan | None = None,
) -> Server[Any, Any]:
    """An MCP server with the `zoom`, `gate` and `propose` tools, each call run by ``runner_factory()``.

    The factory is called per call, so the runner (and its worker) may be created later, in ``lifespan``; it may
    raise `ToolFailure` (e.g. "the model is still loading").
    """
    kwargs: dict[str, Any] = {} if lifespan is None else {"lifespan": lifespan}
    server: Server[Any, Any] = Server(
        name,
        version=server_version(),
        instructions="Query-aware zooming (Q-Zoom): crop the region of an image that a question needs.",
        **kwargs,
    )
    tools = [spec.tool(tool_name) for tool_name, spec in SPECS.items()]

    @server.list_tools()  # type: ignore[untyped-decorator]
    async def list_tools() -> list[types.Tool]:
        return tools

    # validate_input=False: the pydantic models validate (their messages name each field and what it accepts).
    @server.call_tool(validate_input=False)  # type: ignore[untyped-decorator]
    async def call_tool(tool_name: str, arguments: dict[str, Any]) -> types.CallToolResult:
        return await _call(runner_factory, tool_name, arguments)

    return server


def run_stdio(model_dir: str | None) -> None:
    """Serve `zoom`, `gate` and `propose` over stdio (local desktop mode: ``image_path`` allowed).

    The checkpoint (``model_dir``, else ``QZOOM_MODEL``, else the shipped qzoom-tiny) is loaded and the worker
    started in the server's lifespan, i.e. once the host has started the process.
    """
    import anyio
    from mcp.server.stdio import stdio_server

    from qzoom.settings import get_settings

    settings = get_settings()
    path = model_dir or settings.model_dir()
    holder: dict[str, ZoomToolRunner] = {}

    def runner_factory() -> ZoomToolRunner:
        return holder["runner"]

    @asynccontextmanager
    async def lifespan(_: Server[Any, Any]) -> AsyncIterator[dict[str, Any]]:
        from qzoom.agent.tool import ZoomToolRunner
        from qzoom.engine import QZoomEngine
        from qzoom.worker import Worker

        engine = QZoomEngine.from_pretrained(path, device=settings.torch_device(), dtype=settings.torch_dtype())
        async with Worker(engine) as worker:
            holder["runner"] = ZoomToolRunner(worker, allow_image_path=True)
            logger.info("qzoom mcp: serving %s over stdio", path)
            yield {}

    server = build_mcp_server(runner_factory, lifespan=lifespan)

    async def serve() -> None:
        async with stdio_server() as (read, write):
            await server.run(read, write, server.create_initialization_options())

    anyio.run(serve)
