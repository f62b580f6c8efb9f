"""One error model for every non-2xx answer, and the exception handlers that produce it.

Every error body is `{"error": {"code": "<stable machine code>", "message": "<human text>"}}` (DESIGN.md
"Interfaces"). Mapping: bad fields 400/422 (`invalid_request`, naming each field and what it accepts), body or
pixels too large 413 (`body_too_large`, `image_too_large`), not an image 415 (`unsupported_image`), every
`qzoom.guards.InputError` with its own status and code (400 `invalid_json` included), unknown image id
404 (`unknown_image`), overloaded 503 (`overloaded`, with `Retry-After`), not ready 503 (`not_ready`), image URL
refusals 403/413/422 (`service.urls`), a step the checkpoint lacks 422 (`not_supported`). A client that hangs up
mid-body gets an unread 499. Request content never reaches the catch-all: a 500 (`internal_error`) means a bug in
this code, and it is logged.
"""

from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from qzoom.agent.tool import UnknownImage
from qzoom.guards import InputError
from qzoom.schemas import PromptTextError
from qzoom.worker import Overloaded

log = logging.getLogger(__name__)

# Codes for statuses that Starlette raises itself (unknown route, wrong method, malformed multipart, ...).
_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
}


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    """The body of every error response (used in the OpenAPI `responses`)."""

    error: ErrorDetail


class ApiError(Exception):
    """An error a client caused (or 503): rendered as the error model with `status`."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorBody(error=ErrorDetail(code=code, message=message))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def retry_after(seconds: float) -> dict[str, str]:
    # Retry-After takes whole seconds; never advertise 0, which invites an immediate retry storm.
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


def describe_errors(err: ValidationError | RequestValidationError, accepted: list[str] | None = None) -> str:
    """One `field: problem` clause per error; unknown and missing fields list the accepted ones."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if p != "body") or "request"
        msg = str(e["msg"]).removeprefix("Value error, ")
        if accepted and e["type"] in ("extra_forbidden", "missing"):
            what = "unknown field" if e["type"] == "extra_forbidden" else "required field is missing"
            msg = f"{what}; accepted fields: {', '.join(accepted)}"
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers that turn every known failure into the error model."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _request_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, "invalid_request", describe_errors(exc))

    @app.exception_handler(ValidationError)
    async def _validation(request: Request, exc: ValidationError) -> JSONResponse:
        return error_response(422, "invalid_request", describe_errors(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(exc.status_code, f"http_{exc.status_code}")
        return error_response(exc.status_code, code, str(exc.detail), dict(exc.headers or {}))

    @app.exception_handler(Overloaded)
    async def _overloaded(request: Request, exc: Overloaded) -> JSONResponse:
        return error_response(503, "overloaded", str(exc), retry_after(exc.retry_after_s))

    @app.exception_handler(InputError)
    async def _input(request: Request, exc: InputError) -> JSONResponse:
        # The guards of qzoom.guards carry their own status and code (one mapping for every entry point).
        return error_response(exc.status, exc.code, str(exc))

    @app.exception_handler(PromptTextError)
    async def _prompt_text(request: Request, exc: PromptTextError) -> JSONResponse:
        return error_response(422, "invalid_request", str(exc))

    @app.exception_handler(UnknownImage)
    async def _unknown_image(request: Request, exc: UnknownImage) -> JSONResponse:
        return error_response(404, "unknown_image", str(exc.args[0]) if exc.args else "unknown image_id")

    @app.exception_handler(ClientDisconnect)
    async def _client_gone(request: Request, exc: ClientDisconnect) -> Response:
        # The client hung up while its body was being read: nobody is left to answer (nginx's 499).
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        # Only genuine bugs land here: every failure a request's content can cause is mapped above.
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", "internal server error; the failure was logged")
