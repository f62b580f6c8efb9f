"""Dependencies of the routes: the service state, the ready worker, and the optional API key check.

- `get_service(request)`: the `ServiceState` the lifespan put on `app.state.qzoom`.
- `ready_worker`: the started, warmed `Worker`; 503 `not_ready` (with `Retry-After`) while the model loads, and
  503 `not_ready` with the load error if loading failed.
- `require_api_key`: when `QZOOM_API_KEYS` is set, `X-API-Key` must equal one of them (401 `unauthorized`
  otherwise), compared in constant time. Health routes do not use it.
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader

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
    cache: FeatureCache | None = None
    worker: Worker | None = None
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


def api_key_matches(keys: list[str], given: str | None) -> bool:
    """Whether `given` is one of `keys`, compared in constant time against every key (no early exit, so the time
    taken says nothing about which key came close)."""
    provided = (given or "").encode()
    matched = False
    for k in keys:
        matched |= secrets.compare_digest(provided, k.encode())
    return matched


def require_api_key(service: Service, key: Annotated[str | None, Depends(_api_key_header)]) -> None:
    keys = service.settings.api_keys
    if keys and not api_key_matches(keys, key):
        raise ApiError(401, "unauthorized", "a valid X-API-Key header is required", {"WWW-Authenticate": "APIKey"})
