"""Upload once, use many times: `POST /v1/images` and the `zoom` tool over HTTP, `POST /v1/tools/zoom`.

- `POST /v1/images`: multipart `image` file -> `{"image_id", "width", "height"}`. The id is the content digest of
  the decoded pixels (the same image uploaded twice gets the same id); `/ask` and the zoom tool accept it.
  Images are kept in the app's `ImageStore` (LRU-bounded, this process only).
- `POST /v1/tools/zoom`: body = `ZoomArgs` JSON (`image_id` or `image_data`, a `box` in any frame or a `query`)
  -> `ZoomResult` JSON (the crop as base64 PNG and its box in original pixels). `image_path` is refused here; in
  its place the body may carry `image_url` (fetched when `QZOOM_IMAGE_URLS` is on, see `service.urls`).
Errors are the error model: 422 bad arguments (each field named), 404 unknown image id, 413/415 as for /ask,
403/413/422 for refused image URLs.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, Field, ValidationError
from starlette.datastructures import UploadFile

from qzoom.guards import parse_json
from qzoom.tools.schema import ZoomArgs, ZoomResult

from .cancel import until_disconnected
from .deps import ReadyWorker, Service, tenant_of
from .errors import ApiError, ErrorBody, describe_errors
from .sources import MAX_URL_CHARS, json_body_doc, load_source, read_source
from .urls import fetch_image_url

router = APIRouter(prefix="/v1", tags=["tools"])

_ERRORS: dict[int | str, dict[str, Any]] = {s: {"model": ErrorBody} for s in (400, 401, 403, 404, 413, 415, 422, 503)}

# The zoom tool's schema (the one source for MCP, LangChain and OpenAI) plus the service's own image source.
_ZOOM_BODY = ZoomArgs.model_json_schema()
_ZOOM_BODY["properties"]["image_url"] = {
    "anyOf": [{"type": "string", "maxLength": MAX_URL_CHARS}, {"type": "null"}],
    "description": "an http(s) URL the server fetches, instead of image_id / image_data (when QZOOM_IMAGE_URLS is on)",
}
_ZOOM_BODY["required"] = []


class ImageInfo(BaseModel):
    image_id: str = Field(description="content id of the decoded pixels; pass it to /ask and the tools")
    width: int
    height: int


@router.post(
    "/images",
    response_model=ImageInfo,
    responses=_ERRORS,
    openapi_extra={"requestBody": {"content": {"multipart/form-data": {"schema": {
        "type": "object", "properties": {"image": {"type": "string", "format": "binary"}}, "required": ["image"]}}}}},
)  # fmt: skip
async def upload_image(request: Request, service: Service) -> ImageInfo:
    """Store an image and return its id for later `/ask` and zoom calls."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "multipart/form-data":
        raise ApiError(415, "unsupported_media_type", "send multipart/form-data with the image in the `image` field")
    form = await request.form(max_files=1, max_fields=1)
    upload = form.get("image")
    if not isinstance(upload, UploadFile):
        raise ApiError(422, "invalid_request", "image: required, as a file part of the form")
    data = await upload.read()
    image = await load_source(service, data=data, scope=tenant_of(request))
    return ImageInfo(image_id=service.images.put(image), width=image.width, height=image.height)


def _parse_zoom_args(service: Service, raw: dict[str, object]) -> ZoomArgs:
    assert service.runner is not None
    try:
        return service.runner.parse(raw)
    except ValidationError as err:
        raise ApiError(422, "invalid_request", describe_errors(err, list(ZoomArgs.model_fields))) from err


@router.post(
    "/tools/zoom",
    response_model=ZoomResult,
    responses=_ERRORS,
    openapi_extra=json_body_doc(_ZOOM_BODY),
)
async def zoom_tool(request: Request, service: Service, worker: ReadyWorker) -> ZoomResult | Response:
    """Run the `zoom` tool: crop a box (in any frame) or let the SD-RPN choose one for the query."""
    assert service.runner is not None  # set together with the worker, which ReadyWorker guarantees
    raw = parse_json(await request.body())
    if not isinstance(raw, dict):
        raise ApiError(422, "invalid_request", "the body must be a JSON object of zoom arguments")
    url = raw.pop("image_url", None)
    if url is not None and (not isinstance(url, str) or len(url) > MAX_URL_CHARS):
        raise ApiError(
            422, "invalid_request", f"image_url: must be an http(s) URL of at most {MAX_URL_CHARS} characters"
        )
    if url is not None and any(raw.get(k) is not None for k in ("image_id", "image_data", "image_path")):
        raise ApiError(422, "invalid_request", "give exactly one of image_id, image_data or image_url")
    if url is not None:
        # The other arguments first, with the URL standing in for the image: a bad box costs no download.
        _parse_zoom_args(service, {**raw, "image_id": url})
        fetched = await fetch_image_url(url, service.settings)
        image = await load_source(service, data=fetched, scope=tenant_of(request))
        raw["image_id"] = service.images.put(image)
    args = _parse_zoom_args(service, raw)
    data = args.image_bytes()
    if data is not None:
        # Decoded here, under the service's pixel limit, instead of by the runner (which has no limit).
        image = await load_source(service, data=data, scope=tenant_of(request))
        args = args.model_copy(update={"image_data": None, "image_id": service.images.put(image)})
    elif args.image_id is not None:
        await read_source(service, image_id=args.image_id, scope=tenant_of(request))  # another tenant's id: 404
    try:
        return await until_disconnected(request, service.runner.zoom(args))
    except ValueError as err:  # e.g. no box and a checkpoint without a region proposer
        raise ApiError(422, "invalid_request", str(err)) from err
