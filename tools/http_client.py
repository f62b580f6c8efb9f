"""A client for a running qzoom service: the `zoom` tool over HTTP, for agents that run without torch.

    async with QZoomClient("http://gpu-box:8000", api_key="...") as client:
        image_id = await client.upload(png_bytes)
        result = await client.zoom(client.parse({"image_id": image_id, "query": "What is on the sign?"}))

`QZoomClient` has the same `parse` / `zoom` pair as the in-process `ZoomToolRunner`, so `make_zoom_tool` takes
either. Requests go to `POST /v1/images` and `POST /v1/tools/zoom`; a service error comes back as `QZoomHTTPError`
carrying the service's error code and message (which name what was wrong and what is accepted). `transport=` takes
any httpx transport: `httpx.ASGITransport(app)` runs against an app in the same process, as the tests do. Local
file paths are never sent: the service cannot read this machine's files, so `image_path` is refused by `parse`.
"""

from __future__ import annotations

from typing import Any

import httpx

from .schema import ZoomArgs, ZoomResult

__all__ = ["QZoomClient", "QZoomHTTPError"]


class QZoomHTTPError(RuntimeError):
    """The service answered with an error: `status` (HTTP), `code` (stable, machine-readable) and its message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class QZoomClient:
    """Talks to `qzoom serve`; see the module docstring."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout_s: float = 120.0,
    ) -> None:
        headers = {"X-API-Key": api_key} if api_key else {}
        self._http = httpx.AsyncClient(base_url=base_url, headers=headers, transport=transport, timeout=timeout_s)

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
        response = await self._http.post("/v1/images", files={"image": (filename, image)})
        return str(self._json(response)["image_id"])

    async def zoom(self, args: ZoomArgs) -> ZoomResult:
        response = await self._http.post("/v1/tools/zoom", json=args.model_dump(mode="json", exclude_none=True))
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
