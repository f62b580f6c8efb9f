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
keys, no ``$ref`` with siblings and no constraint keywords. Validation stays lenient: an omitted nullable field means
null, so non-strict clients (MCP hosts, LangChain) may leave it out.

`strict_json_schema` post-processes any pydantic model (or schema dict) into that subset. The rule set is the
conservative one of OpenAI's Structured Outputs documentation (Aug 2024); newer models accept a superset, so a schema
that passes it passes everywhere strict mode exists:

1. the root is ``type: object``, never ``anyOf``;
2. every object: ``additionalProperties: false`` and ``required`` = all of its properties (free-form dicts, i.e.
   ``additionalProperties`` true or a schema, cannot be expressed and raise);
3. allowed keywords only: ``type, properties, required, additionalProperties, items, anyOf, enum, description,
   title, $ref, $defs, definitions``; ``$ref`` stands alone (a ``$ref`` with siblings is inlined);
4. rewrites: a one-element ``allOf`` is merged, ``oneOf`` becomes ``anyOf``, ``const`` becomes a one-value
   ``enum``, a homogeneous tuple (``prefixItems``) becomes ``items``; ``default`` is dropped (all properties are
   required, so it can never apply);
5. constraint keywords that strict mode rejected (``minimum``, ``maximum``, ``exclusiveMinimum``,
   ``exclusiveMaximum``, ``multipleOf``, ``minLength``, ``maxLength``, ``pattern``, ``format``, ``minItems``,
   ``maxItems``, ``uniqueItems``, ``minProperties``, ``maxProperties``, ...) are removed and restated in words in
   the ``description``: the model still reads them, and pydantic still enforces them on arrival;
6. ``not``, ``if/then/else``, ``dependentRequired``, ``dependentSchemas`` and a multi-element ``allOf`` raise;
7. limits: at most 5 levels of object nesting and 100 properties in all.

`strict_schema_problems` checks rules 1-3 and 7 independently of the rewrite, for tests and for schemas from
elsewhere.
"""

from __future__ import annotations

import base64
import binascii
import copy
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
    "decode_image_data",
    "openai_tool",
    "strict_json_schema",
    "strict_schema_problems",
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


class ZoomResult(BaseModel):
    """The crop and where it came from."""

    model_config = _STRICT_MODEL

    crop_png_b64: str = Field(description="The crop as a base64-encoded PNG")
    crop_wh: list[_Int] = Field(description="[width, height] of the returned PNG")
    box: list[_Int] = Field(description="[x0, y0, x1, y1] in original-image pixels, x1/y1 exclusive")
    image_wh: list[_Int] = Field(description="[width, height] of the original image")
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
        if not self.crop_png_b64.startswith(_PNG_B64_PREFIX):
            raise ValueError("crop_png_b64 must be a base64-encoded PNG")
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
        else:
            if self.frame is not None or self.requested_box is not None:
                raise ValueError("an SD-RPN box has no caller frame or requested_box")
            if self.heatmap is None:
                raise ValueError("an SD-RPN box must carry its heatmap summary")
            if self.gate_score is not None and not (math.isfinite(self.gate_score) and 0 <= self.gate_score <= 1):
                raise ValueError(f"gate_score must be a probability in [0, 1], got {self.gate_score}")
        return self

    def summary_json(self) -> str:
        """Everything but the PNG, as JSON: the text block that accompanies the image block."""
        return self.model_dump_json(exclude={"crop_png_b64"})


# ---------------------------------------------------------------------------------------------------------------
# Strict-mode schema rewriting and checking (rules in the module docstring).

_ALLOWED_KEYS = frozenset(
    {
        "type",
        "properties",
        "required",
        "additionalProperties",
        "items",
        "anyOf",
        "enum",
        "description",
        "title",
        "$ref",
        "$defs",
        "definitions",
    }
)
_ALLOWED_TYPES = frozenset({"string", "number", "integer", "boolean", "object", "array", "null"})
# Constraint keywords strict mode rejected; each is restated in the description ("what" for the message).
_CONSTRAINTS = {
    "minimum": ">=",
    "exclusiveMinimum": ">",
    "maximum": "<=",
    "exclusiveMaximum": "<",
    "multipleOf": "multiple of",
    "minLength": "min length",
    "maxLength": "max length",
    "pattern": "pattern",
    "format": "format",
    "minItems": "min items",
    "maxItems": "max items",
    "uniqueItems": "unique items",
    "minProperties": "min properties",
    "maxProperties": "max properties",
    "contains": None,
    "minContains": None,
    "maxContains": None,
    "unevaluatedItems": None,
    "unevaluatedProperties": None,
    "patternProperties": None,
    "propertyNames": None,
    "contentEncoding": None,
    "contentMediaType": None,
    "examples": None,
    "readOnly": None,
    "writeOnly": None,
    "deprecated": None,
    "discriminator": None,
    "$schema": None,
    "$id": None,
    "$comment": None,
}
_REJECTED = ("not", "if", "then", "else", "dependentRequired", "dependentSchemas", "dependencies")
MAX_NESTING = 5
MAX_PROPERTIES = 100


def _resolve(root: dict[str, Any], ref: str) -> dict[str, Any]:
    if not ref.startswith("#/"):
        raise ValueError(f"only local $refs are supported, got {ref!r}")
    node: Any = root
    for part in ref[2:].split("/"):
        node = node[part]
    if not isinstance(node, dict):
        raise ValueError(f"$ref {ref!r} does not point at a schema")
    return node


def _strictify(node: dict[str, Any], root: dict[str, Any], path: str) -> dict[str, Any]:
    for key in _REJECTED:
        if key in node:
            raise ValueError(f"{path}: '{key}' cannot be expressed in OpenAI strict mode")
    if "$ref" in node and len(node) > 1:
        # Inline the target under the siblings (siblings win), then strictify the result as a whole.
        target = copy.deepcopy(_resolve(root, node["$ref"]))
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return _strictify(merged, root, path)
    node = dict(node)
    if "allOf" in node:
        parts = node.pop("allOf")
        if len(parts) != 1:
            raise ValueError(f"{path}: allOf with {len(parts)} entries cannot be expressed in strict mode")
        node = {**parts[0], **node}
        return _strictify(node, root, path)
    if "oneOf" in node:
        node["anyOf"] = [*node.get("anyOf", []), *node.pop("oneOf")]
    if "const" in node:
        node["enum"] = [node.pop("const")]
    node.pop("default", None)
    if "prefixItems" in node:
        prefix = node.pop("prefixItems")
        if not prefix or any(p != prefix[0] for p in prefix):
            raise ValueError(f"{path}: a tuple of mixed item types cannot be expressed in strict mode")
        node["items"] = prefix[0]
        node.setdefault("minItems", len(prefix))
        node.setdefault("maxItems", len(prefix))
    notes = []
    for key, what in _CONSTRAINTS.items():
        if key in node:
            value = node.pop(key)
            if what is not None:
                notes.append(f"{what} {value}")
    if notes:
        constraint = "Constraints: " + ", ".join(notes) + "."
        node["description"] = f"{node['description']} ({constraint})" if node.get("description") else constraint
    is_object = node.get("type") == "object" or "properties" in node
    if is_object:
        extra = node.get("additionalProperties", False)
        if extra is not False:
            raise ValueError(f"{path}: objects with free-form keys (additionalProperties) are not strict-valid")
        props = node.get("properties", {})
        node["properties"] = {k: _strictify(v, root, f"{path}.{k}") for k, v in props.items()}
        node["required"] = list(props)
        node["additionalProperties"] = False
    if isinstance(node.get("items"), dict):
        node["items"] = _strictify(node["items"], root, f"{path}[]")
    if "anyOf" in node:
        node["anyOf"] = [_strictify(v, root, f"{path}|{i}") for i, v in enumerate(node["anyOf"])]
    for defs_key in ("$defs", "definitions"):
        if defs_key in node:
            node[defs_key] = {k: _strictify(v, root, f"#/{defs_key}/{k}") for k, v in node[defs_key].items()}
    return node


def strict_json_schema(model: type[BaseModel] | dict[str, Any]) -> dict[str, Any]:
    """The JSON schema of ``model`` rewritten to OpenAI strict mode (module docstring, rules 1-7).

    Raises ValueError for what strict mode cannot express.
    """
    schema = model.model_json_schema() if isinstance(model, type) else copy.deepcopy(model)
    if schema.get("type") != "object" or "anyOf" in schema:
        raise ValueError("the root of a strict schema must be an object (not anyOf)")
    out = _strictify(schema, schema, "#")
    problems = strict_schema_problems(out)
    if problems:
        raise ValueError("schema is not strict-valid: " + "; ".join(problems))
    return out


def strict_schema_problems(schema: dict[str, Any]) -> list[str]:
    """Every violation of rules 1-3 and 7 of the module docstring in ``schema`` (empty list: strict-valid)."""
    problems: list[str] = []
    if schema.get("type") != "object" or "anyOf" in schema:
        problems.append("#: root must be type object, not anyOf")
    n_props = 0

    def walk(node: Any, path: str) -> None:
        nonlocal n_props
        if not isinstance(node, dict):
            problems.append(f"{path}: schema must be an object, got {type(node).__name__}")
            return
        for key in node:
            if key not in _ALLOWED_KEYS:
                problems.append(f"{path}: keyword '{key}' is not allowed")
        if "$ref" in node and len(node) > 1:
            problems.append(f"{path}: $ref must stand alone, has {sorted(set(node) - {'$ref'})}")
        types = node.get("type")
        for t in types if isinstance(types, list) else [types] if types is not None else []:
            if t not in _ALLOWED_TYPES:
                problems.append(f"{path}: type {t!r} is not allowed")
        if types == "object" or "properties" in node:
            props = node.get("properties")
            if not isinstance(props, dict):
                problems.append(f"{path}: object without properties")
                props = {}
            if node.get("additionalProperties") is not False:
                problems.append(f"{path}: additionalProperties must be false")
            if set(node.get("required", [])) != set(props) or len(node.get("required", [])) != len(props):
                problems.append(f"{path}: required must list every property exactly once")
            n_props += len(props)
            for k, v in props.items():
                walk(v, f"{path}.{k}")
        if types == "array" and "items" not in node:
            problems.append(f"{path}: array without items")
        if "items" in node:
            walk(node["items"], f"{path}[]")
        for i, v in enumerate(node.get("anyOf", [])):
            walk(v, f"{path}|{i}")
        for defs_key in ("$defs", "definitions"):
            for k, v in node.get(defs_key, {}).items():
                walk(v, f"#/{defs_key}/{k}")
        if "enum" in node and (not isinstance(node["enum"], list) or not node["enum"]):
            problems.append(f"{path}: enum must be a non-empty list")

    walk(schema, "#")
    if n_props > MAX_PROPERTIES:
        problems.append(f"#: {n_props} properties in all, more than {MAX_PROPERTIES}")
    depth = _object_depth(schema, schema, 0)
    if depth > MAX_NESTING:
        problems.append(f"#: {depth} levels of object nesting, more than {MAX_NESTING}")
    return problems


def _object_depth(node: Any, root: dict[str, Any], seen: int) -> int:
    """Levels of nested objects below (and including) ``node``, following $refs; stops past the limit."""
    if not isinstance(node, dict) or seen > MAX_NESTING:
        return seen
    if "$ref" in node:
        try:
            return _object_depth(_resolve(root, node["$ref"]), root, seen)
        except (KeyError, ValueError):
            return seen
    level = seen + 1 if node.get("type") == "object" or "properties" in node else seen
    children = [*node.get("properties", {}).values(), *node.get("anyOf", [])]
    if isinstance(node.get("items"), dict):
        children.append(node["items"])
    return max([level, *(_object_depth(c, root, level) for c in children)])


def openai_tool(api: Literal["chat", "responses"] = "chat") -> dict[str, Any]:
    """The `zoom` tool for OpenAI function calling in strict mode (Chat Completions nests it; Responses is flat)."""
    parameters = strict_json_schema(ZoomArgs)
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
