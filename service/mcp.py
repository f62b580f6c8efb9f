"""The MCP server mounted at `/mcp/` (streamable HTTP): the `zoom`, `gate` and `propose` tools of `qzoom mcp`, run
by the service's worker and image store (uploaded `image_id`s work; local paths do not).

* JSON responses: each call is answered by one `application/json` body, not an SSE stream. MCP clients cap one SSE
  event (the 2.x SDK client at 1 MiB), and a whole-image crop is several MiB of base64; a JSON body has no such
  cap, and every streamable-HTTP client accepts it (the transport allows both). The tools send no progress events,
  so nothing is lost.
* Request size: the service's body limit (`QZOOM_MAX_BODY_MB`, 32 MB by default; the JSON 413 `body_too_large`
  of `BodyLimitMiddleware`) applies here as on REST; the SDK's own limit (4 MiB by default) is raised to the same
  figure so that it is never the one that answers.
* The images pass the same input guards as REST (formats, pixel cap), inside `ZoomToolRunner`.
* DNS-rebinding protection is on: requests must name an allowed host (`QZOOM_MCP_ALLOWED_HOSTS`, default the
  loopback names; add the server's public name behind a proxy) and, from browsers, an allowed origin.
* With `QZOOM_API_KEYS` set, `X-API-Key` is checked by `deps.check_api_key`, the same rule (and the same 401 body)
  as the routes' `require_api_key` dependency; health stays open.
"""

from __future__ import annotations

import json

from fastapi import FastAPI
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecuritySettings
from starlette.types import ASGIApp, Receive, Scope, Send

from qzoom.agent.tool import ZoomToolRunner
from qzoom.cache import MiB
from qzoom.settings import Settings
from qzoom.tools.mcp_server import ToolFailure, build_mcp_server

from .deps import ServiceState, check_api_key
from .errors import ApiError


class _RequireAPIKey:
    """The API-key check in front of the mounted MCP app.

    Kept as ASGI rather than a FastAPI dependency: a mounted ASGI app takes no dependencies, and a route wrapping
    the session manager would have to hand it Starlette's private send channel. The rule and the error are
    `check_api_key`'s, the routes' own."""

    def __init__(self, inner: ASGIApp, keys: list[str]) -> None:
        self.inner = inner
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.keys:
            try:
                check_api_key(self.keys, scope.get("headers", []))  # the same rule as every route (deps)
            except ApiError as err:
                body = json.dumps({"error": {"code": err.code, "message": err.message}}).encode()
                headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
                headers += [(k.lower().encode(), v.encode()) for k, v in (err.headers or {}).items()]
                await send({"type": "http.response.start", "status": err.status, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
        await self.inner(scope, receive, send)


def mount_mcp(app: FastAPI, settings: Settings) -> StreamableHTTPSessionManager:
    """Mount the MCP server at /mcp/; the caller enters the returned manager's `run()` in the app's lifespan (a
    mounted app's own lifespan never runs)."""

    def runner_factory() -> ZoomToolRunner:
        state: ServiceState = app.state.qzoom
        if not state.ready or state.runner is None:
            raise ToolFailure("the model is still loading; retry in a few seconds")
        return state.runner

    server = build_mcp_server(runner_factory)
    security = TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=list(settings.mcp_allowed_hosts),
        allowed_origins=list(settings.mcp_allowed_origins),
    )
    manager = StreamableHTTPSessionManager(
        app=server,
        json_response=True,
        security_settings=security,
        # The service's BodyLimitMiddleware answers over-limit bodies first, with the error model's 413.
        max_request_body_size=int(settings.max_body_mb * MiB) + 1,
    )
    app.mount("/mcp", _RequireAPIKey(manager.handle_request, list(settings.api_keys)))
    return manager
