"""Where a request's image comes from, and turning it into a decoded RGB image under the service's limits.

`ImageSourceFields` is the JSON part every image-taking endpoint shares: exactly one of `image_id` (from
`POST /v1/images`), `image` (base64 or a `data:image/...;base64,` URL) or `image_url` (fetched by the server when
`QZOOM_IMAGE_URLS` is on; see `service.urls`). `read_source(service, ...)` resolves one of them (or raw uploaded
bytes) into a `PendingImage` whose header has passed the guards and nothing is decoded yet, so that admission
(`qzoom.admission`) can price the request first; `PendingImage.decode` then decodes in the thread pool, off the event
loop. `load_source` does both for routes without model work, holding the image-memory budget while it decodes.
Errors: 404 `unknown_image` for an id this process has not seen, 422 `invalid_request` for bad base64, the URL
refusals of `service.urls`, the 413/415 of `qzoom.guards`, 413/422/503 from admission.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Self, TypeVar

from fastapi import Request
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.concurrency import run_in_threadpool

from qzoom.admission import Cost, MiB
from qzoom.agent.tool import UnknownImage
from qzoom.cache import SCOPE_INFO, set_scope
from qzoom.guards import ImageHeader, ImageTooLarge, parse_json, probe_image
from qzoom.images import load_image
from qzoom.tools.schema import decode_image_data

from .deps import ServiceState
from .errors import ApiError, describe_errors
from .urls import fetch_image_url

M = TypeVar("M", bound=BaseModel)

MAX_URL_CHARS = 2048


class ImageSourceFields(BaseModel):
    """Exactly one image source."""

    model_config = ConfigDict(extra="forbid")

    image_id: str | None = Field(None, max_length=256, description="id returned by POST /v1/images")
    image: str | None = Field(None, description="the image as base64 or a data URL 'data:image/png;base64,...'")
    image_url: str | None = Field(
        None,
        max_length=MAX_URL_CHARS,
        description="an http(s) URL the server fetches; only when QZOOM_IMAGE_URLS is on, from QZOOM_IMAGE_URL_HOSTS",
    )

    @model_validator(mode="after")
    def _one_source(self) -> Self:
        given = [n for n in ("image_id", "image", "image_url") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of image_id, image (base64 or data URL) or image_url; got {given or 'none'}"
            )
        return self


@dataclass
class PendingImage:
    """An image source read but not decoded: either an image already decoded (an `image_id`) or encoded bytes whose
    header has passed the guards (format, pixel cap). Admission prices it before `decode` runs."""

    image: Image.Image | None = None
    data: bytes | None = None
    header: ImageHeader | None = None
    scope: str | None = None  # the tenant the decoded image is marked with (qzoom.cache.set_scope)

    @property
    def wh(self) -> tuple[int, int]:
        if self.image is not None:
            return self.image.size
        assert self.header is not None
        return self.header.width, self.header.height

    @property
    def memory(self) -> int:
        """Bytes decoding will allocate (nothing for an image already decoded)."""
        return 0 if self.header is None else self.header.decode_bytes

    async def decode(self, max_pixels: int) -> Image.Image:
        if self.image is None:
            assert self.data is not None
            # Decoding a large image holds the CPU for a while: keep it off the event loop.
            self.image = set_scope(await run_in_threadpool(load_image, self.data, max_pixels), self.scope)
            self.data = None
        return self.image


async def read_source(
    service: ServiceState,
    *,
    image_id: str | None = None,
    image: str | None = None,
    image_url: str | None = None,
    data: bytes | None = None,
    scope: str | None = None,
) -> PendingImage:
    """The image from whichever source is given (callers have checked that exactly one is), header-checked only.
    `scope` is the request's tenant (`deps.tenant_of`): an `image_id` uploaded under another scope is unknown here."""
    if image_id is not None:
        stored = service.images.get(image_id)
        if stored.info.get(SCOPE_INFO) != scope:
            raise UnknownImage(f"unknown image_id {image_id!r}: upload the image first, or send it as image_data")
        return PendingImage(image=stored, scope=scope)
    if image is not None:
        try:
            data = decode_image_data(image)
        except ValueError as err:
            raise ApiError(422, "invalid_request", f"image: {err}") from err
    elif image_url is not None:
        data = await fetch_image_url(image_url, service.settings)
    if data is None:
        raise ApiError(422, "invalid_request", "image: required (a file, base64 / data URL, image_id or image_url)")
    return PendingImage(data=data, header=probe_image(data, service.settings.max_pixels_in), scope=scope)


async def load_source(
    service: ServiceState,
    *,
    image_id: str | None = None,
    image: str | None = None,
    image_url: str | None = None,
    data: bytes | None = None,
    scope: str | None = None,
) -> Image.Image:
    """The decoded RGB image, decoded under the image-memory budget for the time of the decode (uploads; routes
    that run the model hold their whole cost with `admitted` instead)."""
    pending = await read_source(service, image_id=image_id, image=image, image_url=image_url, data=data, scope=scope)
    with service.budget.admit(image_cost(service, pending.memory)):
        return await pending.decode(service.settings.max_pixels_in)


def image_cost(service: ServiceState, memory: int) -> Cost:
    """Decoding an image and no model work, under the per-request memory cap."""
    if service.costs is not None:
        return service.costs.image_only(memory)
    cap = int(service.settings.budget_decode_mb * MiB)
    if memory > cap:
        raise ImageTooLarge(
            f"decoding the image needs {memory // MiB} MiB, more than the server's whole image budget of "
            f"{cap // MiB} MiB (QZOOM_BUDGET_DECODE_MB); send a smaller image"
        )
    return Cost(0, memory)


async def read_json(request: Request, model: type[M]) -> M:
    """The JSON body validated as `model`: 415 for another content type, 400 `invalid_json`, 422 naming each bad
    field (and, for unknown or missing ones, the accepted fields)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise ApiError(415, "unsupported_media_type", "send the arguments as a JSON object (application/json)")
    raw: Any = parse_json(await request.body())
    if not isinstance(raw, dict):
        raise ApiError(422, "invalid_request", f"the body must be a JSON object with the fields of {model.__name__}")
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        raise ApiError(422, "invalid_request", describe_errors(err, list(model.model_fields))) from err


def inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` with every local `#/$defs/...` reference replaced by its definition and `$defs` dropped: a pydantic
    schema made self-contained, to sit inside an OpenAPI document (models here are not recursive)."""
    defs = schema.get("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                merged = {**walk(defs[ref.removeprefix("#/$defs/")]), **{k: v for k, v in node.items() if k != "$ref"}}
                return walk(merged)
            return {k: walk(v) for k, v in node.items() if k != "$defs"}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    inlined: dict[str, Any] = walk(schema)
    return inlined


def json_body_doc(model: type[BaseModel] | dict[str, Any]) -> dict[str, Any]:
    """`openapi_extra` documenting a model (or a schema) as the route's JSON request body, for routes that read the
    body themselves."""
    schema = inline_refs(model if isinstance(model, dict) else model.model_json_schema())
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}
