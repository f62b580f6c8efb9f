"""Load benchmark of the HTTP service: latency and throughput at several client concurrencies, side by side with the
in-process graph call on the same inputs.

    qzoom bench http [--concurrency 1,4,16] [--requests 16] [--rounds 2] [...model knobs]

One model checkpoint (random, shaped like Qwen2.5-VL-7B: `bench_engine.build_engine`) is served by a real
`qzoom serve` subprocess on loopback and loaded in this process behind the same `Worker` settings the service uses.
For each concurrency c, c clients send `requests` requests in total, each client one request at a time; HTTP clients
POST the image as a multipart PNG (bytes encoded before timing, as a client holding a file would), in-process
clients call `ask_one` with the decoded image. The two sides alternate round by round, so neither process computes
while the other is timed. Every request uses a picture not seen before (no feature-cache hits), and the zoom path
is forced through (τ_gate = τ_roi = 0), so every request runs the whole pipeline: encode, prefill, gate, propose,
crop, re-encode, second prefill, decode.

Printed per concurrency and side: p50 / p99 latency and throughput; then HTTP p50 / in-process p50 per concurrency
(target: at most 1.15x).
"""

from __future__ import annotations

import asyncio
import io
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch
from PIL import Image

from qzoom.agent.zoom import ask_one
from qzoom.cache import FeatureCache
from qzoom.checkpoint import save_checkpoint
from qzoom.engine import QZoomEngine
from qzoom.evals.bench_engine import build_engine
from qzoom.evals.bench_followup import bench_image_seeded
from qzoom.schemas import AskOptions
from qzoom.settings import Settings
from qzoom.testing import die_with_parent
from qzoom.worker import Worker

QUERY = "What is written in the blue box?"
TARGET_P50_RATIO = 1.15


@dataclass
class Run:
    """Latencies (s) of every request at one concurrency, and the wall time of the whole burst."""

    latencies: list[float]
    wall_s: float

    def percentile(self, q: int) -> float:
        """The q-th percentile (1..99), interpolated between samples; p50 is the median."""
        if len(self.latencies) == 1:
            return self.latencies[0]
        return statistics.quantiles(self.latencies, n=100, method="inclusive")[q - 1]

    @property
    def throughput(self) -> float:
        return len(self.latencies) / self.wall_s


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


async def _burst(call: Callable[[int], Awaitable[Any]], seeds: Sequence[int], concurrency: int) -> Run:
    """`concurrency` clients drain `seeds`, each one request at a time; per-request latency and total wall time."""
    queue = list(seeds)
    latencies: list[float] = []

    async def client() -> None:
        while queue:
            seed = queue.pop()
            start = time.perf_counter()
            await call(seed)
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return Run(latencies, time.perf_counter() - start)


class _Server:
    """`qzoom serve` on a loopback port, as a subprocess (what a user runs), stopped on exit."""

    def __init__(self, model_dir: Path, settings: Settings, env: dict[str, str] | None = None) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "QZOOM_MAX_PENDING": str(settings.max_pending),
            "QZOOM_MAX_BATCH": str(settings.max_batch),
            "QZOOM_BATCH_WINDOW_MS": str(settings.batch_window_ms),
            "QZOOM_DEVICE": "cpu",
            **(env or {}),
        }
        env.pop("QZOOM_REDIS_URL", None)  # same as the in-process side: an in-process cache only
        argv = [sys.executable, "-m", "qzoom.cli", "serve", "--model", str(model_dir), "--port", str(self.port)]
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 -- lives as long as the server, closed in stop()
        self.proc = subprocess.Popen(
            [*argv, "--log-level", "warning"],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )

    def log_tail(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-3000:]

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"qzoom serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"qzoom serve was not ready after {timeout_s:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


async def _measure(
    engine: QZoomEngine,
    server_url: str,
    settings: Settings,
    options: AskOptions,
    concurrency: Sequence[int],
    requests: int,
    rounds: int,
) -> dict[tuple[int, str], Run]:
    form = {k: str(v) for k, v in options.model_dump(exclude_none=True).items()} | {"query": QUERY}
    seeds_per_round = requests * len(concurrency) * 2
    images = {s: bench_image_seeded(s) for s in range(seeds_per_round * (rounds + 1))}
    pngs = {s: _png(img) for s, img in images.items()}
    runs: dict[tuple[int, str], Run] = {}

    async with (
        Worker(
            engine, max_pending=settings.max_pending, max_batch=settings.max_batch,
            batch_window_ms=settings.batch_window_ms,
        ) as worker,
        httpx.AsyncClient(base_url=server_url, timeout=600, limits=httpx.Limits(max_connections=64)) as client,
    ):  # fmt: skip

        async def in_process(seed: int) -> None:
            await ask_one(worker, images[seed], QUERY, options)

        async def over_http(seed: int) -> None:
            resp = await client.post("/ask", data=form, files={"image": ("picture.png", pngs[seed], "image/png")})
            resp.raise_for_status()

        # Warm-up: first calls through both paths (allocator pools, kernels, connections), untimed.
        warm = list(range(seeds_per_round * rounds, seeds_per_round * (rounds + 1)))
        await _burst(in_process, warm[:4], 2)
        await _burst(over_http, warm[4:8], 2)

        next_seed = 0
        for _ in range(rounds):
            for c in concurrency:
                for side, call in (("in-process", in_process), ("http", over_http)):
                    seeds = list(range(next_seed, next_seed + requests))
                    next_seed += requests
                    run = await _burst(call, seeds, c)
                    previous = runs.get((c, side))
                    runs[(c, side)] = (
                        run
                        if previous is None
                        else Run(previous.latencies + run.latencies, previous.wall_s + run.wall_s)
                    )
    return runs


@torch.no_grad()  # the whole benchmark, not the process: tests run after it
def run_http_benchmark(
    *,
    layers: int = 28,
    split: int = 18,
    hidden: int = 256,
    tokens: int = 576,
    new_tokens: int = 8,
    concurrency: Sequence[int] = (1, 4, 16),
    requests: int = 16,
    rounds: int = 2,
    echo: Callable[[str], Any] = print,
) -> dict[int, float]:
    """Print the table; return HTTP p50 / in-process p50 per concurrency."""
    budget = tokens * 28 * 28
    options = AskOptions(
        gate_thresh=0.0, roi_thresh=0.0, min_pixels=budget, max_pixels=budget, max_new_tokens=new_tokens
    )
    settings = Settings()
    echo(
        f"model: random Qwen2.5-VL, L={layers} K={split} hidden={hidden}; {tokens}-token views, every request zooms; "
        f"answers of {new_tokens} tokens; {requests} requests x {rounds} rounds per concurrency and side; "
        f"worker max_batch={settings.max_batch}"
    )
    with tempfile.TemporaryDirectory(prefix="qzoom-bench-http-") as tmp:
        model_dir = Path(tmp) / "model"
        built = build_engine(layers, split, hidden)
        save_checkpoint(built.model, built.processor, model_dir)
        engine = QZoomEngine.from_pretrained(
            str(model_dir), device=torch.device("cpu"), cache=FeatureCache.from_url(None, settings.cache_l1_mb << 20)
        )
        server = _Server(model_dir, settings)
        try:
            server.wait_ready()
            runs = asyncio.run(_measure(engine, server.url, settings, options, concurrency, requests, rounds))
        finally:
            server.stop()

    echo(f"\n{'clients':>8} {'side':>11} {'p50 ms':>9} {'p99 ms':>9} {'req/s':>7}")
    ratios: dict[int, float] = {}
    for c in concurrency:
        for side in ("in-process", "http"):
            run = runs[(c, side)]
            echo(
                f"{c:>8} {side:>11} {run.percentile(50) * 1000:9.1f} {run.percentile(99) * 1000:9.1f} "
                f"{run.throughput:7.2f}"
            )
        ratios[c] = runs[(c, "http")].percentile(50) / runs[(c, "in-process")].percentile(50)
    echo("")
    for c, ratio in ratios.items():
        verdict = "ok" if ratio <= TARGET_P50_RATIO else f"ABOVE the {TARGET_P50_RATIO}x target"
        echo(f"HTTP /ask vs in-process at {c:>2} clients: p50 {ratio:.3f}x ({verdict})")
    return ratios
