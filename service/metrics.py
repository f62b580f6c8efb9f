"""`GET /metrics`: Prometheus text exposition of the worker and the feature cache, read at scrape time.

Open like the health routes (put it behind the proxy or an internal port), unless `QZOOM_PROTECT_METRICS` is on:
then it asks for `X-API-Key` like the other routes. Each app has its own registry, so
several apps in one process (tests) never clash. Series:
- `qzoom_ready` (0/1), `qzoom_requests_in_flight`, `qzoom_queue_depth`, `qzoom_last_batch_size`
- `qzoom_worker_refused_total`, `qzoom_worker_cancelled_total`,
  `qzoom_worker_batches_total{step}`, `qzoom_worker_batched_calls_total{step}`
- `qzoom_cache_events_total{kind,event}` (event: l1_hits, l2_hits, misses, puts), `qzoom_cache_corrupt_total`,
  `qzoom_cache_forged_total` (Redis values whose HMAC failed; also counted as corrupt),
- `qzoom_budget_token_steps`, `qzoom_budget_image_bytes` (admitted cost in flight), `qzoom_budget_refused_total`,
  `qzoom_cache_l1_bytes`, `qzoom_cache_l1_entries`, `qzoom_cache_l1_evictions_total`,
  `qzoom_cache_l2_available` and `qzoom_cache_l2_errors_total` when Redis is configured
"""

from __future__ import annotations

from collections.abc import Iterable

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from .deps import ServiceState

router = APIRouter(tags=["health"])


class ServiceCollector(Collector):
    """Reads the counters the worker and the cache already keep; nothing is counted twice."""

    def __init__(self, state: ServiceState) -> None:
        self.state = state

    def collect(self) -> Iterable[Metric]:
        state = self.state
        yield GaugeMetricFamily("qzoom_ready", "1 once the model is loaded and warmed", value=int(state.ready))
        worker = state.worker
        if worker is not None:
            stats = worker.stats
            yield GaugeMetricFamily("qzoom_requests_in_flight", "requests holding a worker place", worker.in_flight)
            yield GaugeMetricFamily("qzoom_queue_depth", "engine steps waiting for the device", worker.queue_depth)
            yield GaugeMetricFamily("qzoom_last_batch_size", "requests in the latest batch", stats.last_batch_size)
            yield CounterMetricFamily("qzoom_worker_refused", "requests refused with 503 (full)", stats.refused)
            yield CounterMetricFamily("qzoom_worker_cancelled", "queued steps dropped (client gone)", stats.cancelled)
            batches = CounterMetricFamily("qzoom_worker_batches", "batched engine calls per step", labels=["step"])
            calls = CounterMetricFamily("qzoom_worker_batched_calls", "requests served per step", labels=["step"])
            for step, n in stats.batches.items():
                batches.add_metric([step], n)
                calls.add_metric([step], stats.batched_calls[step])
            yield batches
            yield calls
        budget = state.budget
        yield GaugeMetricFamily("qzoom_budget_token_steps", "token-steps admitted in flight", budget.used_steps)
        yield GaugeMetricFamily("qzoom_budget_image_bytes", "image bytes admitted in flight", budget.used_memory)
        yield CounterMetricFamily("qzoom_budget_refused", "requests refused with 503 (budget full)", budget.refused)
        cache = state.cache
        if cache is not None:
            cs = cache.stats()
            events = CounterMetricFamily(
                "qzoom_cache_events", "feature cache lookups and writes", labels=["kind", "event"]
            )
            for kind, counts in cs["kinds"].items():
                for event, n in counts.items():
                    events.add_metric([kind, event], n)
            yield events
            yield CounterMetricFamily("qzoom_cache_corrupt", "unreadable Redis values dropped", cs["corrupt"])
            yield CounterMetricFamily("qzoom_cache_forged", "Redis values whose HMAC failed, dropped", cs["forged"])
            yield GaugeMetricFamily("qzoom_cache_l1_bytes", "bytes held by the in-process cache", cs["l1"]["bytes"])
            yield GaugeMetricFamily("qzoom_cache_l1_entries", "entries in the in-process cache", cs["l1"]["entries"])
            yield CounterMetricFamily("qzoom_cache_l1_evictions", "in-process cache evictions", cs["l1"]["evictions"])
            if cs["l2"] is not None:
                yield GaugeMetricFamily("qzoom_cache_l2_available", "1 while Redis answers", cs["l2"]["available"])
                yield CounterMetricFamily(
                    "qzoom_cache_l2_errors", "Redis errors (each a recompute)", cs["l2"]["errors"]
                )


def registry_for(state: ServiceState) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServiceCollector(state))
    return registry


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def metrics(request: Request) -> Response:
    registry: CollectorRegistry = request.app.state.qzoom_registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
