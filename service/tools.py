"""The Q-Zoom steps as tools for other systems: `POST /v1/tools/gate` and `POST /v1/tools/propose`.

Both take a JSON object: one image source (`image_id` from `POST /v1/images`, `image` as base64 / data URL, or
`image_url` when enabled; see `service.sources`) and the `query`.

- `gate` -> `GateResponse`: the gate's probability that the question needs a closer look than the coarse view,
  `needs_detail` (score >= the checkpoint's τ_gate) and τ_gate itself.
- `propose` (+ `max_boxes`, `margin`) -> `ProposeResponse`: the SD-RPN's boxes in original-image pixels (x1/y1
  exclusive; the whole image when no cell passes τ_roi, with `found: false`), the gate score when the checkpoint has
  a gate, and the map itself: `heatmap.values` is `rows x cols` floats in [0, 1] over `heatmap.box`, the region of
  the original image the map covers (the whole image: the map is the coarse view's).

The model runs on the worker's device thread (the same bounded queue as `/ask`; 503 `overloaded` when full), and a
client that disconnects cancels its request. Errors are the error model: 400/415/422 bad bodies (each field named,
accepted fields listed), 404 unknown `image_id`, 403/413/422 image URL refusals, 413/415 bad images, 422
`not_supported` when the checkpoint lacks the gate or the SD-RPN, 503 overloaded or not ready.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request, Response
from PIL import Image
from pydantic import BaseModel, Field

from qzoom.agent.tool import ZoomToolRunner
from qzoom.guards import Query
from qzoom.roi import heatmap_rows
from qzoom.tools.tool_args import MAX_PROPOSED_BOXES

from .cancel import until_disconnected
from .deps import ReadyWorker, Service, ServiceState, tenant_of
from .errors import ApiError, ErrorBody
from .sources import ImageSourceFields, json_body_doc, read_json, read_source

router = APIRouter(prefix="/v1/tools", tags=["tools"])

ERRORS: dict[int | str, dict[str, Any]] = {s: {"model": ErrorBody} for s in (400, 401, 403, 404, 413, 415, 422, 503)}


class GateRequest(ImageSourceFields):
    """An image and a question for the gate."""

    query: Query = Field(description="the question about the image")


class ProposeRequest(GateRequest):
    """An image and a question for the region proposer."""

    max_boxes: int | None = Field(
        None, ge=1, le=MAX_PROPOSED_BOXES, description="boxes at most (connected components); null: the checkpoint's"
    )
    margin: float = Field(0.0, ge=0.0, le=1.0, description="extra border around each box, fraction of its side")


class GateResponse(BaseModel):
    gate_score: float = Field(description="probability that the question needs detail beyond the coarse view")
    needs_detail: bool = Field(description="gate_score >= threshold: Q-Zoom would zoom")
    threshold: float = Field(description="the checkpoint's τ_gate")
    image_wh: list[int] = Field(description="[width, height] of the original image")
    model: str


class Heatmap(BaseModel):
    grid_hw: list[int] = Field(description="[rows, cols] of the map (one cell per merged token of the coarse view)")
    values: list[list[float]] = Field(description="rows x cols region probabilities in [0, 1]")
    box: list[int] = Field(description="[x0, y0, x1, y1], the region of the original image the map covers")
    threshold: float = Field(description="τ_roi: cells above it form the boxes")
    max_prob: float


class ProposeResponse(BaseModel):
    boxes: list[list[int]] = Field(description="[x0, y0, x1, y1] in original-image pixels, x1/y1 exclusive")
    found: bool = Field(description="false when no cell passed τ_roi and the box is the whole image")
    gate_score: float | None = Field(description="the gate's probability (null without a gate)")
    image_wh: list[int]
    heatmap: Heatmap
    model: str


@contextlib.asynccontextmanager
async def _admitted(request: Request, service: ServiceState, req: ImageSourceFields) -> AsyncIterator[Image.Image]:
    """The request's image, decoded after its cost (one view of it, nothing decoded) was admitted; the cost is held
    until the block ends."""
    pending = await read_source(
        service, image_id=req.image_id, image=req.image, image_url=req.image_url, scope=tenant_of(request)
    )
    assert service.costs is not None  # set together with the worker, which ReadyWorker guarantees
    with service.budget.admit(service.costs.look(pending.wh, pending.memory)):
        yield await pending.decode(service.settings.max_pixels_in)


def _runner(service: ServiceState) -> ZoomToolRunner:
    assert service.runner is not None  # set together with the worker, which ReadyWorker guarantees
    return service.runner


@router.post("/gate", response_model=GateResponse, responses=ERRORS, openapi_extra=json_body_doc(GateRequest))
async def gate(request: Request, service: Service, worker: ReadyWorker) -> GateResponse | Response:
    """Does answering the question need a closer look at the image? (the Q-Zoom gate)"""
    req = await read_json(request, GateRequest)
    if not worker.engine.has_gate:
        raise ApiError(422, "not_supported", "this checkpoint has no gate; use /v1/tools/propose or /v1/tools/zoom")
    async with _admitted(request, service, req) as image:
        outcome = await until_disconnected(request, _runner(service).gate(image, req.query))
    if isinstance(outcome, Response):
        return outcome
    score, threshold = outcome
    return GateResponse(
        gate_score=score, needs_detail=score >= threshold, threshold=threshold,
        image_wh=[image.width, image.height], model=worker.engine.name,
    )  # fmt: skip


@router.post("/propose", response_model=ProposeResponse, responses=ERRORS, openapi_extra=json_body_doc(ProposeRequest))
async def propose(request: Request, service: Service, worker: ReadyWorker) -> ProposeResponse | Response:
    """Where in the image is what the question asks about? (the SD-RPN's boxes and map)"""
    req = await read_json(request, ProposeRequest)
    if not worker.engine.has_rpn:
        raise ApiError(422, "not_supported", "this checkpoint has no region proposer (SD-RPN); send a box to zoom")
    async with _admitted(request, service, req) as image:
        work = _runner(service).proposal(image, req.query, max_boxes=req.max_boxes, margin=req.margin)
        outcome = await until_disconnected(request, work)
    if isinstance(outcome, Response):
        return outcome
    proposal, gate_score, roi_thresh = outcome
    values = heatmap_rows(proposal.prob)
    boxes = proposal.boxes or [proposal.block.box]
    return ProposeResponse(
        boxes=[b.as_list() for b in boxes],
        found=bool(proposal.boxes),
        gate_score=gate_score if gate_score is not None and math.isfinite(gate_score) else None,
        image_wh=[image.width, image.height],
        heatmap=Heatmap(
            grid_hw=[len(values), len(values[0]) if values else 0],
            values=values,
            box=proposal.block.box.as_list(),
            threshold=roi_thresh,
            max_prob=max((max(row) for row in values), default=0.0),
        ),
        model=worker.engine.name,
    )
