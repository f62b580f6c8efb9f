"""OpenAI-compatible `POST /v1/chat/completions` and `GET /v1/models`: any OpenAI client gets Q-Zoom answers.

Models (`GET /v1/models`): the loaded checkpoint's id (e.g. `qzoom-tiny`), answered through the Q-Zoom graph, and
`<id>:think-<profile>` for each thinking-with-images profile of `agent.thinking` (`deepeyes`, `chain-of-focus`,
`mini-o3`, `mini-o3-resized`, `pixel-reasoner`, `qwen3-vl`), where the model's zoom calls, in its own syntax, run
server-side until it answers.

How a request is answered (its `qzoom.path` in the response):
- `qzoom`: the checkpoint's id, one distinct image in the conversation and no client tools: the Q-Zoom graph (gate,
  SD-RPN, crop, fusion), with earlier turns kept as text before the last user message's question.
- `conversation`: the checkpoint's id with several images, tool results (which may carry images) or `tools`: the
  whole conversation on one sequence (`agent.conversation`); with `tools`, the model's Hermes `<tool_call>`s are
  returned as standard `tool_calls` (`finish_reason` "tool_calls"), and the client sends the results back as `tool`
  messages. `tool_choice` "none" leaves the tools out of the prompt; "required" or a named function is asked for in
  the system prompt (an instruction, not a grammar constraint).
- `think`: a think model, one distinct image: `agent.thinking.think_with_images` (as `POST /v1/think`).

Sampling: `temperature` 0 or absent decodes greedily (the same answer as `/ask`); otherwise tokens are drawn with
`top_p`, reproducibly for a given `seed` (`qzoom.sampling`). `stop` strings end the answer, which is cut before
them. `max_tokens` (or `max_completion_tokens`) bounds the answer, per turn for think models. Streaming
(`stream: true`) sends `chat.completion.chunk` events: the role, one event per zoom step (an empty `delta` with the
step in the chunk's `qzoom` field), the answer's content, the finish reason, the usage when
`stream_options.include_usage` is set, then `data: [DONE]`. The answer comes as one content delta, once decoded.

Keys: `Authorization: Bearer <key>` (what OpenAI clients send) or `X-API-Key`, the same `QZOOM_API_KEYS`. Errors are
OpenAI error objects `{"error": {"message", "type", "param", "code"}}`, with qzoom's codes in `code`; request
mistakes are 400 (an unsupported or unknown field is named; `model_not_found` 404), images keep the service's
413/415 and URL refusals (`service.urls`), a full worker is 503 `overloaded` with Retry-After.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from PIL import Image
from pydantic import ValidationError
from starlette.background import BackgroundTask

from qzoom.admission import Cost, CostModel
from qzoom.agent.conversation import ChatTurn, converse
from qzoom.agent.graph import stream_events
from qzoom.agent.thinking import LOOP_PROFILES, think_with_images
from qzoom.agent.zoom import result
from qzoom.cache import image_digest
from qzoom.schemas import AskOptions
from qzoom.settings import Settings
from qzoom.tools.parsers import parse_function_calls
from qzoom.worker import Worker

from .cancel import until_disconnected
from .chat_schema import (
    MAX_STOP,
    UNSUPPORTED,
    AssistantMessage,
    ChatCompletion,
    ChatExtension,
    ChatRequest,
    Choice,
    FunctionCallOut,
    ImagePart,
    ModelCard,
    ModelList,
    OpenAIErrorBody,
    ResponseMessage,
    SystemMessage,
    TextPart,
    ThinkTurnReport,
    ToolCallOut,
    ToolMessage,
    Usage,
    ZoomReport,
    ZoomStep,
)
from .deps import ReadyWorker, Service, ServiceState, tenant_of
from .errors import ApiError, describe_errors
from .sources import PendingImage, inline_refs, read_source

log = logging.getLogger(__name__)

MAX_IMAGES = 8  # images per request (vLLM's --limit-mm-per-prompt, in spirit): each one costs a vision-tower pass
MAX_TEXT_CHARS = 16000  # all text of a request
DEFAULT_MAX_TOKENS = 256
MAX_TOKENS = 1024  # AskOptions.max_new_tokens's bound
THINK_DEFAULT_TOKENS = 128
THINK_MAX_TOKENS = 512  # per turn, as POST /v1/think
MAX_THINK_TURNS = 8  # as POST /v1/think
THINK_SEPARATOR = ":think-"
_STARTED = int(time.time())

# OpenAI's error `type` for each status.
_ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
    413: "invalid_request_error", 415: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
}  # fmt: skip
# OpenAI fields whose neutral value changes nothing: accepted (LangChain and others send them) and dropped.
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0), "logprobs": (False,), "store": (False,),
}  # fmt: skip


class ChatError(ApiError):
    """A request mistake on the chat endpoints, naming the field at fault (OpenAI's `param`)."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None) -> None:
        super().__init__(status, code, message)
        self.param = param


async def _openai_error(request: Request, exc: Exception) -> Response:
    """`exc` rendered by the app's own handler (its status, code, message and headers), reshaped as OpenAI's error
    object: one mapping for every endpoint, two spellings."""
    handlers = request.app.exception_handlers
    handler = next((handlers[c] for c in type(exc).__mro__ if c in handlers), None)
    if handler is None:
        raise exc
    response: Response = await handler(request, exc)
    try:
        err = json.loads(bytes(response.body))["error"]
    except (ValueError, KeyError, TypeError):  # e.g. the empty 499 of a client that hung up
        return response
    status = response.status_code
    body = {
        "error": {
            "message": err.get("message", ""),
            "type": _ERROR_TYPES.get(status, "server_error"),
            "param": getattr(exc, "param", None),
            "code": err.get("code", "error"),
        }
    }
    headers = {k: v for k, v in response.headers.items() if k.lower() in ("retry-after", "www-authenticate")}
    return JSONResponse(body, status_code=status, headers=headers)


class OpenAIRoute(APIRoute):
    """A route whose errors, its dependencies' included (API key, readiness), are OpenAI error objects."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:
                return await _openai_error(request, exc)

        return handle


router = APIRouter(prefix="/v1", tags=["openai"], route_class=OpenAIRoute)
ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"model": OpenAIErrorBody} for s in (400, 401, 403, 404, 413, 415, 422, 503)
}


# -- models ----------------------------------------------------------------------------------------------------------


def model_ids(name: str) -> list[str]:
    return [name, *(f"{name}{THINK_SEPARATOR}{p}" for p in LOOP_PROFILES)]


@router.get("/models", response_model=ModelList, responses=ERRORS)
async def list_models(worker: ReadyWorker) -> ModelList:
    """The loaded checkpoint (Q-Zoom) and one think model per thinking-with-images profile."""
    return ModelList(data=[ModelCard(id=m, created=_STARTED) for m in model_ids(worker.engine.name)])


@router.get("/models/{model_id:path}", response_model=ModelCard, responses=ERRORS)
async def get_model(model_id: str, worker: ReadyWorker) -> ModelCard:
    _profile_of(model_id, worker.engine.name)
    return ModelCard(id=model_id, created=_STARTED)


def _profile_of(model: str, name: str) -> str | None:
    """None for the checkpoint itself, the profile for a think model; 404 for anything else."""
    if model == name:
        return None
    if model.startswith(name + THINK_SEPARATOR) and model.removeprefix(name + THINK_SEPARATOR) in LOOP_PROFILES:
        return model.removeprefix(name + THINK_SEPARATOR)
    raise ChatError(
        404, "model_not_found",
        f"model {model[:200]!r} is not served here; GET /v1/models lists {', '.join(model_ids(name))}", "model",
    )  # fmt: skip


# -- reading the request ---------------------------------------------------------------------------------------------


async def read_chat_request(request: Request) -> ChatRequest:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise ChatError(415, "unsupported_media_type", "send the request as a JSON object (application/json)")
    try:
        raw: Any = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError) as err:
        raise ChatError(400, "invalid_json", f"the body is not valid JSON: {err}") from err
    if not isinstance(raw, dict):
        raise ChatError(400, "invalid_request", "the body must be a JSON object: {model, messages, ...}")
    for key in list(raw):
        if key in _NEUTRAL and (raw[key] is None or raw[key] in _NEUTRAL[key]):
            del raw[key]
        elif key in UNSUPPORTED and raw[key] is not None:
            raise ChatError(
                400, "unsupported_field",
                f"{key}: not supported by qzoom's chat completions; supported fields: "
                f"{', '.join(ChatRequest.model_fields)}",
                key,
            )  # fmt: skip
    try:
        return ChatRequest.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]["loc"] if err.errors() else ()
        param = ".".join(str(p) for p in first) or None
        if any(e["type"] == "extra_forbidden" and len(e["loc"]) == 1 for e in err.errors()):
            accepted = list(ChatRequest.model_fields)
            raise ChatError(400, "unsupported_field", describe_errors(err, accepted), param) from err
        raise ChatError(400, "invalid_request", describe_errors(err), param) from err


def _text(content: str | Sequence[Any] | None) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(p.text for p in content if isinstance(p, TextPart))


@dataclass
class DecodedMessages:
    """A request's messages with their images decoded: what each answering path needs."""

    system: str | None
    turns: list[Any]  # the non-system messages
    images: dict[int, list[Image.Image]]  # turn index -> its images, in order
    distinct: list[Image.Image] = field(default_factory=list)  # one per distinct pixel content, first seen first


def _pending_source(
    service: ServiceState, url: str, where: str, scope: str | None
) -> Coroutine[Any, Any, PendingImage]:
    if url.startswith("data:"):
        return read_source(service, image=url, scope=scope)
    if url.startswith(("http://", "https://")):
        return read_source(service, image_url=url, scope=scope)
    raise ChatError(
        400, "invalid_image_url", f"{where}: an image URL is a data:image/...;base64, URL or an http(s) URL", where
    )


@dataclass
class Messages:
    """A request's messages checked for structure and size, their images read (header-checked) but not decoded."""

    system: str | None
    turns: list[Any]  # the non-system messages
    parts: list[tuple[int, str]]  # (turn index, image URL) of every image part, in order
    pending: dict[str, PendingImage]  # one per distinct URL


async def read_messages(service: ServiceState, req: ChatRequest, scope: str | None) -> Messages:
    system = [m for m in req.messages if isinstance(m, SystemMessage)]
    turns = [m for m in req.messages if not isinstance(m, SystemMessage)]
    if not turns or turns[-1].role not in ("user", "tool"):
        raise ChatError(400, "invalid_request", "messages: the last message must be a user message (or tool results)",
                        "messages")  # fmt: skip
    parts = [
        (i, p.image_url.url)
        for i, m in enumerate(turns)
        if not isinstance(m.content, str | None)
        for p in m.content
        if isinstance(p, ImagePart)
    ]
    if not parts:
        raise ChatError(
            400, "no_image", "messages: no image; qzoom answers questions about an image: add an image_url content "
            "part (a data:image/...;base64, URL, or an http(s) URL) to a user message", "messages",
        )  # fmt: skip
    if len(parts) > MAX_IMAGES:
        raise ChatError(400, "too_many_images", f"messages: {len(parts)} images; at most {MAX_IMAGES} per request",
                        "messages")  # fmt: skip
    chars = sum(len(_text(m.content)) for m in req.messages)
    if chars > MAX_TEXT_CHARS:
        raise ChatError(400, "invalid_request", f"messages: {chars} characters of text; at most {MAX_TEXT_CHARS}",
                        "messages")  # fmt: skip
    pending: dict[str, PendingImage] = {}
    for i, url in parts:
        if url not in pending:
            pending[url] = await _pending_source(service, url, f"messages.{i}.image_url.url", scope)
    return Messages("\n\n".join(_text(m.content) for m in system) or None, turns, parts, pending)


async def decode_messages(service: ServiceState, msgs: Messages) -> DecodedMessages:
    """Every image decoded (each distinct URL once), and the distinct pixel contents among them."""
    decoded = {url: await p.decode(service.settings.max_pixels_in) for url, p in msgs.pending.items()}
    images: dict[int, list[Image.Image]] = {}
    for i, url in msgs.parts:
        images.setdefault(i, []).append(decoded[url])
    by_digest: dict[str, Image.Image] = {}
    for img in decoded.values():
        by_digest.setdefault(image_digest(img), img)
    return DecodedMessages(msgs.system, msgs.turns, images, list(by_digest.values()))


def _transcript(conv: DecodedMessages) -> str:
    """Earlier turns as text before the last user message's question (the Q-Zoom graph takes one question)."""
    *earlier, last = conv.turns
    question = _text(last.content).strip()
    if not question:
        raise ChatError(400, "invalid_request", "messages: the last user message has no text; ask a question",
                        "messages")  # fmt: skip
    lines = [f"{'User' if m.role == 'user' else 'Assistant'}: {_text(m.content).strip()}" for m in earlier]
    lines = [line for line in lines if not line.endswith(":")]
    return question if not lines else "Earlier in this conversation:\n" + "\n".join(lines) + "\n\n" + question


def _assistant_text(m: AssistantMessage, where: str) -> str:
    text = _text(m.content)
    for j, call in enumerate(m.tool_calls or []):
        try:
            args = json.loads(call.function.arguments or "{}")
        except ValueError as err:
            param = f"{where}.tool_calls.{j}.function.arguments"
            raise ChatError(400, "invalid_request", f"{param}: not a JSON object ({err})", param) from err
        text += "\n<tool_call>\n" + json.dumps({"name": call.function.name, "arguments": args}) + "\n</tool_call>"
    return text


def _chat_turns(conv: DecodedMessages, start: int) -> list[ChatTurn]:
    """Turns after the opening one, with their images in place."""
    out = []
    for i in range(start, len(conv.turns)):
        m = conv.turns[i]
        if isinstance(m, AssistantMessage):
            out.append(ChatTurn("assistant", [_assistant_text(m, f"messages.{i}")]))
            continue
        if isinstance(m.content, str):
            out.append(ChatTurn(m.role, [m.content]))
            continue
        images = iter(conv.images.get(i, []))
        parts: list[str | Image.Image] = [p.text if isinstance(p, TextPart) else next(images) for p in m.content]
        out.append(ChatTurn("tool" if isinstance(m, ToolMessage) else "user", parts))
    return out


# Qwen2.5-VL's chat template words its tool block so (the model was trained on it).
_TOOLS_PROMPT = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with "
    "function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\nFor each function call, "
    "return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


def _tools_system(req: ChatRequest, system: str | None) -> str:
    assert req.tools is not None
    tools = "\n".join(json.dumps(t.model_dump(exclude_none=True)) for t in req.tools)
    prompt = (system or "You are a helpful assistant.") + _TOOLS_PROMPT.format(tools=tools)
    if req.tool_choice == "required":
        prompt += "\n\nCall at least one of these functions before answering."
    elif req.tool_choice is not None and not isinstance(req.tool_choice, str):
        prompt += f"\n\nCall the function {req.tool_choice.function.name}."
    return prompt


# -- answering -------------------------------------------------------------------------------------------------------


@dataclass
class Answer:
    text: str
    prompt_tokens: int
    completion_tokens: int
    visual_tokens: int
    limit_hit: bool
    report: ZoomReport
    tool_calls: list[ToolCallOut] | None = None


def _cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    cut = min((i for s in stop if (i := text.find(s)) != -1), default=-1)
    return (text[:cut], True) if cut != -1 else (text, False)


def _crop_url(image: Image.Image, box: Sequence[int]) -> str:
    buf = io.BytesIO()
    x0, y0, x1, y1 = box
    image.crop((x0, y0, x1, y1)).convert("RGB").save(buf, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


@dataclass
class Plan:
    """What a validated request runs: its path, image, text, options and limits."""

    path: str
    profile: str | None
    image: Image.Image
    options: AskOptions
    ext: ChatExtension
    max_tokens: int
    stop: tuple[str, ...]
    system: str | None
    query: str = ""
    later: list[ChatTurn] = field(default_factory=list)
    tool_names: list[str] = field(default_factory=list)


@dataclass
class Limits:
    """What a request asks for, checked before any image is decoded."""

    profile: str | None
    options: AskOptions
    ext: ChatExtension
    max_tokens: int
    stop: tuple[str, ...]
    tools_on: bool
    tool_turns: bool


def check_request(req: ChatRequest, name: str, settings: Settings) -> Limits:
    profile = _profile_of(req.model, name)
    limit = min(THINK_MAX_TOKENS if profile else MAX_TOKENS, settings.max_new_tokens)
    given = req.max_completion_tokens or req.max_tokens
    if given is not None and given > limit:
        param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        which = "per turn for think models" if profile else "on this server (QZOOM_MAX_NEW_TOKENS)"
        raise ChatError(400, "invalid_request", f"{param}: at most {limit} {which}; got {given}", param)
    max_tokens = given or min(THINK_DEFAULT_TOKENS if profile else DEFAULT_MAX_TOKENS, limit)
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    if len(stop) > MAX_STOP or any(not s for s in stop):
        raise ChatError(400, "invalid_request", f"stop: up to {MAX_STOP} non-empty strings", "stop")
    ext = req.qzoom or ChatExtension()
    options = AskOptions.model_validate(
        {
            **ext.model_dump(include={"force_zoom", "gate_thresh", "roi_thresh", "min_pixels", "max_pixels"}),
            "max_steps": 1 if ext.max_steps is None else ext.max_steps,
            "max_new_tokens": max_tokens, "temperature": req.temperature, "top_p": req.top_p, "seed": req.seed,
        }
    )  # fmt: skip
    tools_on = bool(req.tools) and req.tool_choice != "none"
    tool_turns = any(
        isinstance(m, ToolMessage) or (isinstance(m, AssistantMessage) and m.tool_calls) for m in req.messages
    )
    if profile is not None and (tools_on or tool_turns):
        raise ChatError(400, "invalid_request", f"tools: {req.model} runs its own zoom tool server-side; client "
                        f"tools pass through on {name}", "tools")  # fmt: skip
    return Limits(profile, options, ext, max_tokens, stop, tools_on, tool_turns)


def price(costs: CostModel, lim: Limits, msgs: Messages) -> Cost:
    """The request's cost for admission (`qzoom.admission`), before decoding: the Q-Zoom graph's on one image, a
    thinking loop's at its turn limit, a conversation's with one view per image."""
    pending = list(msgs.pending.values())
    memory = sum(p.memory for p in pending)
    wh = max((p.wh for p in pending), key=lambda size: size[0] * size[1])
    if lim.profile is not None:
        turns = lim.ext.max_turns or MAX_THINK_TURNS
        return costs.look(wh, memory, views=1 + turns, new_tokens=lim.max_tokens, turns=turns)
    graph = costs.ask(wh, memory, lim.options)
    if len(pending) == 1 and not lim.tools_on and not lim.tool_turns:
        return graph
    talk = costs.look(wh, memory, views=len(pending), new_tokens=lim.max_tokens)
    # Several URLs may still hold one picture (the graph then answers): hold the larger of the two.
    return talk if lim.tools_on or lim.tool_turns or talk.token_steps >= graph.token_steps else graph


def plan_request(req: ChatRequest, conv: DecodedMessages, lim: Limits) -> Plan:
    if lim.profile is not None:
        if len(conv.distinct) > 1:
            raise ChatError(400, "invalid_request", f"messages: {req.model} reasons about one image; this conversation"
                            f" has {len(conv.distinct)}", "messages")  # fmt: skip
        return Plan("think", lim.profile, conv.distinct[0], lim.options, lim.ext, lim.max_tokens, lim.stop,
                    conv.system, _transcript(conv))  # fmt: skip
    if not lim.tools_on and not lim.tool_turns and len(conv.distinct) == 1:
        return Plan("qzoom", None, conv.distinct[0], lim.options, lim.ext, lim.max_tokens, lim.stop, conv.system,
                    _transcript(conv))  # fmt: skip
    # The conversation path: the sequence opens with the first message that holds an image.
    first = min(conv.images)
    opening = conv.turns[first]
    if not isinstance(opening.content, list) or sum(isinstance(p, ImagePart) for p in opening.content) > 1:
        raise ChatError(400, "invalid_request", f"messages.{first}: with several images, send one per message",
                        f"messages.{first}")  # fmt: skip
    earlier = [f"{'User' if m.role == 'user' else 'Assistant'}: {_text(m.content).strip()}" for m in conv.turns[:first]]
    text = "\n".join([*earlier, _text(opening.content)]).strip()
    system = _tools_system(req, conv.system) if lim.tools_on else conv.system
    names = [t.function.name for t in req.tools or []] if lim.tools_on else []
    return Plan("conversation", None, conv.images[first][0], lim.options, lim.ext, lim.max_tokens, lim.stop, system,
                text, _chat_turns(conv, first + 1), names)  # fmt: skip


def _steps_from_graph(plan: Plan, res: Any) -> list[ZoomStep]:
    return [
        ZoomStep(box=s.box, gate_score=s.gate_score, visual_tokens=s.visual_tokens,
                 crop=_crop_url(plan.image, s.box) if plan.ext.crops else None)
        for s in res.steps
    ]  # fmt: skip


async def answer_qzoom(worker: Worker, plan: Plan, on_event: Callable[[dict[str, Any]], None]) -> Answer:
    engine = worker.engine
    with worker.admit():
        seq = engine.new_state(plan.image, plan.query, plan.options, plan.system)
        seq.stop = plan.stop
        async for event in stream_events(worker, seq, uuid.uuid4().hex):
            on_event(event)
    res = result(engine, seq)
    text, stopped = _cut_at_stop(seq.answer, plan.stop)
    report = ZoomReport(
        path="qzoom", zoomed=res.zoomed, gate_score=res.gate_score, steps=_steps_from_graph(plan, res),
        timings_ms=res.timings_ms,
    )  # fmt: skip
    return Answer(
        text, int(seq.input_ids.numel()), len(seq.answer_ids), seq.visual_tokens,
        not stopped and len(seq.answer_ids) >= plan.max_tokens, report,
    )  # fmt: skip


async def answer_think(
    worker: Worker, plan: Plan, service: ServiceState, on_event: Callable[[dict[str, Any]], None]
) -> Answer:
    assert plan.profile is not None
    out = await think_with_images(
        worker, plan.image, plan.query, plan.profile, options=plan.options, policy=service.think_policy,
        box_source=plan.ext.box_source or "model", system_prompt=plan.system, max_turns=plan.ext.max_turns,
        max_new_tokens=plan.max_tokens, on_event=on_event,
    )  # fmt: skip
    tokenizer = worker.engine.processor.tokenizer
    generated = len(out.state.answer_ids) if service.think_policy is None else 0
    completion = generated or sum(len(tokenizer(t.text, add_special_tokens=False)["input_ids"]) for t in out.turns)
    steps = [
        ZoomStep(box=b, crop=_crop_url(plan.image, b) if plan.ext.crops else None) for t in out.turns for b in t.boxes
    ]
    turns = [ThinkTurnReport(turn=i, text=t.text, calls=t.calls, boxes=t.boxes, error=t.error)
             for i, t in enumerate(out.turns, start=1)]  # fmt: skip
    report = ZoomReport(
        path="think", zoomed=bool(steps), gate_score=out.gate_score, steps=steps, turns=turns,
        finished_by=out.finished_by if out.finished_by in ("answer", "gate", "turn_limit") else None,
        timings_ms={k: round(v, 3) for k, v in out.state.timings_ms.items()},
    )  # fmt: skip
    text, _ = _cut_at_stop(out.answer, plan.stop)
    return Answer(
        text, int(out.state.input_ids.numel()) - generated, completion, out.visual_tokens,
        out.finished_by == "turn_limit", report,
    )  # fmt: skip


async def answer_conversation(worker: Worker, plan: Plan, service: ServiceState) -> Answer:
    out = await converse(
        worker, plan.image, plan.query, plan.later, options=plan.options, system_prompt=plan.system,
        stop=plan.stop, max_new_tokens=plan.max_tokens, policy=service.think_policy,
    )  # fmt: skip
    text, stopped = _cut_at_stop(out.reply, plan.stop)
    calls = parse_function_calls(text, plan.tool_names) if plan.tool_names else []
    for call in reversed(calls):
        text = text[: call.span[0]] + text[call.span[1] :]
    tool_calls = [
        ToolCallOut(
            id=f"call_{uuid.uuid4().hex[:24]}", function=FunctionCallOut(name=c.name, arguments=json.dumps(c.arguments))
        )
        for c in calls
    ]  # fmt: skip
    st = out.state
    report = ZoomReport(path="conversation", zoomed=False, gate_score=None, steps=[],
                        timings_ms={k: round(v, 3) for k, v in st.timings_ms.items()})  # fmt: skip
    return Answer(
        text.strip(), out.prompt_tokens, out.completion_tokens, st.visual_tokens,
        not stopped and out.completion_tokens >= plan.max_tokens, report, tool_calls or None,
    )  # fmt: skip


def _run(worker: Worker, plan: Plan, service: ServiceState, on_event: Callable[[dict[str, Any]], None]) -> Any:
    if plan.path == "think":
        return answer_think(worker, plan, service, on_event)
    if plan.path == "conversation":
        return answer_conversation(worker, plan, service)
    return answer_qzoom(worker, plan, on_event)


# -- responses -------------------------------------------------------------------------------------------------------


def _finish_reason(a: Answer) -> str:
    return "tool_calls" if a.tool_calls else ("length" if a.limit_hit else "stop")


def _usage(a: Answer) -> Usage:
    return Usage(
        prompt_tokens=a.prompt_tokens, completion_tokens=a.completion_tokens,
        total_tokens=a.prompt_tokens + a.completion_tokens, visual_tokens=a.visual_tokens,
    )  # fmt: skip


def completion(a: Answer, model: str, cid: str, created: int) -> ChatCompletion:
    message = ResponseMessage(content=a.text if a.text or not a.tool_calls else None, tool_calls=a.tool_calls)
    return ChatCompletion(
        id=cid, created=created, model=model, usage=_usage(a), qzoom=a.report,
        choices=[Choice(message=message, finish_reason=_finish_reason(a))],
    )  # fmt: skip


# The graph and think events a stream forwards (in the chunk's `qzoom` field), with the keys it keeps.
_STREAMED = {
    "gate": ("step", "gate_score", "fires"),
    "propose": ("step", "boxes"),
    "zoom": ("step", "zoom_step", "boxes", "visual_tokens"),
    "think": ("step", "turn", "text", "calls", "error"),
    "act": ("step", "turn", "boxes"),
}


def _stream_event(event: dict[str, Any], plan: Plan) -> dict[str, Any] | None:
    keys = _STREAMED.get(str(event.get("step")))
    if keys is None:
        return None
    out = {k: event.get(k) for k in keys}
    if plan.ext.crops and event.get("step") in ("zoom", "act"):
        out["crops"] = [_crop_url(plan.image, b) for b in event.get("boxes") or []]
    return out


async def _started(work: Coroutine[Any, Any, Answer]) -> asyncio.Task[Answer]:
    """The work as a task that has already run to its first await: admission (`Worker.admit`) and request checks
    are synchronous at its start, so a full worker is still a 503 before a stream begins."""
    task = asyncio.ensure_future(work)
    await asyncio.sleep(0)
    if task.done() and task.exception() is not None:
        task.result()  # raises it
    return task


def _sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


async def _chunks(
    task: asyncio.Task[Answer],
    events: asyncio.Queue[dict[str, Any]],
    plan: Plan,
    req: ChatRequest,
    cid: str,
    created: int,
    stack: contextlib.ExitStack,
) -> AsyncIterator[bytes]:
    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": req.model,
                "choices": [choice], **extra}  # fmt: skip
        return _sse(body)

    try:
        yield chunk({"role": "assistant", "content": ""})
        while not (task.done() and events.empty()):
            getter = asyncio.ensure_future(events.get())
            await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                continue
            shown = _stream_event(getter.result(), plan)
            if shown is not None:
                yield chunk({}, qzoom=shown)
        a = task.result()
        if a.text:
            yield chunk({"content": a.text})
        if a.tool_calls:
            calls = [{"index": i, **c.model_dump()} for i, c in enumerate(a.tool_calls)]
            yield chunk({"tool_calls": calls})
        yield chunk({}, _finish_reason(a), qzoom={"step": "done", "report": a.report.model_dump()})
        if req.stream_options is not None and req.stream_options.include_usage:
            usage = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": req.model,
                     "choices": [], "usage": _usage(a).model_dump()}  # fmt: skip
            yield _sse(usage)
    except Exception as exc:
        # Once the stream has begun the status is sent; the error goes as an event in OpenAI's error shape.
        if isinstance(exc, ApiError):
            err = {"message": exc.message, "type": _ERROR_TYPES.get(exc.status, "server_error"),
                   "param": getattr(exc, "param", None), "code": exc.code}  # fmt: skip
        else:
            log.exception("chat completion %s failed while streaming", cid)
            err = {"message": "the request failed; the failure was logged", "type": "server_error", "param": None,
                   "code": "internal_error"}  # fmt: skip
        yield _sse({"error": err})
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        stack.close()  # the request's admission
    yield b"data: [DONE]\n\n"


_REQUEST_SCHEMA = inline_refs(ChatRequest.model_json_schema())


@router.post(
    "/chat/completions",
    response_model=ChatCompletion,
    responses={**ERRORS, 200: {"content": {"text/event-stream": {}}}},
    openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": _REQUEST_SCHEMA}}}},
)
async def chat_completions(request: Request, service: Service, worker: ReadyWorker) -> Any:
    """OpenAI Chat Completions: answer the last message about the conversation's image(s), zooming as needed."""
    req = await read_chat_request(request)
    lim = check_request(req, worker.engine.name, service.settings)  # before any image is fetched or decoded
    msgs = await read_messages(service, req, tenant_of(request))
    assert service.costs is not None  # set together with the worker, which ReadyWorker guarantees
    cost = price(service.costs, lim, msgs)
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    # Admitted before anything is decoded; the cost is held until the answer (or the stream's end).
    stack = contextlib.ExitStack()
    try:
        stack.enter_context(service.budget.admit(cost))
        plan = plan_request(req, await decode_messages(service, msgs), lim)
        if req.stream:
            task = await _started(_run(worker, plan, service, events.put_nowait))
            response = StreamingResponse(
                _chunks(task, events, plan, req, cid, created, stack), media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )  # fmt: skip
            # A client gone before the first chunk never runs the generator's `finally`: free the place here too.
            response.background = BackgroundTask(stack.close)
            return response
        with stack:
            outcome = await until_disconnected(request, _run(worker, plan, service, lambda e: None))
    except BaseException:
        stack.close()
        raise
    if isinstance(outcome, Response):
        return outcome
    return completion(outcome, req.model, cid, created)
