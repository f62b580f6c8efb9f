"""Arguments of the `gate` and `propose` tools, and the one formatter of argument errors for every tool front end.

No torch, no PIL. Like `ZoomArgs` (tools/schema.py), whose image fields they share (`ImageSourceArgs`), the models
are strict-mode shaped (every property required, optional ones nullable, no extra keys) and take the image from
exactly one of ``image_id``, ``image_data`` or ``image_path``; that check is delegated to `ZoomArgs` itself
(`zoom_args`), so the three tools accept images alike.

`describe_validation_error` turns a pydantic `ValidationError` into the text a model reads: one line per problem,
``field: what is wrong``, and for an unknown or missing field the list of accepted fields.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Self

from pydantic import BaseModel, Field, ValidationError, model_validator

from .schema import ImageSourceArgs, ZoomArgs

if TYPE_CHECKING:
    from qzoom.agent.tool import ZoomToolRunner

__all__ = ["MAX_PROPOSED_BOXES", "GateArgs", "ProposeArgs", "describe_validation_error"]

MAX_PROPOSED_BOXES = 8  # AskOptions.max_boxes' upper bound
_IMAGE_FIELDS = tuple(ImageSourceArgs.model_fields)


class _ImageQueryArgs(ImageSourceArgs):
    """An image (one of three sources, as in `ZoomArgs`) and a question."""

    query: str = Field(description="The question about the image")

    @model_validator(mode="after")
    def _check_query(self) -> Self:
        if not self.query.strip():
            raise ValueError("query is empty: give the question the image should answer")
        return self

    def zoom_args(self, runner: ZoomToolRunner) -> ZoomArgs:
        """The same image source as `ZoomArgs` (validated there: one source, base64, image_path permission)."""
        fields = {n: getattr(self, n) for n in _IMAGE_FIELDS if getattr(self, n) is not None}
        parsed: ZoomArgs = runner.parse({**fields, "query": self.query})
        return parsed


class GateArgs(_ImageQueryArgs):
    """Arguments of the `gate` tool: does this question need a closer look at this image?"""


class ProposeArgs(_ImageQueryArgs):
    """Arguments of the `propose` tool: where in this image is what the question asks about?"""

    max_boxes: int | None = Field(
        default=None, description=f"Boxes to return at most, 1 to {MAX_PROPOSED_BOXES}; null: the model's own"
    )

    @model_validator(mode="after")
    def _check_boxes(self) -> Self:
        if self.max_boxes is not None and not 1 <= self.max_boxes <= MAX_PROPOSED_BOXES:
            raise ValueError(f"max_boxes must be between 1 and {MAX_PROPOSED_BOXES}, got {self.max_boxes}")
        return self


def describe_validation_error(err: ValidationError, model: type[BaseModel]) -> str:
    """One line per problem: the field, what was wrong, and for unknown fields which ones are accepted."""
    accepted = ", ".join(model.model_fields)
    lines = []
    for e in err.errors(include_url=False):
        loc = ".".join(str(p) for p in e["loc"]) or "arguments"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = f"unknown field; accepted fields: {accepted}"
        elif e["type"] == "missing":
            msg = f"required field is missing (accepted fields: {accepted})"
        lines.append(f"{loc}: {msg}")
    return f"invalid arguments for {model.__name__}:\n" + "\n".join(lines)
