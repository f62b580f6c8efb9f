"""The Ray Serve backend on a local Ray cluster started here (CPU, the shipped demo model, a private redis-server):
two worker replicas behind the ingress; the same answers, streams and errors as the single-process service; a
follow-up on an image goes to the replica holding its features; a replica that never saw the image reads them from
Redis instead of running the vision tower; killing a replica under load loses no request.

One cluster serves the whole module (starting it costs most of this file's time). Under CI=true a cluster that does
not start fails the tests; elsewhere they are skipped.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import socket
import time
from importlib import import_module
from pathlib import Path

import httpx
import pytest
import ray
import yaml
from fastapi.testclient import TestClient
from PIL import Image
from ray import serve

from conftest import scene
from qzoom.agent.zoom import ask_one
from qzoom.schemas import AskOptions
from qzoom.service.app import create_app
from qzoom.service.ray_serve import WORKER_DEPLOYMENT, EngineView, RayAppArgs, RemoteWorker, build_app, init_ray
from qzoom.settings import Settings

APP = "qzoom"
QUERY = "What is written in the box?"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _png(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


ROOT = Path(__file__).resolve().parents[1]


def _apps(path: Path) -> list[dict]:
    docs = list(yaml.safe_load_all(path.read_text()))
    if path.name == "rayservice.yaml":
        return yaml.safe_load(docs[0]["spec"]["serveConfigV2"])["applications"]
    return docs[0]["applications"]


@pytest.mark.parametrize("name", ["serve-config.yaml", "rayservice.yaml"])
def test_the_deploy_configs_build_the_application(name):
    (app,) = _apps(ROOT / name)
    module, attr = app["import_path"].split(":")
    assert getattr(import_module(module), attr) is build_app
    args = RayAppArgs.model_validate(app["args"])
    assert args.workers == "auto" and args.num_gpus == 1  # a GPU cluster: one model per GPU, autoscaled
    assert set(app["runtime_env"]["env_vars"]) >= {"QZOOM_MODEL", "QZOOM_REDIS_URL"}
    assert build_app(args) is not None


@pytest.mark.parametrize(
    ("args", "named"),
    [({"workers": 0}, "workers"), ({"min_workers": 3, "max_workers": 2}, "min_workers"), ({"replicas": 2}, "replicas")],
)
def test_bad_app_args_are_refused_naming_the_field(args, named):
    with pytest.raises(ValueError, match=named):
        build_app(args)


@pytest.fixture(scope="module")
def cluster(redis_server):
    """A local Ray cluster with the qzoom application (2 CPU worker replicas, Redis as L2); yields the HTTP base URL."""
    try:
        # Logical CPUs: the replicas ask for fractions and mostly wait; the box's real cores are shared by all.
        init_ray(num_cpus=4)
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        # Replicas share Redis values only when they share the HMAC secret of the cache (QZOOM_CACHE_SECRET).
        shared = {"redis_url": redis_server.url, "cache_secret": "the replicas' secret"}
        app = build_app({"workers": 2, "num_cpus": 0.5, "settings": shared})
        serve.run(app, name=APP, route_prefix="/")
    except Exception as err:
        if ray.is_initialized():
            ray.shutdown()
        if os.environ.get("CI") == "true":
            pytest.fail(f"the local Ray cluster did not start: {err}")
        pytest.skip(f"the local Ray cluster did not start: {err}")
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while httpx.get(f"{base}/readyz", timeout=10).status_code != 200:
        assert time.monotonic() < deadline, "the Ray ingress never became ready"
        time.sleep(0.5)
    yield base
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def http(cluster):
    with httpx.Client(base_url=cluster, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def local():
    """The single-process service on the same checkpoint, for side-by-side comparison."""
    with TestClient(create_app(settings=Settings())) as client:
        deadline = time.monotonic() + 120
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "the local service never became ready"
            time.sleep(0.1)
        yield client


@pytest.fixture(scope="module")
def remote(cluster):
    """A `RemoteWorker` in this process on the worker deployment: the ingress's own side of the seam, observable."""
    handle = serve.get_deployment_handle(WORKER_DEPLOYMENT, app_name=APP)
    view = handle.describe.remote().result()
    assert isinstance(view, EngineView) and view.name == "qzoom-tiny"
    return handle, view


def _worker(remote) -> RemoteWorker:
    handle, view = remote
    return RemoteWorker(handle, view, max_pending=64, retry_after_s=1.0)


def _sse(text: str) -> list[tuple[str, dict]]:
    events = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        events.append((lines["event"], json.loads(lines["data"])))
    return events


@pytest.mark.slow
def test_routes_answer_as_the_single_process_service(http, local):
    image = _png(scene(640, 480, seed=3))
    for body in (
        {"image": image, "query": QUERY},
        {"image": image, "query": QUERY, "force_zoom": True, "max_steps": 2},
    ):
        got, want = http.post("/ask", json=body), local.post("/ask", json=body)
        assert got.status_code == want.status_code == 200, got.text
        g, w = got.json(), want.json()
        assert (g["answer"], g["zoomed"], g["steps"] and [s["box"] for s in g["steps"]]) == (
            w["answer"], w["zoomed"], w["steps"] and [s["box"] for s in w["steps"]],
        )  # fmt: skip
        assert g["gate_score"] == pytest.approx(w["gate_score"], abs=1e-4)
        assert g["model"] == w["model"] == "qzoom-tiny"
    body = {"image": image, "query": QUERY, "force_zoom": True}
    stream = {"accept": "text/event-stream"}
    got_events = _sse(http.post("/ask", json=body, headers=stream).text)
    want_events = _sse(local.post("/ask", json=body, headers=stream).text)
    assert [e for e, _ in got_events] == [e for e, _ in want_events] and got_events[-1][0] == "answer"
    assert got_events[-1][1]["result"]["answer"] == want_events[-1][1]["result"]["answer"]
    gate = {"image": image, "query": QUERY}
    assert http.post("/v1/tools/gate", json=gate).json()["gate_score"] == pytest.approx(
        local.post("/v1/tools/gate", json=gate).json()["gate_score"], abs=1e-4
    )
    for bad in ({"image": image, "query": QUERY, "max_steps": -1}, {"image": "bm90IGFuIGltYWdl", "query": QUERY}):
        got, want = http.post("/ask", json=bad), local.post("/ask", json=bad)
        assert got.status_code == want.status_code and got.status_code in (415, 422)
        assert got.json()["error"]["code"] == want.json()["error"]["code"]


def _vision(cache: dict) -> dict:
    return cache["kinds"].get("vision", {})


@pytest.mark.slow
def test_follow_up_goes_to_the_replica_holding_the_features_and_another_reads_redis(remote):
    handle, view = remote
    worker = _worker(remote)
    image = scene(512, 384, seed=11)

    asyncio.run(ask_one(worker, image, QUERY))
    holder = max(worker.served_by, key=worker.served_by.__getitem__)
    held = _vision(worker.caches[holder])
    time.sleep(1.0)  # the holder's note of the digest reaches the routers asynchronously
    worker.served_by.clear()
    asyncio.run(ask_one(worker, image, "What colour is the box?"))
    assert set(worker.served_by) == {holder}, worker.served_by  # every step of the follow-up ran on the holder
    after = _vision(worker.caches[holder])
    assert after.get("l1_hits", 0) == held.get("l1_hits", 0) + 1  # its coarse features, from the holder's L1
    assert after.get("misses", 0) == held.get("misses", 0)

    # A replica that has never seen the image: pin one by a multiplexed id it noted, then send it the image's steps.
    other, probe = None, 0
    while other is None:
        probe += 1
        assert probe < 50, "no second replica took a probe"
        if handle.options(multiplexed_model_id=f"probe-{probe}").whoami.remote().result() != holder:
            other = f"probe-{probe}"
    pinned = handle.options(multiplexed_model_id=other)
    before = _vision(pinned.stats.remote().result()["cache"])
    st = view.new_state(image, "Is there a box?", AskOptions(max_new_tokens=2))
    reply = pinned.run.remote(("observe", st, None)).result()
    assert reply.replica != holder
    assert "vision" in reply.state.cache_hits  # the features came from the cache...
    vision = _vision(reply.cache)
    assert vision.get("l2_hits", 0) == before.get("l2_hits", 0) + 1  # ...from Redis, the shared L2
    assert vision.get("misses", 0) == before.get("misses", 0)  # and this replica's vision tower did not run


@pytest.mark.slow
def test_killing_a_replica_under_load_loses_no_request(remote, local):
    worker = _worker(remote)
    images = [scene(448, 448, seed=100 + i) for i in range(8)]
    opts = AskOptions(force_zoom=True, max_new_tokens=4)

    async def load() -> list:
        tasks = [asyncio.create_task(ask_one(worker, im, QUERY, opts)) for im in images]
        while sum(worker.served_by.values()) < 4:  # the load is under way on the replicas
            await asyncio.sleep(0.01)
        victim = max(worker.served_by, key=worker.served_by.__getitem__)
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        return await asyncio.gather(*tasks)

    results = asyncio.run(load())
    assert worker.retries >= 1  # steps were lost with the replica and ran again elsewhere
    # Every request answered, as the single-process service answers it: a retried step started from the state
    # before it, so nothing was applied twice.
    for image, result in zip(images, results, strict=True):
        want = local.post("/ask", json={"image": _png(image), "query": QUERY, **opts.model_dump(exclude_none=True)})
        assert result.answer == want.json()["answer"]
        assert [s.box for s in result.steps] == [s["box"] for s in want.json()["steps"]]


@pytest.mark.parametrize("workers", ["x", "0", "-1"])
def test_serve_backend_ray_refuses_a_bad_worker_count_in_one_line(workers):
    from typer.testing import CliRunner

    from qzoom.cli import app

    result = CliRunner().invoke(app, ["serve", "--backend", "ray", "--workers", workers])
    assert result.exit_code == 2
    assert "--workers takes a positive number or 'auto'" in result.output
