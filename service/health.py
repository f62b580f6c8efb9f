"""Liveness and readiness, always open (no API key).

- `GET /healthz`: 200 `{"status": "ok"}` whenever the process answers; nothing else is checked.
- `GET /readyz`: 200 `{"status": "ready", "model": name}` once the model is loaded and warmed; before that 503
  `not_ready` (the error model, with `Retry-After`), and 503 with the load error when loading failed.
"""

from __future__ import annotations

from fastapi import APIRouter

from .deps import ReadyWorker
from .errors import ErrorBody

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"model": ErrorBody}})
async def readyz(worker: ReadyWorker) -> dict[str, str]:
    return {"status": "ready", "model": worker.engine.name}
