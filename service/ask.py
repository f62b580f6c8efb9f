"""`POST /ask`: one question about one image, answered through the Q-Zoom graph.

Request, either of:
- `multipart/form-data`: `image` (file), `query`, and any `AskOptions` field as a form field (empty fields are
  ignored); or `image_id` (from `POST /v1/images`) instead of the file.
- `application/json`: `{"image": base64 or data URL, "query": ..., <AskOptions fields>}`, or `image_id` instead of
  `image`.

Response: the `AskResult` JSON of DESIGN.md. With `Accept: text/event-stream`, one SSE event per graph step as it
happens (`event: observe|gate|propose|zoom|answer`, `data:` the step's event dict as JSON), the `answer` event last;
its data also carries `"result"`, the full `AskResult`. A failure after the stream has begun is sent as
`event: error` with the error model as data. Errors before that are the error model (see `service.errors`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any, Self

from fastapi import APIRouter, Request
from fastapi.sse import EventSourceResponse, format_sse_event
from PIL import Image
from pydantic import Field, ValidationError, model_validator
from starlette.background import BackgroundTask
from starlette.datastructures import UploadFile

from qzoom.agent.graph import stream_events
from qzoom.agent.zoom import ask_one, result
from qzoom.guards import Query, parse_json
from qzoom.schemas import AskOptions, AskResult
from qzoom.worker import Worker

from .cancel import until_disconnected
from .deps import ReadyWorker, Service, tenant_of
from .errors import ApiError, ErrorBody, describe_errors
from .sources import read_source

log = logging.getLogger(__name__)

router = APIRouter(tags=["ask"])


class AskRequest(AskOptions):
    """The JSON body of `POST /ask` (the multipart form carries the same fields, with `image` as a file)."""

    image: str | None = Field(None, description="the image as base64 or a data URL 'data:image/png;base64,...'")
    image_id: str | None = Field(None, description="id returned by POST /v1/images, instead of image")
    image_url: str | None = Field(
        None, max_length=2048, description="an http(s) URL the server fetches (only when QZOOM_IMAGE_URLS is on)"
    )
    query: Query = Field(description="the question about the image")

    @model_validator(mode="after")
    def _one_image(self) -> Self:
        given = [n for n in ("image", "image_id", "image_url") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of image, image_id or image_url, not {' and '.join(given)}")
        return self

    def options(self) -> AskOptions:
        return AskOptions.model_validate(self.model_dump(include=set(AskOptions.model_fields)))


ACCEPTED_FIELDS = list(AskRequest.model_fields)

_ERRORS: dict[int | str, dict[str, Any]] = {s: {"model": ErrorBody} for s in (400, 401, 403, 404, 413, 415, 422, 503)}


def _validate(fields: dict[str, Any]) -> AskRequest:
    try:
        return AskRequest.model_validate(fields)
    except ValidationError as err:
        raise ApiError(422, "invalid_request", describe_errors(err, ACCEPTED_FIELDS)) from err


async def _read_request(request: Request) -> tuple[AskRequest, bytes | None]:
    """The validated fields and, for multipart, the uploaded file's bytes."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json":
        fields = parse_json(await request.body())
        if not isinstance(fields, dict):
            raise ApiError(422, "invalid_request", "the JSON body must be an object with image and query")
        return _validate(fields), None
    if ctype == "multipart/form-data":
        form = await request.form(max_files=1, max_fields=len(ACCEPTED_FIELDS) + 1)
        values: dict[str, Any] = {}
        data: bytes | None = None
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key != "image":
                    raise ApiError(422, "invalid_request", f"{key}: only the image field may be a file")
                data = await value.read()
            elif value != "":  # an empty form field means "not given"
                values[key] = value
        req = _validate(values)
        if data is not None and (req.image is not None or req.image_id is not None or req.image_url is not None):
            raise ApiError(422, "invalid_request", "image: give one image (a file, base64 or image_id), not several")
        return req, data
    raise ApiError(415, "unsupported_media_type", "send multipart/form-data (image file + query) or application/json")


def _stream(worker: Worker, image: Image.Image, req: AskRequest, stack: contextlib.ExitStack) -> EventSourceResponse:
    """The SSE response; `stack` holds the request's admission and is closed when the stream ends."""
    stack.enter_context(worker.admit())  # Overloaded here, before the stream starts, is still a 503
    state = worker.engine.new_state(image, req.query, req.options())
    request_id = uuid.uuid4().hex

    async def events() -> AsyncIterator[bytes]:
        try:
            answer: dict[str, Any] | None = None
            async for event in stream_events(worker, state, request_id):
                if event.get("step") == "answer":
                    answer = event  # held back: it goes last, with the full result attached
                    continue
                yield format_sse_event(event=str(event.get("step")), data_str=json.dumps(event))
            final = result(worker.engine, state).model_dump()
            yield format_sse_event(event="answer", data_str=json.dumps({**(answer or {}), "result": final}))
        except Exception:
            log.exception("request %s failed while streaming", request_id)
            body = {"error": {"code": "internal_error", "message": "the request failed; the failure was logged"}}
            yield format_sse_event(event="error", data_str=json.dumps(body))
        finally:
            stack.close()

    response = EventSourceResponse(events(), headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    # A client gone before the first event never runs the generator's `finally`; the background task then frees
    # the place (ExitStack.close is idempotent).
    response.background = BackgroundTask(stack.close)
    return response


@router.post(
    "/ask",
    response_model=AskResult,
    responses={**_ERRORS, 200: {"content": {"text/event-stream": {}}}},
    openapi_extra={
        "requestBody": {
            "content": {
                "application/json": {"schema": AskRequest.model_json_schema()},
                "multipart/form-data": {"schema": {"type": "object", "properties": {"image": {"type": "string",
                                        "format": "binary"}, "query": {"type": "string"}}, "required": ["query"]}},
            }
        }
    },
)  # fmt: skip
async def ask(request: Request, service: Service, worker: ReadyWorker) -> Any:
    """Answer `query` about the image, zooming where the question needs detail."""
    req, data = await _read_request(request)
    pending = await read_source(
        service, image_id=req.image_id, image=req.image, image_url=req.image_url, data=data, scope=tenant_of(request)
    )
    assert service.costs is not None  # set together with the worker, which ReadyWorker guarantees
    cost = service.costs.ask(pending.wh, pending.memory, req.options(), req.query)
    # Admitted before anything is decoded; the cost is held until the answer (or the stream's end).
    stack = contextlib.ExitStack()
    try:
        stack.enter_context(service.budget.admit(cost))
        image = await pending.decode(service.settings.max_pixels_in)
        if "text/event-stream" in request.headers.get("accept", ""):
            return _stream(worker, image, req, stack)
        # A client that hangs up cancels the graph and frees its worker place (the stream does so by itself).
        with stack:
            return await until_disconnected(request, ask_one(worker, image, req.query, req.options()))
    except BaseException:
        stack.close()
        raise
