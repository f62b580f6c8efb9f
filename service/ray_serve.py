"""qzoom on Ray Serve: model-worker replicas behind the same FastAPI app and LangGraph graph.

    serve run serve-config.yaml                      # a cluster (the documented config beside docker-compose.yml)
    qzoom serve --backend ray --workers 2            # a local cluster started by the command

    app = build_app({"workers": 2, "redis_url": "redis://redis:6379/0"})    # a Serve `Application`
    serve.run(app, name="qzoom", route_prefix="/")

Two deployments:

- `QZoomWorker`: one engine and one `qzoom.worker.Worker` per replica (`num_gpus=1` per replica on GPU; CPU replicas
  for the demo model). Its method `run(job)` takes one engine step `(step, SequenceState, arg)`, runs it and returns
  the state after it with the step's result. `@serve.batch` collects the replica's concurrent calls and hands them to
  the Worker together; the Worker's own per-step micro-batching then merges same-step calls into one engine call.
  (Serve splits its batches per multiplexed id, that is per image, so the Worker is what batches across images.)
- `QZoomIngress`: the service's FastAPI app (`service.app.create_app`: every route, schema, stream and error as in one
  process) behind `@serve.ingress`, with a `RemoteWorker` where the single-process service has its local `Worker`.
  The LangGraph graph runs here, node by node as in one process; each engine step goes through the worker
  deployment's handle.

The seam is `create_app(worker_factory=...)`. The graph calls `worker.call(step, state, arg)` and reads a few facts of
`worker.engine` (name, has_gate, has_rpn, new_state, the tokenizer, stop ids). `RemoteWorker` is a `Worker` whose
`call` runs on a replica and whose `engine` is an `EngineView`: those facts, sent by a replica, without weights.
A request's `SequenceState` (its tensors included) stays in the ingress between steps and travels with each call, so
any replica can run any step of any request; that is what lets a step lost with its replica run again elsewhere.

Routing by image: Serve's model multiplexing, with the image digest as `multiplexed_model_id` (not a custom
`RequestRouter`). Multiplexing is a public API whose routers already learn from the replicas which one holds which
id, send a request to a holder while it has room and to the least loaded replica otherwise, and keep a bounded LRU
of ids per replica (`max_num_models_per_replica`), which matches a bounded L1 feature cache; a custom router would
rebuild that bookkeeping to express the same policy. A replica "holds" a digest once it has run a step for it: the
coarse features are then in its L1 cache (and in Redis, `QZOOM_REDIS_URL`, the shared L2). Follow-up questions on
the same image land on that replica and skip the vision tower and the prefix; a replica that gets a digest it has
not seen reads the features from Redis before it recomputes anything (Redis is the miss path, not the hot path).

Failures and scale:
- A call whose replica dies under it (`RayActorError`, `ActorUnavailableError`) is sent once more, to another
  replica, with the state as it was before the step (steps change the state only on the replica's copy), so the
  client gets one answer. A second failure is the request's error.
- Autoscaling: `workers="auto"` is Serve's `num_replicas="auto"` with `target_ongoing_requests` per replica and
  `min_workers` / `max_workers` bounds; an integer fixes the count.
- Draining: a stopping replica takes no new calls and finishes its in-flight ones within
  `graceful_shutdown_timeout_s` (`graceful_shutdown_wait_loop_s` between checks) before its worker stops.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, replace
from typing import Any, Literal, Self

import torch
from fastapi import FastAPI
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve
from ray.exceptions import RayActorError
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from qzoom.cache import FeatureCache, MiB, image_digest
from qzoom.engine import QZoomEngine, SequenceState
from qzoom.schemas import AskOptions
from qzoom.settings import Settings
from qzoom.worker import Step, Worker

from .app import create_app, default_engine_factory

log = logging.getLogger(__name__)

WORKER_DEPLOYMENT = "QZoomWorker"
INGRESS_DEPLOYMENT = "QZoomIngress"

# A replica that died or cannot be reached: the step never ran (or its result is lost); it is safe to send again.
REPLICA_GONE: tuple[type[BaseException], ...] = (RayActorError,)  # ActorDiedError, ActorUnavailableError

Job = tuple[Step, SequenceState, Any]


class EngineView(QZoomEngine):
    """The facts of a replica's engine that the ingress reads, without the model: `name`, `has_gate`, `has_rpn`,
    `settings` (so `new_state` resolves budgets and thresholds exactly as the replica would), the processor (its
    tokenizer decodes conversations) and `stop_ids`. Any other engine method fails: the ingress runs no model step."""

    def __init__(self, engine: QZoomEngine) -> None:  # the base __init__ needs the weights; only facts are copied
        self.name = engine.name
        self.revision = engine.revision
        self.settings = engine.settings
        self.processor = engine.processor
        self.stop_ids = set(engine.stop_ids)
        self.pad_id = engine.pad_id
        self._has_gate = engine.has_gate
        self._has_rpn = engine.has_rpn

    @property
    def has_gate(self) -> bool:
        return self._has_gate

    @property
    def has_rpn(self) -> bool:
        return self._has_rpn


@dataclass
class Reply:
    """What a replica returns for one step: the state after it, the step's result, who ran it and its cache counters.

    State and result travel as one object, so a result that points into the state (a `Proposal`'s block) still does.
    """

    state: SequenceState
    result: Any
    replica: str
    cache: dict[str, Any]


# What travels: a state goes to a replica and back at every step, so what the far side does not need stays home.
# The original picture is read on the replica only by observe (preprocess, digest, size), propose (its size) and zoom
# (the crops); every other step gets a 1x1 stand-in, and no reply carries the picture back (the ingress keeps it).
# The global view's pixel values serve only the observe step that computes them. On the demo model with a 1024x768
# picture this takes about 7 MB off each step's round trip (2.4 MB of picture, 4.8 MB of pixel values).
IMAGE_STEPS: frozenset[str] = frozenset({"observe", "propose", "zoom"})
_STAND_IN = Image.new("1", (1, 1))
_NO_PIXELS = torch.empty(0)


def _lightened(state: SequenceState, *, keep_image: bool) -> SequenceState:
    """A shallow copy of `state` (and its alternatives) to send: no pixel values, and the picture only if kept."""
    image = state.image if keep_image else _STAND_IN
    alternatives = [replace(a, image=image, pixel_values=_NO_PIXELS) for a in state.alternatives]
    return replace(state, image=image, pixel_values=_NO_PIXELS, alternatives=alternatives)


def warm_up(engine: QZoomEngine) -> None:
    """One tiny request through every step the graph can take, so the first real one pays no one-time costs."""
    st = engine.new_state(Image.new("RGB", (56, 56), (127, 127, 127)), "warm-up", AskOptions(max_new_tokens=1))
    engine.prepare([st])
    engine.encode([st])
    engine.prefill([st])
    if engine.has_gate:
        engine.gate([st])
    engine.finish([st])
    engine.decode([st])


class QZoomWorker:
    """The model worker deployment's class: one engine, one feature cache and one `Worker` per replica."""

    def __init__(self, overrides: dict[str, Any]) -> None:
        s = replica_settings(overrides)
        self.cache = FeatureCache.from_url(
            s.redis_url, s.cache_l1_mb * MiB, s.cache_ttl_s, s.cache_max_value_mb * MiB, secret=s.cache_key()
        )  # replicas share Redis values only with the same QZOOM_CACHE_SECRET
        self.engine = default_engine_factory(s, self.cache)
        warm_up(self.engine)
        self.worker = Worker(
            self.engine, max_pending=s.max_pending, max_batch=s.max_batch,
            batch_window_ms=s.batch_window_ms, retry_after_s=s.retry_after_s,
        )  # fmt: skip
        # The replica actor's name in the "serve" namespace: logs, metrics and tests name a replica by it.
        self.replica = serve.get_replica_context().replica_id.to_full_id_str()

    async def describe(self) -> EngineView:
        return EngineView(self.engine)

    async def whoami(self) -> str:
        """This replica's id, after noting the request's multiplexed id (tests and the benchmark pin replicas)."""
        await self._note_image(serve.get_multiplexed_model_id())
        return self.replica

    async def stats(self) -> dict[str, Any]:
        return {"replica": self.replica, "cache": self.cache.stats()}

    @serve.multiplexed(max_num_models_per_replica=64)  # type: ignore[untyped-decorator]  # ray's is untyped
    async def _note_image(self, digest: str) -> str:
        # Nothing to load: the features are computed (or read from Redis) by the step itself. Noting the id is what
        # tells the routers that follow-ups on this image belong here.
        return digest

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def run(self, jobs: list[Job]) -> list[Reply | BaseException]:
        """Run one engine step per job; the Worker batches same-step jobs into one engine call."""
        await self.worker.start()  # idempotent; the dispatcher needs the replica's running event loop
        digest = serve.get_multiplexed_model_id()  # one per batch: Serve splits batches by multiplexed id
        if digest and any(step == "observe" for step, _, _ in jobs):
            await self._note_image(digest)  # the coarse features are about to be in this replica's cache
        results = await asyncio.gather(*(self.worker.call(*job) for job in jobs), return_exceptions=True)
        cache = self.cache.stats()
        return [
            r if isinstance(r, BaseException) else Reply(_lightened(job[1], keep_image=False), r, self.replica, cache)
            for job, r in zip(jobs, results, strict=True)
        ]

    async def __del__(self) -> None:
        await self.worker.stop()
        self.cache.close()


class RemoteWorker(Worker):
    """A `Worker` whose steps run on the worker deployment: the ingress's side of the seam.

    Admission (`admit`, `max_pending`, 503 when full) is the ingress's own, as in one process; the replicas bound
    their own concurrency with `max_ongoing_requests` and Serve queues the rest.
    """

    def __init__(
        self, handle: DeploymentHandle[Any], view: EngineView, *, max_pending: int, retry_after_s: float
    ) -> None:
        super().__init__(view, max_pending=max_pending, retry_after_s=retry_after_s)
        self.handle = handle
        self.retries = 0  # steps sent a second time because their replica died
        self.served_by: dict[str, int] = {}  # replica id -> steps it ran for this ingress
        self.caches: dict[str, dict[str, Any]] = {}  # replica id -> its feature-cache counters at its latest reply

    async def start(self) -> None:
        return None  # nothing runs here; the replicas start their own workers

    async def stop(self) -> None:
        self._device.shutdown(wait=False)

    async def call(self, step: Step, state: SequenceState, arg: Any = None) -> Any:
        """Run `step` on the replica that holds the image's features (or any, when none does); retry once if the
        replica dies meanwhile. The state is updated in place, as a local step would."""
        if not state.digest:
            # The routing key, and the cache key's image part: the replica's `prepare` keeps a digest already set.
            state.digest = image_digest(state.image)
        handle = self.handle.options(multiplexed_model_id=state.digest)
        job = (step, _lightened(state, keep_image=step in IMAGE_STEPS), arg)
        try:
            reply: Reply | BaseException = await handle.run.remote(job)
        except REPLICA_GONE as err:
            self.retries += 1
            log.warning("a worker replica was lost during %s (%s); sending the step once more", step, err)
            reply = await handle.run.remote(job)
        if isinstance(reply, BaseException):  # the step itself failed on the replica: the request's error
            raise reply
        image = state.image
        state.__dict__.update(reply.state.__dict__)
        for st in (state, *state.alternatives):  # every alternative is a crop of the same picture
            st.image = image
        self.served_by[reply.replica] = self.served_by.get(reply.replica, 0) + 1
        self.caches[reply.replica] = reply.cache
        self.stats.batches[step] += 1
        self.stats.batched_calls[step] += 1
        return reply.result


class RayAppArgs(BaseModel):
    """`build_app`'s arguments: the `args:` of an application in a Serve config. `settings` overrides the replicas'
    `QZOOM_*` environment (prefer the config's `runtime_env.env_vars` for secrets such as API keys)."""

    model_config = ConfigDict(extra="forbid")

    workers: int | Literal["auto"] = Field(2, description="worker replicas, or 'auto' to autoscale")
    min_workers: int = Field(1, ge=1, description="autoscaling lower bound (workers='auto')")
    max_workers: int = Field(4, ge=1, description="autoscaling upper bound (workers='auto')")
    target_ongoing_requests: float = Field(8.0, gt=0, description="autoscaling target: steps in flight per replica")
    max_ongoing_requests: int = Field(32, ge=1, description="steps one replica takes at once (Serve queues the rest)")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per worker replica: 1 on a GPU cluster, 0 for CPU replicas")
    num_cpus: float = Field(1.0, ge=0, description="CPUs per worker replica")
    settings: dict[str, Any] = Field(default_factory=dict, description="Settings fields, e.g. redis_url, model")

    @model_validator(mode="after")
    def _bounds(self) -> Self:
        if self.workers != "auto" and self.workers < 1:
            raise ValueError(f"workers must be 'auto' or at least 1, got {self.workers}")
        if self.min_workers > self.max_workers:
            raise ValueError(f"min_workers ({self.min_workers}) must not exceed max_workers ({self.max_workers})")
        return self


def replica_settings(overrides: dict[str, Any]) -> Settings:
    """The replica's settings: its own `QZOOM_*` environment, then the app's overrides (validated)."""
    return Settings(**overrides)


def build_app(args: dict[str, Any] | RayAppArgs | None = None) -> Application:
    """The Serve application: the ingress bound to the worker deployment (`serve run` calls it with `args`)."""
    a = args if isinstance(args, RayAppArgs) else RayAppArgs.model_validate(args or {})
    overrides = dict(a.settings)
    replica_settings(overrides)  # a bad override fails here, when the app is built, not in every replica
    scale: dict[str, Any] = {"num_replicas": a.workers}
    if a.workers == "auto":
        scale["autoscaling_config"] = {
            "min_replicas": a.min_workers,
            "max_replicas": a.max_workers,
            "target_ongoing_requests": a.target_ongoing_requests,
        }
    worker = serve.deployment(
        name=WORKER_DEPLOYMENT,
        ray_actor_options={"num_gpus": a.num_gpus, "num_cpus": a.num_cpus},
        max_ongoing_requests=a.max_ongoing_requests,
        graceful_shutdown_wait_loop_s=1.0,
        graceful_shutdown_timeout_s=60.0,
        **scale,
    )(QZoomWorker)

    def asgi_app() -> FastAPI:
        # Evaluated on the ingress replica (Serve's builder form of `serve.ingress`): its settings come from that
        # replica's environment, and the worker handle from the running application.
        settings = replica_settings(overrides)

        async def remote_worker(s: Settings, cache: FeatureCache) -> Worker:
            handle = serve.get_deployment_handle(WORKER_DEPLOYMENT, app_name=serve.get_replica_context().app_name)
            view: EngineView = await handle.describe.remote()
            return RemoteWorker(handle, view, max_pending=s.max_pending, retry_after_s=s.retry_after_s)

        return create_app(settings=settings, worker_factory=remote_worker)

    ingress = serve.deployment(
        name=INGRESS_DEPLOYMENT,
        ray_actor_options={"num_cpus": 0.5},
        max_ongoing_requests=256,  # requests mostly wait on worker steps; the app's own max_pending bounds them
        graceful_shutdown_timeout_s=60.0,
    )(serve.ingress(asgi_app)())
    return ingress.bind(worker.bind(overrides))


def init_ray(address: str | None = None, *, num_cpus: int | None = None, tries: int = 3) -> None:
    """`ray.init`: join the cluster at `address` (or RAY_ADDRESS), else start a local one with `num_cpus` logical CPUs.

    A local start is tried up to `tries` times: Ray gives a new node's raylet a fixed 30 s to register, which a
    machine busy with other work can miss (seen on our shared 2-core machines); a second start then succeeds."""
    import ray

    for attempt in range(1, tries + 1):
        try:
            ray.init(address=address, num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
            return
        except Exception as err:  # ray raises a bare Exception for the startup timeout
            if attempt == tries or address is not None or "timed out during startup" not in str(err):
                raise
            log.warning("the local Ray node did not start in time (%s); starting it again", err)
            ray.shutdown()


def serve_on_ray(args: RayAppArgs, *, host: str, port: int, address: str | None = None) -> None:
    """`qzoom serve --backend ray`: join the cluster at `address` (or RAY_ADDRESS), else start a local one; run the
    application on http://host:port until interrupted."""
    init_ray(address)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(args), name="qzoom", route_prefix="/", blocking=True)
