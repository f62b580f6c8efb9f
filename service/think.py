"""`POST /v1/think`: the multi-turn zoom loop of an RL "thinking-with-images" model (`agent.thinking`), over HTTP.

Request (JSON): one image source (as in `service.sources`), `query`, and `profile`, the zoom-call protocol of the
hosted model (`deepeyes`, `chain-of-focus`, `mini-o3`, `mini-o3-resized`, `pixel-reasoner`, `qwen3-vl`): its call
syntax and coordinate frame are parsed, and crops go back in the turn format it was trained on. Options:
`box_source` (`model`: the model's boxes; `sd_rpn`: the SD-RPN's box stands in for every call), `force_zoom`
(`true` skips the gate, `false` answers from the coarse view; `null` lets the gate decide), `max_turns`,
`max_new_tokens` per turn, and `system_prompt` (the model's original prompt; default: qzoom's wording of the
profile's protocol).

Response `ThinkResponse`: the final `answer`, how the loop ended (`finished_by`: `answer`, `gate` or `turn_limit`),
the gate score, and every assistant turn with its text, the zoom calls it made (as written) and their boxes in
original-image pixels, or the parse error handed back to the model.

The loop runs on the worker (one place held for the whole conversation; 503 `overloaded` when full) and a client
that disconnects cancels it. `ServiceState.think_policy`, when set, writes the assistant turns instead of the
model (the scripted-policy seam of `agent.thinking`, for tests and demos); the tool calls are executed all the same.
"""

from __future__ import annotations

from typing import Any, Literal, cast, get_args

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, Field

from qzoom.agent.thinking import LOOP_PROFILES, ThinkingResult, think_with_images
from qzoom.guards import Query
from qzoom.schemas import AskOptions

from .cancel import until_disconnected
from .deps import ReadyWorker, Service, tenant_of
from .errors import ErrorBody
from .sources import ImageSourceFields, json_body_doc, read_json, read_source

router = APIRouter(prefix="/v1", tags=["think"])

MAX_TURNS = 8
MAX_TURN_TOKENS = 512
ERRORS: dict[int | str, dict[str, Any]] = {s: {"model": ErrorBody} for s in (400, 401, 403, 404, 413, 415, 422, 503)}

Profile = Literal["deepeyes", "chain-of-focus", "mini-o3", "mini-o3-resized", "pixel-reasoner", "qwen3-vl"]
assert set(get_args(Profile)) == set(LOOP_PROFILES), "keep Profile in step with agent.thinking.LOOP_PROFILES"


class ThinkRequest(ImageSourceFields):
    """One question for a thinking-with-images model, run through its zoom-tool loop."""

    query: Query = Field(description="the question about the image")
    profile: Profile = Field(description="the hosted model's zoom-call protocol")
    box_source: Literal["model", "sd_rpn"] = Field(
        "model", description="model: execute the model's boxes; sd_rpn: the SD-RPN's box for every call"
    )
    force_zoom: bool | None = Field(
        None, description="true: skip the gate and let the model think; false: answer from the coarse view"
    )
    max_turns: int | None = Field(
        None, ge=1, le=MAX_TURNS, description="assistant turns at most (null: the profile's limit)"
    )
    max_new_tokens: int = Field(128, ge=1, le=MAX_TURN_TOKENS, description="tokens per assistant turn at most")
    system_prompt: str | None = Field(
        None, max_length=8000, description="the model's own system prompt (null: qzoom's wording of the protocol)"
    )


class ThinkTurn(BaseModel):
    turn: int = Field(description="1-based")
    text: str = Field(description="what the assistant wrote")
    calls: list[str] = Field(description="the zoom calls in the turn, as written")
    boxes: list[list[int]] = Field(description="the regions cropped for those calls, original-image pixels")
    error: str | None = Field(description="why a call could not be executed (shown to the model), else null")


FinishedBy = Literal["answer", "gate", "turn_limit"]


class ThinkResponse(BaseModel):
    answer: str
    finished_by: FinishedBy
    gate_score: float | None = Field(description="the gate's probability (null when it did not run)")
    turns: list[ThinkTurn]
    zooms: list[list[int]] = Field(description="every crop shown to the model, original pixels, in order")
    visual_tokens: int = Field(description="image tokens of the original and every crop in the conversation")
    profile: str
    model: str


def _response(result: ThinkingResult, profile: str, model: str) -> ThinkResponse:
    turns = [
        ThinkTurn(turn=i, text=t.text, calls=t.calls, boxes=t.boxes, error=t.error)
        for i, t in enumerate(result.turns, start=1)
    ]
    return ThinkResponse(
        answer=result.answer,
        finished_by=cast(FinishedBy, result.finished_by),  # the thinking graph's answer node sets one of the three
        gate_score=result.gate_score,
        turns=turns,
        zooms=result.zooms,
        visual_tokens=result.visual_tokens,
        profile=profile,
        model=model,
    )


@router.post("/think", response_model=ThinkResponse, responses=ERRORS, openapi_extra=json_body_doc(ThinkRequest))
async def think(request: Request, service: Service, worker: ReadyWorker) -> ThinkResponse | Response:
    """Answer a question the way a thinking-with-images model does: think, zoom with its tool, repeat."""
    req = await read_json(request, ThinkRequest)
    pending = await read_source(
        service, image_id=req.image_id, image=req.image, image_url=req.image_url, scope=tenant_of(request)
    )
    assert service.costs is not None  # set together with the worker, which ReadyWorker guarantees
    # Priced at the loop's upper bound: one view and max_new_tokens for each of up to MAX_TURNS turns.
    turns = req.max_turns or MAX_TURNS
    cost = service.costs.look(pending.wh, pending.memory, views=1 + turns, new_tokens=req.max_new_tokens, turns=turns)
    with service.budget.admit(cost):
        image = await pending.decode(service.settings.max_pixels_in)
        work = think_with_images(
            worker, image, req.query, req.profile,
            options=AskOptions(force_zoom=req.force_zoom), policy=service.think_policy, box_source=req.box_source,
            system_prompt=req.system_prompt, max_turns=req.max_turns, max_new_tokens=req.max_new_tokens,
        )  # fmt: skip
        outcome = await until_disconnected(request, work)
    if isinstance(outcome, Response):
        return outcome
    return _response(outcome, req.profile, worker.engine.name)
