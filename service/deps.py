"""Dependencies of the routes: the service state, the ready worker, and the optional API key check.

- `get_service(request)`: the `ServiceState` the lifespan put on `app.state.qzoom`.
- `ready_worker`: the started, warmed `Worker`; 503 `not_ready` (with `Retry-After`) while the model loads, and
  503 `not_ready` with the load error if loading failed.
- `require_api_key`: when `QZOOM_API_KEYS` is set, `X-API-Key` must equal one of them (401 `unauthorized`
  otherwise), compared in constant time. The one rule for duplicates, here and on `/mcp` (`presented_key`): a
  request carrying the header more than once is refused (401), never read first- or last-wins. Health routes do not
  use it; `/metrics` does when `QZOOM_PROTECT_METRICS` is on (`require_metrics_key`).
- `tenant_of(request)`: with `QZOOM_TENANT_SCOPE` (and keys), the scope of the request's key (a hash of it, never
  the key itself), which marks its images so that cache entries and image ids stay per key; else None.
- `require_bearer_or_api_key`: the same keys, also as `Authorization: Bearer <key>` (what OpenAI clients send);
  for the OpenAI-compatible routes.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from qzoom.admission import Budget, CostModel
from qzoom.agent.thinking import Policy
from qzoom.agent.tool import ImageStore, ZoomToolRunner
from qzoom.cache import FeatureCache
from qzoom.settings import Settings
from qzoom.worker import Worker

from .errors import ApiError, retry_after


@dataclass
class ServiceState:
    """What the lifespan builds; `worker` and `runner` are set once the model is loaded and warmed."""

    settings: Settings
    images: ImageStore
    budget: Budget  # what every request in flight may use together (qzoom.admission)
    cache: FeatureCache | None = None
    worker: Worker | None = None
    costs: CostModel | None = None  # set with the worker: prices requests with the checkpoint's budgets
    runner: ZoomToolRunner | None = None
    ready: bool = False
    load_error: str | None = None
    # A scripted policy writing the assistant turns of /v1/think instead of the model (agent.thinking's seam).
    think_policy: Policy | None = None
    loader: asyncio.Task[None] | None = field(default=None, repr=False)


def get_service(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.qzoom
    return state


Service = Annotated[ServiceState, Depends(get_service)]


def ready_worker(service: Service) -> Worker:
    if service.load_error is not None:
        raise ApiError(503, "not_ready", f"the model failed to load: {service.load_error}")
    if not service.ready or service.worker is None:
        raise ApiError(
            503, "not_ready", "the model is still loading; retry shortly", retry_after(service.settings.retry_after_s)
        )
    return service.worker


ReadyWorker = Annotated[Worker, Depends(ready_worker)]

_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False)
_bearer_header = HTTPBearer(auto_error=False)  # declares the Bearer scheme in OpenAPI; the key is read raw


def api_key_matches(keys: list[str], given: str | None) -> bool:
    """Whether `given` is one of `keys`, compared in constant time against every key (no early exit, so the time
    taken says nothing about which key came close)."""
    provided = (given or "").encode()
    matched = False
    for k in keys:
        matched |= secrets.compare_digest(provided, k.encode())
    return matched


class DuplicateApiKey(ValueError):
    """The request carries X-API-Key more than once."""


def presented_key(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The X-API-Key value of raw ASGI headers; `DuplicateApiKey` when there are several (the rule everywhere)."""
    values = [v for k, v in headers if k.lower() == b"x-api-key"]
    if len(values) > 1:
        raise DuplicateApiKey("send one X-API-Key header, not several")
    return values[0].decode("latin-1") if values else None


def tenant_scope(key: str) -> str:
    """The scope of an API key: a hash, so that neither logs nor image info ever hold the key."""
    return hashlib.blake2b(f"qzoom-tenant-v1\0{key}".encode(), digest_size=16).hexdigest()


def check_api_key(keys: list[str], headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The valid key presented in `headers` (None when no keys are configured), else `ApiError` 401."""
    if not keys:
        return None
    unauthorized = {"WWW-Authenticate": "APIKey"}
    try:
        given = presented_key(headers)
    except DuplicateApiKey as err:
        raise ApiError(401, "unauthorized", str(err), unauthorized) from None
    if given is None or not api_key_matches(keys, given):
        raise ApiError(401, "unauthorized", "a valid X-API-Key header is required", unauthorized)
    return given


def require_api_key(
    request: Request, service: Service, _documented: Annotated[str | None, Depends(_api_key_header)]
) -> None:
    # The header is read from the raw list (`_documented` only declares it in OpenAPI): duplicates must be seen.
    given = check_api_key(service.settings.api_keys, request.scope["headers"])
    if given is not None and service.settings.tenant_scope:
        request.state.tenant = tenant_scope(given)


def require_metrics_key(
    request: Request, service: Service, _documented: Annotated[str | None, Depends(_api_key_header)]
) -> None:
    if service.settings.protect_metrics:
        check_api_key(service.settings.api_keys, request.scope["headers"])


def tenant_of(request: Request) -> str | None:
    """The request's tenant scope (see the module docstring), or None when scoping is off."""
    scope: str | None = getattr(request.state, "tenant", None)
    return scope


def require_bearer_or_api_key(
    request: Request,
    service: Service,
    _documented: Annotated[str | None, Depends(_api_key_header)],
    _bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer_header)],
) -> None:
    """`require_api_key`, where the key may also come as `Authorization: Bearer <key>` (OpenAI clients send it so):
    the same keys, the same duplicate rule, the same tenant scope."""
    headers: list[tuple[bytes, bytes]] = list(request.scope["headers"])
    auth = [v for k, v in headers if k.lower() == b"authorization"]
    if len(auth) > 1:
        raise ApiError(
            401, "unauthorized", "send one Authorization header, not several", {"WWW-Authenticate": "Bearer"}
        )
    scheme, _, token = auth[0].decode("latin-1").partition(" ") if auth else ("", "", "")
    if scheme.lower() == "bearer" and not any(k.lower() == b"x-api-key" for k, _ in headers):
        headers.append((b"x-api-key", token.strip().encode("latin-1")))
    try:
        given = check_api_key(service.settings.api_keys, headers)
    except ApiError as err:
        message = f"{err.message}; OpenAI clients send the key as Authorization: Bearer <key>"
        raise ApiError(401, "unauthorized", message, {"WWW-Authenticate": "Bearer"}) from None
    if given is not None and service.settings.tenant_scope:
        request.state.tenant = tenant_scope(given)
