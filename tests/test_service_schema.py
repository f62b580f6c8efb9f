"""schemathesis against the service's own OpenAPI schema, in process (ASGI): whatever the generated requests hold,
no route answers 5xx. The app runs on the tiny model and is warmed before fuzzing, so a 503 would be a real fault
(nothing else is in flight to overload the worker). Examples per operation are few and derandomized: the run is
reproducible and takes seconds on 2 cores."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.python import asgi

from conftest import make_tiny_model
from qzoom.service.app import create_app
from test_service import factory_for
from test_service import settings as app_settings

pytestmark = pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")


class OneLifespan:
    """The app, with its lifespan run once for the module: schemathesis ends an ASGI app's lifespan after every test
    item (one per operation), but the service loads its model once and its MCP session manager cannot restart."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stop: asyncio.Event | None = None
        self.task: asyncio.Task[None] | None = None

    async def _hold(self, started: asyncio.Event) -> None:
        assert self.stop is not None
        async with self.app.router.lifespan_context(self.app):
            started.set()
            await self.stop.wait()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        if self.task is None:  # on schemathesis's event loop, where every request of the run is served
            self.loop, self.stop, started = asyncio.get_running_loop(), asyncio.Event(), asyncio.Event()
            self.task = asyncio.create_task(self._hold(started))
            waiter = asyncio.ensure_future(started.wait())
            await asyncio.wait({self.task, waiter}, return_when=asyncio.FIRST_COMPLETED)
            if self.task.done():
                self.task.result()  # the app failed to start: raise its error
        await receive()
        await send({"type": "lifespan.startup.complete"})
        await receive()
        await send({"type": "lifespan.shutdown.complete"})

    async def _close(self) -> None:
        assert self.stop is not None and self.task is not None
        self.stop.set()
        await self.task

    def close(self) -> None:
        if self.loop is not None:
            asyncio.run_coroutine_threadsafe(self._close(), self.loop).result(60)


def _factory(s: Any, cache: Any) -> Any:
    # Built when the lifespan starts, not when this module is collected.
    return factory_for(make_tiny_model())(s, cache)


APP = create_app(_factory, app_settings(max_body_mb=1, max_pixels_in=2_000_000))
SERVED = OneLifespan(APP)
# schemathesis's pytest plugin parametrizes at collection: the schema comes from the app itself, no server needed.
schema = schemathesis.openapi.from_dict(APP.openapi())
schema.app = SERVED


@pytest.fixture(scope="module", autouse=True)
def ready_app():
    deadline = time.monotonic() + 120
    with asgi.get_client(SERVED) as client:
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "the app never became ready"
            time.sleep(0.05)
    yield
    SERVED.close()


@schema.parametrize()
@settings(max_examples=8, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
def test_no_route_answers_5xx(case):
    case.call_and_validate(checks=[not_a_server_error])
