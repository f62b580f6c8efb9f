"""The FastAPI application: `create_app(engine_factory=None, settings=None) -> FastAPI`.

Lifespan: the server starts answering at once (`/healthz` 200, `/readyz` 503) while a background task builds the
FeatureCache (`QZOOM_REDIS_URL`), the engine (`settings.model_dir()`: QZOOM_MODEL, else the shipped qzoom-tiny;
or `engine_factory(settings, cache)` in tests), starts one `Worker` on its device thread (or takes the one
`worker_factory(settings, cache)` returns: the seam where `service.ray_serve` plugs in its Ray Serve worker) and runs
one tiny warm-up request; only then does `/readyz` turn 200 and `/ask` accept work. A load failure (a missing model
included) is logged and reported by `/readyz` (503 with the error). Shutdown stops the worker and closes the cache.

Process-wide effects (one app per process is the deployment): Pillow's `Image.MAX_IMAGE_PIXELS` is set to
`QZOOM_MAX_PIXELS_IN` and `DecompressionBombWarning` becomes an error, both restored at shutdown.

Run one process per device: `qzoom serve` (uvicorn, `workers=1`). Never `--workers N` with N > 1.
"""

from __future__ import annotations

import asyncio
import logging
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi_offline import FastAPIOffline
from PIL import Image
from starlette.concurrency import run_in_threadpool

from qzoom.admission import Budget, CostModel
from qzoom.agent.tool import ImageStore, ZoomToolRunner
from qzoom.agent.zoom import ask_one
from qzoom.cache import FeatureCache, MiB
from qzoom.engine import QZoomEngine
from qzoom.schemas import AskOptions
from qzoom.settings import Settings, get_settings
from qzoom.worker import Worker

from . import ask, chat, health, images, metrics, page, think, tools
from .deps import ServiceState, require_api_key, require_bearer_or_api_key, require_metrics_key
from .errors import install_error_handlers
from .mcp import mount_mcp
from .middleware import BodyLimitMiddleware

log = logging.getLogger(__name__)

EngineFactory = Callable[[Settings, FeatureCache], QZoomEngine]
# A started worker whose steps run elsewhere (the Ray Serve backend); the engine factory is then unused.
WorkerFactory = Callable[[Settings, FeatureCache], Awaitable[Worker]]


def default_engine_factory(settings: Settings, cache: FeatureCache) -> QZoomEngine:
    """The checkpoint `settings.model_dir()` (QZOOM_MODEL, else the shipped qzoom-tiny) on its device and dtype."""
    return QZoomEngine.from_pretrained(
        settings.model_dir(), device=settings.torch_device(), dtype=settings.torch_dtype(), cache=cache
    )


async def _local_worker(s: Settings, cache: FeatureCache, factory: EngineFactory) -> Worker:
    # Loading weights takes seconds to minutes: off the event loop, so health checks keep answering.
    engine = await run_in_threadpool(factory, s, cache)
    worker = Worker(
        engine, max_pending=s.max_pending, max_batch=s.max_batch,
        batch_window_ms=s.batch_window_ms, retry_after_s=s.retry_after_s,
    )  # fmt: skip
    await worker.start()
    return worker


async def _load(state: ServiceState, factory: EngineFactory, worker_factory: WorkerFactory | None) -> None:
    """Build cache, engine and worker, warm up, then mark ready (runs as a task beside the server)."""
    s = state.settings
    try:
        secret = s.cache_key()
        if s.redis_url and secret is None:
            log.warning(
                "QZOOM_CACHE_SECRET is not set: Redis values are signed with a key of this process only, so other "
                "replicas will not reuse them; set the same secret on every replica to share the L2 cache"
            )
        state.cache = FeatureCache.from_url(
            s.redis_url, s.cache_l1_mb * MiB, s.cache_ttl_s, s.cache_max_value_mb * MiB, secret=secret
        )
        if worker_factory is not None:
            worker = await worker_factory(s, state.cache)
        else:
            worker = await _local_worker(s, state.cache, factory)
        engine = worker.engine
        state.worker = worker
        state.costs = CostModel.for_engine(engine, s)
        # One tiny request through the whole graph compiles kernels and fills allocator pools before traffic.
        await ask_one(worker, Image.new("RGB", (56, 56), (127, 127, 127)), "warm-up", AskOptions(max_new_tokens=1))
        state.runner = ZoomToolRunner(worker, state.images, max_pixels=s.max_pixels_in, budget=state.budget)
        state.ready = True
        log.info("model %s loaded and warmed; ready", engine.name)
    except asyncio.CancelledError:
        raise
    except Exception as err:
        state.load_error = f"{type(err).__name__}: {err}"
        log.exception("loading the model failed")


def create_app(
    engine_factory: EngineFactory | None = None,
    settings: Settings | None = None,
    worker_factory: WorkerFactory | None = None,
) -> FastAPI:
    """The service app; without `engine_factory` it loads `settings.model_dir()` (QZOOM_MODEL or qzoom-tiny), and
    with `worker_factory` it serves through the worker that returns instead of loading a model itself."""
    settings = settings or get_settings()
    factory = engine_factory or default_engine_factory

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = ServiceState(
            settings=settings,
            images=ImageStore(max_bytes=int(settings.image_store_mb * MiB)),
            budget=Budget.from_settings(settings),
        )
        app.state.qzoom = state
        app.state.qzoom_registry = metrics.registry_for(state)
        old_limit = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = settings.max_pixels_in
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            state.loader = asyncio.create_task(_load(state, factory, worker_factory), name="qzoom-load")
            try:
                # A mounted app's own lifespan never runs: the MCP session manager is entered here.
                async with mcp_sessions.run():
                    yield
            finally:
                state.ready = False
                state.loader.cancel()
                await asyncio.gather(state.loader, return_exceptions=True)
                if state.worker is not None:
                    await state.worker.stop()
                if state.cache is not None:
                    state.cache.close()
                Image.MAX_IMAGE_PIXELS = old_limit

    # /docs (Swagger UI) and /redoc load their scripts from the fastapi-offline package, not a CDN: they work offline.
    app = FastAPIOffline(
        title="qzoom",
        summary="Query-aware zooming (Q-Zoom) for Qwen2.5-VL: ask questions about high-resolution images.",
        version="0.1.0",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=int(settings.max_body_mb * MiB))
    app.include_router(health.router)
    app.include_router(page.router)  # the demo page loads without a key; its calls to /ask carry one
    app.include_router(metrics.router, dependencies=[Depends(require_metrics_key)])
    app.include_router(ask.router, dependencies=[Depends(require_api_key)])
    app.include_router(images.router, dependencies=[Depends(require_api_key)])
    app.include_router(tools.router, dependencies=[Depends(require_api_key)])
    app.include_router(think.router, dependencies=[Depends(require_api_key)])
    app.include_router(chat.router, dependencies=[Depends(require_bearer_or_api_key)])
    mcp_sessions = mount_mcp(app, settings)
    return app
