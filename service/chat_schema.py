"""The OpenAI Chat Completions shapes that `service.chat` speaks: request, response, stream chunk, model list, error.

Only what qzoom honours is declared; every model forbids other fields, so an unsupported one is a 400 naming it
(`UNSUPPORTED` words the refusal for the OpenAI fields clients most often send). The qzoom extensions, which a
standard client ignores:

- request `qzoom` (`ChatExtension`, `extra_body={"qzoom": {...}}` in the `openai` client): Q-Zoom knobs of `/ask`
  (`force_zoom`, `max_steps`, thresholds, pixel budgets), the think models' `box_source` and `max_turns`, and
  `crops` to get each zoomed region back as a JPEG data URL;
- response `usage.visual_tokens`: the image tokens the answer was read from (the global view plus every crop);
- response and chunk `qzoom` (`ZoomReport`, `ZoomEvent`): the gate score and each zoom step's box in original-image
  pixels (x1/y1 exclusive), for think models each assistant turn with its zoom calls.

The response models mirror `openai.types.chat` (tests validate the service's answers with them).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from qzoom.schemas import PIXELS_PER_TOKEN

MAX_MESSAGES = 64
MAX_STOP = 4
MAX_TOOLS = 32


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- request ---------------------------------------------------------------------------------------------------------


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: str = Field(description="a data:image/...;base64, URL, or an http(s) URL (when QZOOM_IMAGE_URLS is on)")
    detail: Literal["auto", "low", "high"] | None = Field(
        None, description="accepted and not used: Q-Zoom picks the resolution (coarse view, then zoomed regions)"
    )


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class FunctionCallOut(_Strict):
    name: str
    arguments: str = Field(description="the arguments as a JSON object, written as a string")


class ToolCallOut(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class SystemMessage(_Strict):
    role: Literal["system", "developer"]
    content: str | list[TextPart]
    name: str | None = None


class UserMessage(_Strict):
    role: Literal["user"]
    content: str | list[ContentPart]
    name: str | None = None


class AssistantMessage(_Strict):
    role: Literal["assistant"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCallOut] | None = None
    name: str | None = None
    refusal: str | None = None


class ToolMessage(_Strict):
    role: Literal["tool"]
    content: str | list[ContentPart] = Field(description="text and, unlike OpenAI-style servers, images")
    tool_call_id: str


Message = Annotated[SystemMessage | UserMessage | AssistantMessage | ToolMessage, Field(discriminator="role")]


class FunctionDef(_Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(_Strict):
    include_usage: bool | None = None


class ChatExtension(_Strict):
    """qzoom's own request options (the `qzoom` field); each None takes the model's default."""

    force_zoom: bool | None = Field(None, description="true: always zoom; false: never; null: the gate decides")
    max_steps: int | None = Field(None, ge=0, le=8, description="Q-Zoom steps at most (default 1)")
    gate_thresh: float | None = Field(None, ge=0.0, le=1.0)
    roi_thresh: float | None = Field(None, ge=0.0, le=1.0)
    min_pixels: int | None = Field(None, ge=PIXELS_PER_TOKEN, le=16384 * PIXELS_PER_TOKEN)
    max_pixels: int | None = Field(None, ge=PIXELS_PER_TOKEN, le=16384 * PIXELS_PER_TOKEN)
    box_source: Literal["model", "sd_rpn"] | None = Field(
        None, description="think models: execute the model's boxes (model) or the SD-RPN's box for every call"
    )
    max_turns: int | None = Field(None, ge=1, le=8, description="think models: assistant turns at most")
    crops: bool = Field(False, description="return each zoomed region as a JPEG data URL in the qzoom report")


class ChatRequest(_Strict):
    """`POST /v1/chat/completions`, the OpenAI shape, restricted to what qzoom honours."""

    model: str = Field(description="an id from GET /v1/models")
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1, description="answer length limit in tokens (per turn for think models)")
    max_completion_tokens: int | None = Field(None, ge=1, description="the same as max_tokens (its newer name)")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 or absent: greedy decoding")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, lt=2**63, description="the same seed draws the same tokens")
    stop: str | list[str] | None = Field(None, description=f"up to {MAX_STOP} strings; the answer ends before one")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1, le=1, description="one choice per request")
    user: str | None = Field(None, max_length=256, description="the caller's end-user id (accepted, logged nowhere)")
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    qzoom: ChatExtension | None = None


# OpenAI request fields qzoom does not implement: refused by name instead of being ignored.
UNSUPPORTED = (
    "audio", "frequency_penalty", "function_call", "functions", "logit_bias", "logprobs", "metadata", "modalities",
    "prediction", "presence_penalty", "prompt_cache_key", "reasoning_effort", "response_format", "safety_identifier",
    "service_tier", "store", "top_logprobs", "verbosity", "web_search_options",
)  # fmt: skip


# -- response --------------------------------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int = Field(description="tokens the answer was conditioned on, image tokens included")
    completion_tokens: int = Field(description="tokens the model generated (every turn, for think models)")
    total_tokens: int
    visual_tokens: int = Field(description="qzoom extension: image tokens of the global view and every zoomed region")


class ZoomStep(BaseModel):
    box: list[int] = Field(description="[x0, y0, x1, y1] in original-image pixels, x1/y1 exclusive")
    gate_score: float | None = Field(None, description="the gate probability that opened this step")
    visual_tokens: int | None = Field(None, description="LLM tokens of this region's view")
    crop: str | None = Field(None, description="the region as a JPEG data URL (request qzoom.crops)")


class ThinkTurnReport(BaseModel):
    turn: int
    text: str = Field(description="what the assistant wrote in this turn")
    calls: list[str] = Field(description="its zoom calls, as written")
    boxes: list[list[int]] = Field(description="the regions cropped for them, original-image pixels")
    error: str | None = Field(description="why a call could not be executed (shown to the model), else null")


class ZoomReport(BaseModel):
    """qzoom extension of the response: how the answer was reached."""

    path: Literal["qzoom", "conversation", "think"] = Field(
        description="qzoom: the Q-Zoom graph (gate, SD-RPN, fusion); conversation: several images or client tools, "
        "answered on one sequence; think: the model's own zoom-tool loop"
    )
    zoomed: bool
    gate_score: float | None = Field(description="the first gate probability (null when the gate did not run)")
    steps: list[ZoomStep] = Field(description="every zoomed region, in order")
    turns: list[ThinkTurnReport] | None = Field(None, description="think models: every assistant turn")
    finished_by: Literal["answer", "gate", "turn_limit"] | None = Field(None, description="think models only")
    timings_ms: dict[str, float] = Field(default_factory=dict)


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCallOut] | None = None
    refusal: None = None


FinishReason = Literal["stop", "length", "tool_calls"]


class Choice(BaseModel):
    index: int = 0
    message: ResponseMessage
    finish_reason: FinishReason
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None
    qzoom: ZoomReport


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "qzoom"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str = Field(description="the OpenAI error type (invalid_request_error, authentication_error, ...)")
    param: str | None = Field(description="the request field at fault, when one is")
    code: str = Field(description="qzoom's stable machine code (as on every other endpoint)")


class OpenAIErrorBody(BaseModel):
    error: OpenAIErrorDetail
