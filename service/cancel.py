"""Stopping a request's model work when its client goes away.

`until_disconnected(request, work)` runs the coroutine `work` as a task beside a watcher of the ASGI receive channel.
If the client disconnects first, the task is cancelled: a graph step still queued for the device is dropped by the
worker, later steps never run, and the request's worker place (`Worker.admit`) is released at once; the route then
answers `CLIENT_GONE` (499, nginx's "client closed request"), which nobody reads. Otherwise the work's result (or
exception) is returned as usual.

The watcher may read `receive()` only after the route has consumed the whole body (every route here reads it
before starting work): from then on the server delivers nothing but `http.disconnect`, sent when the connection
drops (uvicorn) or once the response is complete (test clients), so no message meant for the route is lost.

Streaming responses need no watcher: Starlette's `StreamingResponse` cancels the generator on disconnect itself.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any, TypeVar

from fastapi import Request, Response

T = TypeVar("T")

CLIENT_GONE = 499


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def until_disconnected(request: Request, work: Coroutine[Any, Any, T]) -> T | Response:
    """`await work`, unless the client disconnects first: then cancel it and return an unread 499 response."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            # Only the client is gone (or this route was cancelled): stop the work and wait until it has let go of
            # its worker place.
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    if task.cancelled():
        return Response(status_code=CLIENT_GONE)
    return task.result()
