"""The `zoom` tool's arguments and result: one pydantic schema for MCP, LangChain and OpenAI (strict mode).

No torch, no PIL: an agent imports this with the tool client.

Contract
--------
`ZoomArgs` (what an agent sends):

* the image, exactly one of ``image_id`` (returned by the service's image upload), ``image_data`` (base64 bytes or a
  ``data:image/...;base64,`` URL) or ``image_path`` (a local file; accepted only when validated with
  ``context=LOCAL_STDIO_CONTEXT``, which only the local stdio MCP server passes);
* a ``box`` (`ZoomBox`: four numbers and the `Frame` they are written in; ``resized_px`` also carries the resized
  size), or ``box: null`` and a ``query``, in which case the SD-RPN proposes the box for that question;
* optional ``margin`` (fraction of the box side added on each side) and ``output_max_side`` (longest side of the
  returned crop in pixels).

`ZoomResult` (what the tool returns): the crop as base64 PNG, the box in integer original pixels (x1/y1 exclusive),
where the box came from (the caller's frame and numbers, or the SD-RPN), and, when the SD-RPN chose the box, the gate
score and a summary of its heatmap. `ZoomResult.summary_json` is the text block that frameworks which drop images
still show.

OpenAI strict mode
------------------
``ZoomArgs.model_json_schema()`` is already strict-valid: every object has ``additionalProperties: false``, every
property is listed in ``required`` and optional ones are nullable (``anyOf [..., null]``), there are no ``default``
keys and no ``$ref`` with siblings. Validation stays lenient: an omitted nullable field means null, so non-strict
clients (MCP hosts) may leave it out. `strict_parameters` / `openai_tool` take the schema through the `openai`
package's own strict-schema helper (`openai.pydantic_function_tool`), which leaves it unchanged (tested), so what
qzoom sends is what the OpenAI client itself would send.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationInfo, WithJsonSchema, model_validator

from .frames import Box, Frame, to_original

__all__ = [
    "LOCAL_STDIO_CONTEXT",
    "MAX_OUTPUT_SIDE",
    "MIN_OUTPUT_SIDE",
    "ZOOM_TOOL_DESCRIPTION",
    "ZOOM_TOOL_NAME",
    "HeatmapSummary",
    "ImageSourceArgs",
    "ZoomArgs",
    "ZoomBox",
    "ZoomResult",
    "ZoomSummary",
    "decode_image_data",
    "openai_tool",
    "strict_parameters",
]

ZOOM_TOOL_NAME = "zoom"
ZOOM_TOOL_DESCRIPTION = (
    "Zoom into a region of an image and get the crop back at full resolution. Give either a box (four numbers and "
    "the coordinate frame they are in) or, with box null, a question: then the Q-Zoom region proposer picks the box "
    "that the question needs. The result holds the crop (PNG) and the box in original-image pixels."
)

# Pass as `context=` to model_validate only in the local stdio MCP server: a served API must never read local files.
LOCAL_STDIO_CONTEXT: dict[str, Any] = {"allow_image_path": True}

# One Qwen2.5 merged patch is 28 px: a smaller crop cannot be encoded. The upper bound keeps one PNG reply sane.
MIN_OUTPUT_SIDE = 28
MAX_OUTPUT_SIDE = 8192
MAX_MARGIN = 1.0

# Strict numbers: JSON "12" (a string) or true is a client bug, not a coordinate.
_Num = Annotated[float, Strict()]
_Int = Annotated[int, Strict()]

_FRAME_DOC = "; ".join(f"{f.value}: {f.description}" for f in Frame)
# Inline enum instead of pydantic's `$ref` + description (a `$ref` with siblings is not strict-valid).
_FrameField = Annotated[Frame, WithJsonSchema({"type": "string", "enum": [f.value for f in Frame]})]

_DATA_URL = re.compile(r"^data:(?P<mime>image/[A-Za-z0-9.+-]+)(?:;[^,;]*)*;base64,(?P<data>.*)$", re.DOTALL)
_PNG_B64_PREFIX = "iVBORw0KGgo"  # base64 of the 8-byte PNG signature


def _strict_object_schema(schema: dict[str, Any]) -> None:
    """json_schema_extra hook: every property required (nullable ones stay nullable), no defaults."""
    props = schema.get("properties", {})
    schema["required"] = list(props)
    schema["additionalProperties"] = False
    for prop in props.values():
        prop.pop("default", None)


_STRICT_MODEL = ConfigDict(extra="forbid", json_schema_extra=_strict_object_schema)


def decode_image_data(data: str) -> bytes:
    """Bytes of ``image_data``: a ``data:image/...;base64,`` URL or bare base64 (whitespace ignored)."""
    m = _DATA_URL.match(data)
    if data.startswith("data:") and m is None:
        raise ValueError("image_data data URL must look like 'data:image/png;base64,<base64 bytes>'")
    payload = m.group("data") if m else data
    try:
        raw = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"image_data is not valid base64 ({exc})") from None
    if not raw:
        raise ValueError("image_data is empty")
    return raw


class ZoomBox(BaseModel):
    """Four numbers and the coordinate frame they are written in."""

    model_config = _STRICT_MODEL

    coords: list[_Num] = Field(
        description="[x0, y0, x1, y1]: exactly 4 numbers, top-left then bottom-right corner, x0 < x1 and y0 < y1"
    )
    frame: _FrameField = Field(description=f"The coordinate frame of coords. {_FRAME_DOC}.")
    resized_width: _Int | None = Field(
        default=None, description="For frame resized_px: width of the resized image the coords refer to; else null"
    )
    resized_height: _Int | None = Field(
        default=None, description="For frame resized_px: height of the resized image the coords refer to; else null"
    )

    @model_validator(mode="after")
    def _check(self) -> Self:
        c = self.coords
        if len(c) != 4:
            raise ValueError(f"coords must be exactly 4 numbers [x0, y0, x1, y1], got {len(c)}: {c}")
        if not all(math.isfinite(v) for v in c):
            raise ValueError(f"coords must be finite numbers, got {c}")
        x0, y0, x1, y1 = c
        if not (x1 > x0 and y1 > y0):
            raise ValueError(f"coords must satisfy x0 < x1 and y0 < y1 (top-left, then bottom-right), got {c}")
        rng = self.frame.value_range
        if rng is not None and not all(rng[0] <= v <= rng[1] for v in c):
            raise ValueError(
                f"coords {c} are outside [{rng[0]:g}, {rng[1]:g}], the range of frame {self.frame.value!r} "
                f"({self.frame.description}); for pixels use frame 'original_px'"
            )
        has_size = (self.resized_width, self.resized_height)
        if self.frame is Frame.RESIZED_PX:
            if None in has_size or min(v for v in has_size if v is not None) < 1:
                raise ValueError("frame 'resized_px' needs resized_width and resized_height (positive integers)")
        elif has_size != (None, None):
            raise ValueError(f"resized_width/resized_height are only for frame 'resized_px', not {self.frame.value!r}")
        return self

    @property
    def resized_wh(self) -> tuple[int, int] | None:
        if self.resized_width is None or self.resized_height is None:
            return None
        return (self.resized_width, self.resized_height)

    def to_original(self, image_wh: tuple[int, int]) -> Box:
        """The box in float pixels of an image of size ``image_wh`` (not yet clamped)."""
        return to_original(self.coords, self.frame, image_wh, self.resized_wh)


class ImageSourceArgs(BaseModel):
    """The image of a tool call, from exactly one of three sources (the subclass checks that only one is given).

    The fields of every image tool (`zoom`, `gate`, `propose`), declared once so that they read alike everywhere.
    """

    model_config = _STRICT_MODEL

    image_id: str | None = Field(
        default=None,
        description="Id of an image already uploaded to the service (give one of image_id, image_data, image_path)",
    )
    image_data: str | None = Field(
        default=None, description="The image as base64 bytes or a data URL 'data:image/png;base64,...'"
    )
    image_path: str | None = Field(
        default=None, description="Path of a local image file; accepted only by the local stdio server (qzoom mcp)"
    )


class ZoomArgs(ImageSourceArgs):
    """Arguments of the `zoom` tool."""

    box: ZoomBox | None = Field(
        default=None, description="The region to zoom into; null to let the region proposer choose it for `query`"
    )
    query: str | None = Field(
        default=None, description="The question the zoom should help answer; required when box is null"
    )
    margin: _Num | None = Field(
        default=None,
        description=f"Extra border on each side as a fraction of the box side, 0 to {MAX_MARGIN:g}; null means 0",
    )
    output_max_side: _Int | None = Field(
        default=None,
        description=(
            f"Longest side of the returned crop in pixels, {MIN_OUTPUT_SIDE} to {MAX_OUTPUT_SIDE}; "
            "null returns the crop at its own resolution"
        ),
    )

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> Self:
        given = [n for n in ImageSourceArgs.model_fields if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of image_id, image_data (base64 or data URL) or image_path; got {given or 'none'}"
            )
        if self.image_id is not None and not self.image_id.strip():
            raise ValueError("image_id is empty")
        if self.image_data is not None:
            decode_image_data(self.image_data)
        if self.image_path is not None:
            ctx = info.context if isinstance(info.context, dict) else {}
            if not ctx.get("allow_image_path"):
                raise ValueError(
                    "image_path is accepted only by the local stdio server (qzoom mcp); "
                    "send the image as image_data (base64 or data URL) or upload it and pass image_id"
                )
            if not self.image_path.strip():
                raise ValueError("image_path is empty")
        if self.box is None and (self.query is None or not self.query.strip()):
            raise ValueError("give a box, or box null and a query for the region proposer to choose the box")
        if self.margin is not None and not (math.isfinite(self.margin) and 0.0 <= self.margin <= MAX_MARGIN):
            raise ValueError(f"margin must be between 0 and {MAX_MARGIN:g}, got {self.margin}")
        if self.output_max_side is not None and not (MIN_OUTPUT_SIDE <= self.output_max_side <= MAX_OUTPUT_SIDE):
            raise ValueError(
                f"output_max_side must be between {MIN_OUTPUT_SIDE} and {MAX_OUTPUT_SIDE}, got {self.output_max_side}"
            )
        return self

    def image_bytes(self) -> bytes | None:
        """The decoded ``image_data``, or None when the image comes by id or path."""
        return None if self.image_data is None else decode_image_data(self.image_data)


class HeatmapSummary(BaseModel):
    """What the SD-RPN saw when it chose the box: its probability map in a few numbers."""

    model_config = _STRICT_MODEL

    grid_hw: list[_Int] = Field(description="[rows, cols] of the region-probability map (one cell per merged token)")
    threshold: _Num = Field(description="cells whose probability exceeded this formed the box (tau_roi)")
    max_prob: _Num = Field(description="highest cell probability")
    mean_prob: _Num = Field(description="mean cell probability")
    cells_above: _Int = Field(description="number of cells above the threshold")

    @model_validator(mode="after")
    def _check(self) -> Self:
        if len(self.grid_hw) != 2 or min(self.grid_hw) < 1:
            raise ValueError(f"grid_hw must be [rows, cols] of positive integers, got {self.grid_hw}")
        for name in ("threshold", "max_prob", "mean_prob"):
            v = getattr(self, name)
            if not (math.isfinite(v) and 0.0 <= v <= 1.0):
                raise ValueError(f"{name} must be a probability in [0, 1], got {v}")
        if not 0 <= self.cells_above <= self.grid_hw[0] * self.grid_hw[1]:
            raise ValueError(f"cells_above must be between 0 and rows*cols, got {self.cells_above}")
        return self


class ZoomSummary(BaseModel):
    """Where the crop came from: everything of a `ZoomResult` but the PNG (the text block frameworks show)."""

    model_config = _STRICT_MODEL

    crop_wh: list[_Int] = Field(description="[width, height] of the returned PNG")
    box: list[_Int] = Field(description="[x0, y0, x1, y1] in original-image pixels, x1/y1 exclusive")
    image_wh: list[_Int] = Field(description="[width, height] of the original image")
    found: bool = Field(
        description=(
            "true when the box is a region: the caller's, or where the SD-RPN's map passed its threshold; false when "
            "the SD-RPN found nothing and the box is the whole image"
        )
    )
    box_source: Literal["caller", "sd_rpn"] = Field(description="who chose the box: the caller or the SD-RPN")
    frame: _FrameField | None = Field(default=None, description="frame of the caller's box; null for sd_rpn")
    requested_box: list[_Num] | None = Field(
        default=None, description="the caller's 4 numbers as sent, in `frame`; null for sd_rpn"
    )
    gate_score: _Num | None = Field(
        default=None, description="gate probability when the SD-RPN chose the box (null if the gate did not run)"
    )
    heatmap: HeatmapSummary | None = Field(default=None, description="SD-RPN map summary; null for caller boxes")

    @model_validator(mode="after")
    def _check(self) -> Self:
        for name in ("crop_wh", "image_wh"):
            v = getattr(self, name)
            if len(v) != 2 or min(v) < 1:
                raise ValueError(f"{name} must be [width, height] of positive integers, got {v}")
        w, h = self.image_wh
        if len(self.box) != 4:
            raise ValueError(f"box must be 4 integers [x0, y0, x1, y1], got {self.box}")
        x0, y0, x1, y1 = self.box
        if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
            raise ValueError(f"box {self.box} must satisfy 0 <= x0 < x1 <= {w} and 0 <= y0 < y1 <= {h}")
        if self.box_source == "caller":
            if self.frame is None or self.requested_box is None or len(self.requested_box) != 4:
                raise ValueError("a caller box must report its frame and the 4 numbers requested")
            if self.gate_score is not None or self.heatmap is not None:
                raise ValueError("gate_score and heatmap belong to SD-RPN boxes only")
            if not self.found:
                raise ValueError("a caller's box is always found")
        else:
            if self.frame is not None or self.requested_box is not None:
                raise ValueError("an SD-RPN box has no caller frame or requested_box")
            if self.heatmap is None:
                raise ValueError("an SD-RPN box must carry its heatmap summary")
            if self.gate_score is not None and not (math.isfinite(self.gate_score) and 0 <= self.gate_score <= 1):
                raise ValueError(f"gate_score must be a probability in [0, 1], got {self.gate_score}")
            if not self.found and self.box != [0, 0, w, h]:
                raise ValueError("when the SD-RPN found nothing, the box is the whole image")
        return self


class ZoomResult(ZoomSummary):
    """The crop and where it came from."""

    crop_png_b64: str = Field(description="The crop as a base64-encoded PNG")

    @model_validator(mode="after")
    def _check_png(self) -> Self:
        if not self.crop_png_b64.startswith(_PNG_B64_PREFIX):
            raise ValueError("crop_png_b64 must be a base64-encoded PNG")
        return self

    def summary(self) -> ZoomSummary:
        """Everything but the PNG."""
        return ZoomSummary.model_validate(self.model_dump(exclude={"crop_png_b64"}))

    def summary_json(self) -> str:
        """Everything but the PNG, as JSON: the text block that accompanies the image block."""
        return self.model_dump_json(exclude={"crop_png_b64"})


# ---------------------------------------------------------------------------------------------------------------
# OpenAI strict mode


def strict_parameters(model: type[BaseModel]) -> dict[str, Any]:
    """The JSON schema of ``model`` as OpenAI strict mode takes it, written by the `openai` package's own helper
    (`openai.pydantic_function_tool`, which the Chat Completions and Responses clients use themselves)."""
    import openai  # imported here: agents that never build an OpenAI tool do not pay for the import

    tool = openai.pydantic_function_tool(model, name=ZOOM_TOOL_NAME, description=ZOOM_TOOL_DESCRIPTION)
    parameters: dict[str, Any] = dict(tool["function"].get("parameters", {}))
    return parameters


def openai_tool(api: Literal["chat", "responses"] = "chat") -> dict[str, Any]:
    """The `zoom` tool for OpenAI function calling in strict mode (Chat Completions nests it; Responses is flat)."""
    parameters = strict_parameters(ZoomArgs)
    if api == "responses":
        return {
            "type": "function",
            "name": ZOOM_TOOL_NAME,
            "description": ZOOM_TOOL_DESCRIPTION,
            "parameters": parameters,
            "strict": True,
        }
    return {
        "type": "function",
        "function": {
            "name": ZOOM_TOOL_NAME,
            "description": ZOOM_TOOL_DESCRIPTION,
            "parameters": parameters,
            "strict": True,
        },
    }
