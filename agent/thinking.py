"""The tool loop of RL "thinking-with-images" models (DeepEyes, Chain-of-Focus, Mini-o3, Pixel-Reasoner, Qwen3-VL).

    START -> observe -> gate -> think -> act -> think -> act ... -> answer -> END
                         |        |                                  ^
                         +--------+---- (gate closed / no call) -----+

The model (or a scripted policy standing in for one) writes an assistant turn; if the turn holds zoom calls in its
profile's syntax (`qzoom.tools.parsers`), each call is executed against the ORIGINAL image (boxes mapped from the
profile's coordinate frame and from the image the call names, clamped, grown to the minimum side, aspect capped),
and the crops go back in the turn format that model was trained on; the loop goes on until a turn has no call, or
the profile's turn limit. A call without a box, or every call when `box_source="sd_rpn"`, takes the SD-RPN's box on
the newest image. When the checkpoint has a gate and it stays closed, the question is answered directly without any
tool turn.

One request keeps one append-only sequence: every turn is appended to the same KV cache (`QZoomEngine.append` and
`generate(keep_history=True)`), and image and crop features come from the feature cache. The system prompts here
are qzoom's own wording of each model's tool protocol (the exact prompts are referenced in
`ModelProfile.system_prompt_ref`); pass `system_prompt=` to use a model's original prompt verbatim.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypedDict

from langgraph.config import get_stream_writer
from langgraph.graph import END, START, StateGraph
from langgraph.graph.state import CompiledStateGraph
from langgraph.runtime import Runtime
from PIL import Image

from qzoom.engine import ImagePiece, Proposal, SequenceState
from qzoom.roi import PixelBox
from qzoom.schemas import AskOptions
from qzoom.tools.frames import BoxOutsideImage, check_inside, clamp_box
from qzoom.tools.parsers import PROFILES, CropReturn, ModelProfile, ZoomCall, ZoomCallError, parse_zoom_calls
from qzoom.worker import Worker

LOOP_PROFILES = ("deepeyes", "chain-of-focus", "mini-o3", "mini-o3-resized", "pixel-reasoner", "qwen3-vl")
DEFAULT_MAX_TURNS = 8
ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_ids = itertools.count(1)

# A scripted policy stands in for a model: given the turn number (1-based) and the conversation so far, it returns
# the assistant's text, which is then fed through the model exactly like generated text.
Policy = Callable[[int, str], str]


def system_prompt_for(profile: ModelProfile) -> str:
    """qzoom's wording of the profile's tool protocol: how to call, which coordinates, how to answer."""
    return (
        "You are a helpful assistant that can look closer at parts of an image. Think step by step. "
        f"To zoom into a region, write exactly: {profile.accepted_form}. "
        f"Coordinates are {profile.frame.description}. "
        "When you can answer, write the final answer as <answer>...</answer>."
    )


def tool_turn(profile: ModelProfile, crops: list[ImagePiece], question: str, first_observation: int) -> list[Any]:
    """The next user turn carrying `crops`, in the format the profile's model was trained on (peers.md §3)."""
    close = "<|im_end|>\n<|im_start|>assistant\n"
    kind = profile.crop_return
    if kind is CropReturn.USER_TOOL_RESPONSE:  # DeepEyes
        return [
            "<|im_start|>user\n<tool_response>",
            *crops,
            "</tool_response>\nThink first, then zoom again or give the answer in <answer></answer>." + close,
        ]
    if kind is CropReturn.USER_OBSERVATION:  # Mini-o3: crops are named, later calls may refer to them
        parts: list[Any] = ["<|im_start|>user\n"]
        for i, crop in enumerate(crops):
            parts += [f"Observation {first_observation + i}:", crop]
        return [*parts, close]
    if kind is CropReturn.TOOL_RESULT:  # Qwen3-VL: the chat template's tool message
        return ["<|im_start|>user\n<tool_response>\n", *crops, "\n</tool_response>" + close]
    if kind is CropReturn.USER_IMAGE:
        if profile.name == "pixel-reasoner":
            parts = ["<|im_start|>user\n"]
            for crop in crops:
                parts += [f"Here is the cropped image (Image Size: {crop.image.width}x{crop.image.height}):", crop]
            return [*parts, close]
        return ["<|im_start|>user\n", *crops, question + close]  # Chain-of-Focus: the crop, then the question again
    raise ValueError(
        f"profile {profile.name!r} returns crops as {kind.value}, which is not a conversation turn; "
        f"the tool loop runs {', '.join(LOOP_PROFILES)}"
    )


@dataclass
class TurnRecord:
    """One assistant turn: what it said, the zooms it asked for (original pixels), or why a call failed."""

    text: str
    boxes: list[list[int]] = field(default_factory=list)
    calls: list[str] = field(default_factory=list)  # the raw call texts
    error: str | None = None


@dataclass
class ThinkingContext:
    worker: Worker
    seq: SequenceState
    profile: ModelProfile
    question: str
    policy: Policy | None = None
    box_source: Literal["model", "sd_rpn"] = "model"
    max_new_tokens: int = 256
    max_turns: int = DEFAULT_MAX_TURNS
    images: list[ImagePiece] = field(default_factory=list)  # 0: the original; then every crop shown, in order
    turns: list[TurnRecord] = field(default_factory=list)
    pending_calls: list[ZoomCall | None] = field(default_factory=list)  # None: a call without a box (SD-RPN)


class ThinkingState(TypedDict, total=False):
    request_id: str
    turn: int
    gate_score: float | None
    answer: str
    finished_by: str  # "answer", "gate", "turn_limit"


def _emit(event: dict[str, Any]) -> None:
    get_stream_writer()(event)


async def observe(state: ThinkingState, runtime: Runtime[ThinkingContext]) -> dict[str, Any]:
    ctx = runtime.context
    await ctx.worker.call("observe", ctx.seq)
    ctx.images = [ImagePiece(ctx.seq.image, None)]
    _emit({"step": "observe", "request_id": state["request_id"], "visual_tokens": ctx.seq.visual_tokens})
    return {"turn": 0, "gate_score": None}


async def gate(state: ThinkingState, runtime: Runtime[ThinkingContext]) -> dict[str, Any]:
    ctx = runtime.context
    p = float(await ctx.worker.call("gate", ctx.seq))
    _emit({"step": "gate", "request_id": state["request_id"], "gate_score": p, "fires": p >= ctx.seq.gate_thresh})
    return {"gate_score": p}


async def think(state: ThinkingState, runtime: Runtime[ThinkingContext]) -> dict[str, Any]:
    """One assistant turn: generated with the profile's stop strings, or the policy's text fed as-is."""
    ctx = runtime.context
    turn = state.get("turn", 0) + 1
    if turn == 1:
        await ctx.worker.call("finish", ctx.seq)  # the prompt through every layer, KV kept for the conversation
    if ctx.policy is not None:
        text = ctx.policy(turn, ctx.worker.engine.processor.tokenizer.decode(ctx.seq.input_ids.tolist()))
        await ctx.worker.call("append", ctx.seq, [text + "<|im_end|>\n"])
    else:
        text = str(await ctx.worker.call("generate", ctx.seq, (ctx.profile.stop, ctx.max_new_tokens)))
        # A turn cut at a stop string or the token limit has no <|im_end|> yet; close it so the next turn starts
        # cleanly (a turn that ended on <|im_end|> already holds it in its history).
        ended = int(ctx.seq.input_ids[-1]) in ctx.worker.engine.stop_ids
        await ctx.worker.call("append", ctx.seq, ["\n" if ended else "<|im_end|>\n"])
    record = TurnRecord(text=text)
    ctx.pending_calls = []
    try:
        calls = parse_zoom_calls(text, ctx.profile)
        ctx.pending_calls = list(calls)
        record.calls = [c.raw for c in calls]
    except ZoomCallError as err:
        if err.problem.startswith("missing key 'bbox_2d'"):
            ctx.pending_calls = [None]  # a call without a box: the SD-RPN chooses
            record.calls = [err.snippet]
        else:
            record.error = str(err)
    ctx.turns.append(record)
    _emit(
        {"step": "think", "request_id": state["request_id"], "turn": turn, "text": text, "calls": record.calls,
         "error": record.error}
    )  # fmt: skip
    return {"turn": turn}


def _resolve(ctx: ThinkingContext, call: ZoomCall) -> list[PixelBox]:
    """The call's boxes in pixels of the ORIGINAL image: through the named image's frame and crop offset.

    A box with no pixel inside the image it names raises `ZoomCallError` naming that image's size (shown to the
    model, like a malformed call) instead of clamping to a corner crop nobody asked for."""
    index = call.image_index if 0 <= call.image_index < len(ctx.images) else 0
    if not ctx.profile.image_index_counts_tool_images:
        index = 0  # Qwen3-VL's img_idx counts the user's images only: here, the one original
    base = ctx.images[index]
    origin = base.box or PixelBox(0, 0, ctx.seq.image.width, ctx.seq.image.height)
    named_wh = (origin.width, origin.height)
    boxes = []
    for written, (x0, y0, x1, y1) in zip(call.boxes, call.original_boxes(named_wh), strict=True):
        try:
            check_inside((x0, y0, x1, y1), named_wh, shown=f"{list(written)} ({call.frame.description})")
        except BoxOutsideImage as err:
            raise ZoomCallError(str(err), call.raw, call.model_profile) from None
        clamped = clamp_box(
            (origin.x0 + x0, origin.y0 + y0, origin.x0 + x1, origin.y0 + y1),
            (ctx.seq.image.width, ctx.seq.image.height),
            min_side=ctx.profile.min_side,
            max_aspect=ctx.profile.max_aspect,
        )
        boxes.append(PixelBox(*clamped))
    return boxes


async def act(state: ThinkingState, runtime: Runtime[ThinkingContext]) -> dict[str, Any]:
    """Execute the turn's zoom calls against the original image and append the tool turn with the crops."""
    ctx = runtime.context
    record = ctx.turns[-1]
    boxes: list[PixelBox] = []
    if record.error is None:
        try:
            for call in ctx.pending_calls:
                if call is not None and ctx.box_source == "model":
                    boxes += _resolve(ctx, call)
                    continue
                proposal: Proposal = await ctx.worker.call("propose", ctx.seq)
                boxes += proposal.boxes[:1] or [proposal.block.box]  # nothing above τ_roi: the newest image itself
        except ZoomCallError as err:  # a box outside the image it names
            record.error = str(err)
    if record.error is not None:
        # A malformed or unusable call: the model sees the problem and the accepted form, and may try again.
        parts: list[Any] = [f"<|im_start|>user\n{record.error}<|im_end|>\n<|im_start|>assistant\n"]
    else:
        crops = [ImagePiece(ctx.seq.image.crop((b.x0, b.y0, b.x1, b.y1)), b) for b in boxes]
        record.boxes = [b.as_list() for b in boxes]
        parts = tool_turn(ctx.profile, crops, ctx.question, first_observation=len(ctx.images))
        ctx.images += crops
    await ctx.worker.call("append", ctx.seq, parts)
    _emit({"step": "act", "request_id": state["request_id"], "turn": state["turn"], "boxes": record.boxes})
    return {}


async def answer(state: ThinkingState, runtime: Runtime[ThinkingContext]) -> dict[str, Any]:
    ctx = runtime.context
    if not ctx.turns:  # the gate stayed closed: the direct answer from the coarse view, no tool turn
        text = str(await ctx.worker.call("answer", ctx.seq))
        final, how = text, "gate"
    else:
        last = ctx.turns[-1].text
        match = ANSWER_RE.search(last)
        final = match.group(1).strip() if match else last.strip()
        how = "answer" if not ctx.pending_calls or state.get("turn", 0) < ctx.max_turns else "turn_limit"
    _emit({"step": "answer", "request_id": state["request_id"], "answer": final, "finished_by": how})
    return {"answer": final, "finished_by": how}


def route_after_observe(state: ThinkingState, runtime: Runtime[ThinkingContext]) -> str:
    engine = runtime.context.worker.engine
    forced = runtime.context.seq.options.force_zoom
    return "gate" if engine.has_gate and forced is None else ("answer" if forced is False else "think")


def route_after_gate(state: ThinkingState, runtime: Runtime[ThinkingContext]) -> str:
    return "think" if (state.get("gate_score") or 0.0) >= runtime.context.seq.gate_thresh else "answer"


def route_after_think(state: ThinkingState, runtime: Runtime[ThinkingContext]) -> str:
    ctx = runtime.context
    wants_tool = bool(ctx.pending_calls) or ctx.turns[-1].error is not None
    return "act" if wants_tool and state["turn"] < ctx.max_turns else "answer"


def build_thinking_graph() -> CompiledStateGraph[Any, Any, Any, Any]:
    g = StateGraph(ThinkingState, context_schema=ThinkingContext)
    g.add_node("observe", observe)
    g.add_node("gate", gate)
    g.add_node("think", think)
    g.add_node("act", act)
    g.add_node("answer", answer)
    g.add_edge(START, "observe")
    g.add_conditional_edges("observe", route_after_observe, ["gate", "think", "answer"])
    g.add_conditional_edges("gate", route_after_gate, ["think", "answer"])
    g.add_conditional_edges("think", route_after_think, ["act", "answer"])
    g.add_edge("act", "think")
    g.add_edge("answer", END)
    return g.compile()


THINKING_GRAPH = build_thinking_graph()


@dataclass
class ThinkingResult:
    answer: str
    finished_by: str
    gate_score: float | None
    turns: list[TurnRecord]
    zooms: list[list[int]]  # every crop shown to the model, original pixels, in order
    visual_tokens: int
    cache_hits: list[str]
    conversation: str  # the whole token sequence, decoded (special tokens kept)
    state: SequenceState  # the request's tensors (ids, positions, KV), for inspection; not serialisable


async def think_with_images(
    worker: Worker,
    image: Image.Image,
    question: str,
    profile: str,
    *,
    options: AskOptions | None = None,
    policy: Policy | None = None,
    box_source: Literal["model", "sd_rpn"] = "model",
    system_prompt: str | None = None,
    max_turns: int | None = None,
    max_new_tokens: int = 256,
    request_id: str | None = None,
    on_event: Callable[[dict[str, Any]], None] | None = None,
) -> ThinkingResult:
    """Run one question through the profile's multi-turn zoom loop; see the module docstring.

    `on_event` receives each step's event as it happens (`observe`, `gate`, `think`, `act`, `answer`), for streaming.
    """
    if profile not in LOOP_PROFILES:
        raise ValueError(f"unknown tool-loop profile {profile!r}; expected one of {', '.join(LOOP_PROFILES)}")
    prof = PROFILES[profile]
    turns = max_turns or prof.max_turns or DEFAULT_MAX_TURNS
    with worker.admit():
        seq = worker.engine.new_state(image, question, options, system_prompt or system_prompt_for(prof))
        ctx = ThinkingContext(
            worker, seq, prof, question, policy, box_source, max_new_tokens=max_new_tokens, max_turns=turns
        )
        final: dict[str, Any] = {}
        stream: Any = THINKING_GRAPH.astream(
            {"request_id": request_id or f"t{next(_ids)}"},
            config={"recursion_limit": 2 * turns + 8},
            context=ctx,
            stream_mode=["custom", "values"],
        )
        async for mode, chunk in stream:  # (mode, payload) pairs when several modes are streamed
            if mode == "values":
                final = chunk
            elif on_event is not None:
                on_event(chunk)
    return ThinkingResult(
        answer=final["answer"],
        finished_by=final["finished_by"],
        gate_score=final.get("gate_score"),
        turns=ctx.turns,
        zooms=[b for t in ctx.turns for b in t.boxes],
        visual_tokens=seq.visual_tokens,
        cache_hits=list(seq.cache_hits),
        conversation=worker.engine.processor.tokenizer.decode(seq.input_ids.tolist()),
        state=seq,
    )
