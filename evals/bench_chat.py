"""The OpenAI-compatible endpoint against `/ask` on the same requests: `POST /v1/chat/completions` p50 / `/ask` p50.

    qzoom bench chat [--requests 24] [--rounds 2] [--model DIR] [...model knobs]

One `qzoom serve` subprocess on loopback (`bench_http`'s), serving a random checkpoint shaped like Qwen2.5-VL-7B
(`bench_engine.build_engine`) or `--model`. Each request is one picture and one question, sent to both endpoints
with the same image bytes (a JPEG data URL in both JSON bodies), the same greedy options and the same answer length;
both endpoints therefore run the same graph and decode the same tokens. Non-streamed: the JSON answer; streamed:
`/ask` with `Accept: text/event-stream` until its answer event, the chat endpoint with `stream: true` until
`data: [DONE]`. The four kinds of call are interleaved request by request (the order rotating), one client at a
time, so drift in the machine's speed touches every side alike. The server's feature cache is off
(`QZOOM_CACHE_L1_MB=0`), so the second call of a pair does not read the first one's features.

Printed: p50 / p90 per side, then chat p50 / ask p50 for plain and streamed calls (target: at most 1.05x).
"""

from __future__ import annotations

import base64
import io
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import torch

from qzoom.checkpoint import save_checkpoint
from qzoom.evals.bench_engine import build_engine
from qzoom.evals.bench_followup import bench_image_seeded
from qzoom.evals.bench_http import QUERY, _Server
from qzoom.settings import Settings

TARGET_P50_RATIO = 1.05
SIDES = ("ask", "chat", "ask-stream", "chat-stream")


def _jpeg_data_url(seed: int) -> str:
    buf = io.BytesIO()
    bench_image_seeded(seed).save(buf, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _call(client: httpx.Client, side: str, image: str, model: str, options: dict[str, Any], tokens: int) -> None:
    if side.startswith("ask"):
        body = {"image": image, "query": QUERY, "max_new_tokens": tokens, **options}
        if side == "ask":
            client.post("/ask", json=body).raise_for_status()
            return
        with client.stream("POST", "/ask", json=body, headers={"Accept": "text/event-stream"}) as r:
            r.raise_for_status()
            if not any(line.startswith("event: answer") for line in r.iter_lines()):
                raise RuntimeError("the /ask stream ended without its answer event")
        return
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                             {"type": "text", "text": QUERY}]}]  # fmt: skip
    chat = {"model": model, "messages": messages, "max_tokens": tokens, "qzoom": options}
    if side == "chat":
        client.post("/v1/chat/completions", json=chat).raise_for_status()
        return
    with client.stream("POST", "/v1/chat/completions", json={**chat, "stream": True}) as r:
        r.raise_for_status()
        if not any(line == "data: [DONE]" for line in r.iter_lines()):
            raise RuntimeError("the chat stream ended without data: [DONE]")


def _p(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


@torch.no_grad()
def run_chat_benchmark(
    *,
    layers: int = 28,
    split: int = 18,
    hidden: int = 256,
    tokens: int = 576,
    new_tokens: int = 8,
    requests: int = 24,
    rounds: int = 2,
    model_dir: Path | None = None,
    echo: Callable[[str], Any] = print,
) -> dict[str, float]:
    """Print the table; return chat p50 / ask p50 for "plain" and "stream"."""
    budget = tokens * 28 * 28
    # Every request zooms (the whole pipeline runs), at a fixed pixel budget.
    options = {"gate_thresh": 0.0, "roi_thresh": 0.0, "min_pixels": budget, "max_pixels": budget}
    with tempfile.TemporaryDirectory(prefix="qzoom-bench-chat-") as tmp:
        if model_dir is None:
            model_dir = Path(tmp) / "model"
            built = build_engine(layers, split, hidden)
            save_checkpoint(built.model, built.processor, model_dir)
            what = f"random Qwen2.5-VL, L={layers} K={split} hidden={hidden}"
        else:
            what = str(model_dir)
        echo(
            f"model: {what}; {tokens}-token views, every request zooms; answers of {new_tokens} tokens; "
            f"{requests} requests x {rounds} rounds, each sent to /ask and /v1/chat/completions, plain and streamed"
        )
        server = _Server(model_dir, Settings(), env={"QZOOM_CACHE_L1_MB": "0"})
        latencies: dict[str, list[float]] = {s: [] for s in SIDES}
        try:
            server.wait_ready()
            with httpx.Client(base_url=server.url, timeout=600) as client:
                model = client.get("/v1/models").json()["data"][0]["id"]
                images = [_jpeg_data_url(seed) for seed in range(requests + 2)]
                for side in SIDES:  # warm-up, untimed: connections, allocator pools
                    _call(client, side, images[-1], model, options, new_tokens)
                for r in range(rounds):
                    for i in range(requests):
                        shift = (i + r) % len(SIDES)
                        for side in SIDES[shift:] + SIDES[:shift]:
                            start = time.perf_counter()
                            _call(client, side, images[i], model, options, new_tokens)
                            latencies[side].append(time.perf_counter() - start)
        finally:
            server.stop()

    echo(f"\n{'side':>12} {'p50 ms':>9} {'p90 ms':>9}")
    for side in SIDES:
        echo(f"{side:>12} {_p(latencies[side], 50) * 1000:9.1f} {_p(latencies[side], 90) * 1000:9.1f}")
    ratios = {
        "plain": _p(latencies["chat"], 50) / _p(latencies["ask"], 50),
        "stream": _p(latencies["chat-stream"], 50) / _p(latencies["ask-stream"], 50),
    }
    echo("")
    for kind, ratio in ratios.items():
        verdict = "ok" if ratio <= TARGET_P50_RATIO else f"ABOVE the {TARGET_P50_RATIO}x target"
        echo(f"/v1/chat/completions vs /ask, {kind:>6}: p50 {ratio:.3f}x ({verdict})")
    return ratios
