"""Benchmark of the Ray Serve backend on a local cluster: throughput with 1 and then 2 CPU worker replicas at the same
client load, and the Ray path's per-request overhead against the single-process service on the same requests.

    qzoom bench ray [--clients 8] [--requests 32] [--sequential 12]

All on the shipped demo model, in one run:
1. One worker replica behind the Ray ingress; `clients` concurrent HTTP clients send `requests` `POST /ask` (each a
   picture not seen before, so no feature-cache hits); throughput = requests / wall time.
2. The same application scaled to two worker replicas; the same load on as many fresh pictures.
3. One client, `sequential` requests one at a time, against the Ray path (two replicas) and against a `qzoom serve`
   subprocess (the single-process service), alternating request by request on the same pictures (each side sees each
   picture once, cold); p50 latency of each side and their ratio.

Each worker replica reserves one logical CPU and runs torch on one thread (Ray sets OMP_NUM_THREADS from the
replica's CPUs), and so does the single-process service here (OMP_NUM_THREADS=1). On a machine with fewer free cores
than replicas, the replicas share the cores, so the 2-replica speed-up measures contention as much as scaling; the
printout says how many cores the machine has.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import httpx

from qzoom.evals.bench_followup import bench_image_seeded
from qzoom.evals.bench_http import QUERY, Run, _burst, _free_port, _png, _Server
from qzoom.models import default_model_dir
from qzoom.settings import Settings


def _wait_ready(url: str, timeout_s: float = 600.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"{url} was not ready after {timeout_s:.0f} s")


async def _load(url: str, pngs: dict[int, bytes], seeds: list[int], clients: int) -> Run:
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=64)) as client:

        async def one(seed: int) -> None:
            resp = await client.post("/ask", data={"query": QUERY}, files={"image": ("p.png", pngs[seed], "image/png")})
            resp.raise_for_status()

        return await _burst(one, seeds, clients)


async def _sequential(urls: dict[str, str], pngs: dict[int, bytes], seeds: list[int]) -> dict[str, list[float]]:
    """One request at a time, the sides alternating on each picture; latencies (s) per side."""
    out: dict[str, list[float]] = {side: [] for side in urls}
    async with httpx.AsyncClient(timeout=600) as client:
        for seed in seeds:
            for side, url in urls.items():
                start = time.perf_counter()
                resp = await client.post(
                    f"{url}/ask", data={"query": QUERY}, files={"image": ("p.png", pngs[seed], "image/png")}
                )
                resp.raise_for_status()
                out[side].append(time.perf_counter() - start)
    return out


def run_ray_benchmark(*, clients: int, requests: int, sequential: int, echo: Callable[[str], Any] = print) -> None:
    import ray
    from ray import serve

    from qzoom.service.ray_serve import build_app, init_ray

    seeds = list(range(2 * requests + sequential + 8))
    pngs = {s: _png(bench_image_seeded(10_000 + s)) for s in seeds}
    load_1, load_2 = seeds[:requests], seeds[requests : 2 * requests]
    seq = seeds[2 * requests : 2 * requests + sequential]
    warm = seeds[2 * requests + sequential :]

    echo(f"machine: {os.cpu_count()} cores; demo model; {clients} clients, {requests} requests per replica count")
    init_ray(num_cpus=4)
    local: _Server | None = None
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        url = f"http://127.0.0.1:{port}"
        thr: dict[int, Run] = {}
        for n in (1, 2):
            serve.run(build_app({"workers": n, "num_cpus": 1}), name="qzoom", route_prefix="/")
            _wait_ready(url)
            asyncio.run(_load(url, pngs, warm[4 * (n - 1) : 4 * n], 2))  # untimed: connections, first calls
            thr[n] = asyncio.run(_load(url, pngs, load_1 if n == 1 else load_2, clients))
            echo(
                f"ray, {n} worker replica(s): {thr[n].throughput:6.2f} req/s   "
                f"p50 {thr[n].percentile(50) * 1000:7.0f} ms   p99 {thr[n].percentile(99) * 1000:7.0f} ms"
            )
        echo(f"throughput 2 replicas / 1 replica: {thr[2].throughput / thr[1].throughput:.2f}x")

        # Same torch threads as a replica (one), so the comparison is of the paths, not of the thread counts.
        os.environ["OMP_NUM_THREADS"] = "1"
        local = _Server(default_model_dir(), Settings())
        local.wait_ready()
        asyncio.run(_sequential({"local": local.url}, pngs, warm[:2]))
        lat = asyncio.run(_sequential({"local": local.url, "ray": url}, pngs, seq))
        p50 = {side: statistics.median(v) for side, v in lat.items()}
        echo(
            f"one client, {sequential} requests: single-process p50 {p50['local'] * 1000:.0f} ms, "
            f"Ray path p50 {p50['ray'] * 1000:.0f} ms; Ray / single-process: {p50['ray'] / p50['local']:.2f}x "
            f"(+{(p50['ray'] - p50['local']) * 1000:.0f} ms)"
        )
    finally:
        if local is not None:
            local.stop()
        serve.shutdown()
        ray.shutdown()
