"""The service under a real uvicorn server on loopback: a client that hangs up cancels its graph and frees its worker
place (plain and SSE /ask), and a burst beyond the worker's bound gets 503 + Retry-After while the server stays
healthy. The device is held by pausing the engine's encoder (a real engine, paused at one step) so that requests
are provably in flight when the client leaves or the burst arrives."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import uvicorn

from conftest import MAX_PIXELS, MIN_PIXELS, make_tiny_model
from qzoom.engine import QZoomEngine
from qzoom.offline import build_processor, build_tokenizer
from qzoom.service.app import create_app
from test_service import PICTURE, assert_contract, settings

BODY = {"image": base64.b64encode(PICTURE).decode(), "query": "What is written?", "max_new_tokens": 2}


class PausableEngine(QZoomEngine):
    """The real engine; while `armed`, each encode call waits on the device thread until `release` is set."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.armed = False
        self.entered = threading.Event()
        self.release = threading.Event()

    def encode(self, states: Any) -> None:
        if self.armed:
            self.entered.set()
            assert self.release.wait(60), "the test never released the device"
        super().encode(states)

    def pause(self) -> None:
        self.entered.clear()
        self.release.clear()
        self.armed = True

    def resume(self) -> None:
        self.armed = False
        self.release.set()


class LiveServer:
    def __init__(self, **kw: Any) -> None:
        model = make_tiny_model()
        self.engine: PausableEngine | None = None

        def factory(s: Any, cache: Any) -> QZoomEngine:
            processor = build_processor(build_tokenizer(), min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
            self.engine = PausableEngine(model, processor, name="tiny", cache=cache)
            return self.engine

        self.app = create_app(factory, settings(**kw))
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        while httpx.get(self.url + "/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.engine is not None:
            self.engine.resume()
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def metric(self, name: str) -> float:
        for line in httpx.get(self.url + "/metrics").text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"{name} not in /metrics")

    def wait_for(self, name: str, value: float, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self.metric(name) != value:
            assert time.monotonic() < deadline, f"{name} stayed at {self.metric(name)}, expected {value}"
            time.sleep(0.05)

    def raw_post(self, path: str, body: dict[str, Any], headers: dict[str, str]) -> socket.socket:
        """Send a request on a raw socket and return the socket without reading: the test decides when to hang up."""
        data = json.dumps(body).encode()
        head = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{self.port}", "Content-Type: application/json",
                f"Content-Length: {len(data)}", *(f"{k}: {v}" for k, v in headers.items())]  # fmt: skip
        sock = socket.create_connection(("127.0.0.1", self.port))
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + data)
        return sock


@pytest.fixture(scope="module")
def live():
    with LiveServer(max_pending=2, max_batch=4) as server:
        yield server


ANSWERS = 'qzoom_worker_batches_total{step="answer"}'


@pytest.mark.parametrize("accept", ["application/json", "text/event-stream"])
def test_a_client_that_hangs_up_cancels_its_request_and_frees_the_place(live, accept):
    engine = live.engine
    assert engine is not None
    answers_before = live.metric(ANSWERS)
    engine.pause()
    sock = live.raw_post("/ask", BODY, {"Accept": accept})
    try:
        assert engine.entered.wait(30), "the request never reached the device"
        assert live.metric("qzoom_requests_in_flight") == 1
    finally:
        sock.close()
    # Freed while the device is still held: the request was cancelled, not merely finished late.
    live.wait_for("qzoom_requests_in_flight", 0)
    engine.resume()
    r = httpx.post(live.url + "/ask", json=BODY, timeout=60)
    assert r.status_code == 200, r.text
    assert_contract(r.json())
    # Only the new request answered: the cancelled graph never reached its later steps.
    assert live.metric(ANSWERS) == answers_before + 1
    assert live.metric("qzoom_requests_in_flight") == 0


def test_a_burst_beyond_the_bound_gets_503_retry_after_and_the_server_stays_healthy(live):
    engine = live.engine
    assert engine is not None
    refused_before = live.metric("qzoom_worker_refused_total")
    engine.pause()
    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = [pool.submit(httpx.post, live.url + "/ask", json=BODY, timeout=60) for _ in range(8)]
        try:
            # Two requests hold the two places (paused on the device); the other six are refused at once.
            assert engine.entered.wait(30)
            live.wait_for("qzoom_worker_refused_total", refused_before + 6)
            assert live.metric("qzoom_requests_in_flight") == 2
            assert httpx.get(live.url + "/healthz").json() == {"status": "ok"}
            assert httpx.get(live.url + "/readyz").status_code == 200
        finally:
            engine.resume()
        responses = [f.result() for f in futures]
    refused = [r for r in responses if r.status_code == 503]
    served = [r for r in responses if r.status_code == 200]
    assert len(refused) == 6 and len(served) == 2, [r.status_code for r in responses]
    for r in refused:
        assert r.json()["error"]["code"] == "overloaded" and int(r.headers["Retry-After"]) >= 1
    for r in served:
        assert_contract(r.json())
    assert live.metric("qzoom_requests_in_flight") == 0
    assert httpx.post(live.url + "/ask", json=BODY, timeout=60).status_code == 200
