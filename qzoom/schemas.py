"""The request options and the result of one ask: the JSON contract of DESIGN.md "Interfaces".

`AskResult` is exactly what `qzoom ask --json` prints and what `POST /ask` returns:
`{answer, zoomed, gate_score, steps[{box, gate_score, visual_tokens}], visual_tokens, timings_ms, model}`, boxes in
integer pixels of the original image with x1/y1 exclusive. `AskOptions` are the per-request knobs; every default
reproduces the paper (one step, no margin) or takes the checkpoint's value (its thresholds, and how it makes boxes: one
box around every cell above τ_roi, the paper's, unless the checkpoint records otherwise, as `qzoom train boxes` and
the demo model do).

`check_prompt_text` guards the text a caller puts into the prompt (the question, a system prompt): it may not hold the
chat template's control tokens (`CONTROL_TOKENS`), which would open fake turns or image slots without pixels behind
them; `PromptTextError` (a `ValueError`) names the field and the token.
"""

from __future__ import annotations

from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

# One LLM token covers 28x28 source pixels on Qwen2.5-VL; budgets are counted in those.
PIXELS_PER_TOKEN = 28 * 28

# The tokenizer turns these strings into control tokens even inside user text.
CONTROL_TOKENS = (
    "<|im_start|>", "<|im_end|>", "<|endoftext|>",
    "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)  # fmt: skip


class PromptTextError(ValueError):
    """Caller text that would change the prompt's structure (see `check_prompt_text`)."""


def check_prompt_text(text: str, field: str) -> None:
    """Raise `PromptTextError` when `text` contains one of `CONTROL_TOKENS`."""
    for token in CONTROL_TOKENS:
        if token in text:
            raise PromptTextError(
                f"{field}: must not contain the chat template's control token {token} "
                f"(none of {', '.join(CONTROL_TOKENS)} may appear in caller text)"
            )


# How the several boxes of one zoom step are answered (`QZoomEngine.zoom`): "joint" splices every crop into one
# sequence; "best" gives each box its own sequence and keeps the most confident answer.
MultiBox = Literal["joint", "best"]
MULTI_BOX_MODES: tuple[MultiBox, ...] = ("joint", "best")


class AskOptions(BaseModel):
    """Per-request options. `None` means "the checkpoint's value" (its config.json, else the official default)."""

    model_config = ConfigDict(extra="forbid")

    gate_thresh: float | None = Field(None, ge=0.0, le=1.0, description="τ_gate: zoom when the gate probability ≥ this")
    roi_thresh: float | None = Field(None, ge=0.0, le=1.0, description="τ_roi: cells whose blurred probability > this")
    min_pixels: int | None = Field(
        None, ge=PIXELS_PER_TOKEN, le=16384 * PIXELS_PER_TOKEN, description="lower pixel budget of each view"
    )
    max_pixels: int | None = Field(
        None, ge=PIXELS_PER_TOKEN, le=16384 * PIXELS_PER_TOKEN, description="upper pixel budget of each view"
    )
    force_zoom: bool | None = Field(None, description="true: always zoom; false: never zoom; null: the gate decides")
    max_steps: int = Field(1, ge=0, le=8, description="zoom steps at most (the paper: 1)")
    max_boxes: int | None = Field(
        None, ge=1, le=8, description="boxes per step from connected components (default: the checkpoint's, else 1)"
    )
    # The values of `qzoom.roi.BOX_MODES`, spelled out so that this module stays free of torch (`qzoom.roi` needs it).
    box_mode: Literal["union", "components"] | None = Field(
        None,
        description="union: one box around every cell above τ_roi (the paper); components: the heaviest connected "
        "components, max_boxes of them (default: the checkpoint's, else union)",
    )
    roi_peak_frac: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="cells must also reach this fraction of the map's peak (default: the checkpoint's, else 0)",
    )
    multi_box: MultiBox | None = Field(
        None,
        description="with several boxes in a step, joint: all crops in one sequence; best: one sequence per box and "
        "the answer with the highest mean token log-probability (default: the checkpoint's, else joint)",
    )
    margin: float = Field(0.0, ge=0.0, le=1.0, description="extra border around each box, as a fraction of its side")
    max_new_tokens: int = Field(32, ge=1, le=1024, description="answer length limit in tokens")
    temperature: float | None = Field(
        None, ge=0.0, le=2.0, description="sampling temperature; 0 or null: greedy decoding (the paper's)"
    )
    top_p: float | None = Field(
        None, gt=0.0, le=1.0, description="nucleus sampling: draw from the tokens holding this much probability"
    )
    seed: int | None = Field(
        None, ge=0, lt=2**63, description="seed of the request's sampling: the same seed draws the same tokens"
    )

    @model_validator(mode="after")
    def _budget_order(self) -> Self:
        if self.min_pixels is not None and self.max_pixels is not None and self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels ({self.min_pixels}) must not exceed max_pixels ({self.max_pixels})")
        if self.box_mode == "union" and (self.max_boxes or 1) > 1:
            raise ValueError(f"box_mode 'union' makes one box per step; max_boxes {self.max_boxes} needs 'components'")
        return self


class StepResult(BaseModel):
    """One region the model looked at: its box in original pixels, the gate score that led to it, its tokens."""

    box: list[int] = Field(description="[x0, y0, x1, y1] in original-image pixels, x1/y1 exclusive")
    gate_score: float | None = Field(description="gate probability that opened this step (null without a gate)")
    visual_tokens: int = Field(description="LLM tokens of this region's view")


class AskResult(BaseModel):
    """The answer to one question about one image."""

    answer: str
    zoomed: bool = Field(description="whether any region was added to the coarse view")
    gate_score: float | None = Field(description="the first gate probability (null without a gate)")
    steps: list[StepResult]
    visual_tokens: int = Field(description="all image tokens in the final sequence")
    timings_ms: dict[str, float]
    model: str
