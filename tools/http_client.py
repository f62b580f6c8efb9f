"""A client for a running qzoom service: the `zoom` tool over HTTP, for agents that run without torch.

    async with QZoomClient("http://gpu-box:8000", api_key="...") as client:
        image_id = await client.upload(png_bytes)
        result = await client.zoom(client.parse({"image_id": image_id, "query": "What is on the sign?"}))

`QZoomClient` has the same `parse` / `zoom` pair as the in-process `ZoomToolRunner`, so `make_zoom_tool` takes
either. Requests go to `POST /v1/images` and `POST /v1/tools/zoom`; a service error comes back as `QZoomHTTPError`
carrying the service's error code and message (which name what was wrong and what is accepted). `transport=` takes
any httpx transport: `httpx.ASGITransport(app)` runs against an app in the same process, as the tests do. Local
file paths are never sent: the service cannot read this machine's files, so `image_path` is refused by `parse`.

A 503 (the worker's queue is full, or the model is still loading) is retried with tenacity: up to ``retries``
more attempts, each after the service's ``Retry-After`` seconds (capped at ``max_wait_s``; 1 s when the header is
absent). Other errors are raised at once: they will not change on retry.
"""

from __future__ import annotations

from typing import Any

import httpx
from tenacity import AsyncRetrying, RetryCallState, retry_if_result, stop_after_attempt

from .schema import ZoomArgs, ZoomResult

__all__ = ["QZoomClient", "QZoomHTTPError"]


class QZoomHTTPError(RuntimeError):
    """The service answered with an error: `status` (HTTP), `code` (stable, machine-readable) and its message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


def _retry_after_s(state: RetryCallState, max_wait_s: float) -> float:
    """The wait the service asked for in its last 503 (whole seconds, RFC 9110), within [0, max_wait_s]."""
    response = state.outcome.result() if state.outcome is not None and not state.outcome.failed else None
    header = response.headers.get("retry-after", "") if isinstance(response, httpx.Response) else ""
    try:
        wait = float(header)
    except ValueError:
        wait = 1.0  # absent, or an HTTP date: a second is the service's own default
    return min(max(wait, 0.0), max_wait_s)


class QZoomClient:
    """Talks to `qzoom serve`; see the module docstring."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout_s: float = 120.0,
        retries: int = 3,
        max_wait_s: float = 30.0,
    ) -> None:
        headers = {"X-API-Key": api_key} if api_key else {}
        self._http = httpx.AsyncClient(base_url=base_url, headers=headers, transport=transport, timeout=timeout_s)
        self.retries = retries
        self.max_wait_s = max_wait_s

    async def _post(self, path: str, **kwargs: Any) -> httpx.Response:
        """POST, retrying a 503 after its Retry-After; the last response is returned whatever its status."""
        retrying = AsyncRetrying(
            retry=retry_if_result(lambda r: r.status_code == 503),
            wait=lambda state: _retry_after_s(state, self.max_wait_s),
            stop=stop_after_attempt(self.retries + 1),
            retry_error_callback=lambda state: state.outcome.result() if state.outcome is not None else None,
            reraise=True,
        )
        response: httpx.Response = await retrying(self._http.post, path, **kwargs)
        return response

    async def __aenter__(self) -> QZoomClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    def parse(self, arguments: dict[str, Any]) -> ZoomArgs:
        """Validate tool arguments as the service will (without local paths: it cannot read them)."""
        return ZoomArgs.model_validate(arguments, context={"allow_image_path": False})

    async def upload(self, image: bytes, filename: str = "image.png") -> str:
        """Upload encoded image bytes once; returns the `image_id` later calls can use instead of the bytes."""
        response = await self._post("/v1/images", files={"image": (filename, image)})
        return str(self._json(response)["image_id"])

    async def zoom(self, args: ZoomArgs) -> ZoomResult:
        response = await self._post("/v1/tools/zoom", json=args.model_dump(mode="json", exclude_none=True))
        return ZoomResult.model_validate(self._json(response))

    @staticmethod
    def _json(response: httpx.Response) -> dict[str, Any]:
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.is_success and isinstance(body, dict):
            return body
        error = body.get("error", {}) if isinstance(body, dict) else {}
        raise QZoomHTTPError(
            response.status_code,
            str(error.get("code", "http_error")),
            str(error.get("message", response.text[:300] or response.reason_phrase)),
        )
