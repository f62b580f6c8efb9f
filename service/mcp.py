"""The MCP server mounted at `/mcp/` (streamable HTTP): the `zoom`, `gate` and `propose` tools of `qzoom mcp`, run
by the service's worker and image store (uploaded `image_id`s work; local paths do not).

DNS-rebinding protection is on: requests must name an allowed host (`QZOOM_MCP_ALLOWED_HOSTS`, default the loopback
names; add the server's public name behind a proxy) and, from browsers, an allowed origin. With `QZOOM_API_KEYS`
set, the mounted app asks for `X-API-Key` like every other route; health stays open.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI
from mcp.server import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.transport_security import TransportSecuritySettings
from starlette.types import ASGIApp, Receive, Scope, Send

from qzoom.agent.tool import ZoomToolRunner
from qzoom.settings import Settings
from qzoom.tools.mcp_server import build_mcp_server

from .deps import ServiceState, check_api_key
from .errors import ApiError


class _RequireAPIKey:
    """ASGI wrapper: the mounted MCP app answers only requests with a valid `X-API-Key` (when keys are set)."""

    def __init__(self, inner: ASGIApp, keys: list[str]) -> None:
        self.inner = inner
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.keys:
            try:
                check_api_key(self.keys, scope.get("headers", []))  # the same rule as every route (deps)
            except ApiError as err:
                body = json.dumps({"error": {"code": err.code, "message": err.message}})
                await send({"type": "http.response.start", "status": 401, "headers": [
                    (b"content-type", b"application/json"), (b"www-authenticate", b"APIKey")]})  # fmt: skip
                await send({"type": "http.response.body", "body": body.encode()})
                return
        await self.inner(scope, receive, send)


def mount_mcp(app: FastAPI, settings: Settings) -> MCPServer[Any]:
    """Mount the MCP server at /mcp/; the caller enters `server.session_manager.run()` in the app's lifespan."""

    def runner_factory() -> ZoomToolRunner:
        state: ServiceState = app.state.qzoom
        if not state.ready or state.runner is None:
            raise ToolError("the model is still loading; retry in a few seconds")
        return state.runner

    server = build_mcp_server(runner_factory)
    security = TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=list(settings.mcp_allowed_hosts),
        allowed_origins=list(settings.mcp_allowed_origins),
    )
    asgi = server.streamable_http_app(streamable_http_path="/", transport_security=security)
    app.mount("/mcp", _RequireAPIKey(asgi, list(settings.api_keys)))
    return server
