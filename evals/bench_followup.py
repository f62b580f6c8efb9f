"""Follow-up benchmark: a second question about an image already seen vs a question about a new image.

Two ratios, each measured side by side in one process (runs alternate, medians reported):

1. L1 (same process): cold ask on a new image vs a follow-up question on the image just asked about. The follow-up
   reuses the coarse view's features and the image prefix's KV in every layer group from the in-process cache.
   Target: at least 3x faster.
2. L2 (a fresh process sharing Redis): this process asks one question per image with a Redis-backed cache; a new
   Python process, with an empty in-process cache, then times follow-ups on those images (served from Redis) against
   cold asks on unseen images. Target: at least 2x faster.

For a question the gate answers directly, for one that zooms on the whole image (the follow-up's crop is the same,
a cache hit) and for a follow-up that zooms on another region than the first question (boxes forced to the top-left
and the bottom-right quarter, since the random SD-RPN cannot be steered: the follow-up encodes a new crop).
The model is random, shaped like Qwen2.5-VL-7B (`bench_engine.build_engine`); images are 1024x768 at a 576-token
budget. Redis: `--redis-url`, else `QZOOM_REDIS_URL`, else a private `redis-server` started for the run (skipped
with a note when there is none).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from qzoom.agent import run
from qzoom.cache import FeatureCache
from qzoom.checkpoint import save_checkpoint
from qzoom.engine import QZoomEngine
from qzoom.evals.bench_engine import bench_image, build_engine, environment
from qzoom.roi import GridBox
from qzoom.schemas import AskOptions
from qzoom.testing import RedisServer, redis_server_binary

FIRST = "What is written in the blue box?"
SECOND = "What colour is the box in the top left corner?"


def scenarios(tokens: int, new_tokens: int) -> dict[str, tuple[AskOptions, AskOptions]]:
    """Per case, the options of the first question and of the follow-up (the "new region" case also forces their
    boxes: :data:`REGIONS`)."""
    budget = tokens * 28 * 28
    common = {"max_new_tokens": new_tokens, "min_pixels": budget, "max_pixels": budget}
    return {
        "gate closed": (AskOptions(gate_thresh=1.0, **common),) * 2,
        # τ_roi = 0 always yields a box (the random SD-RPN is not trained): every request really zooms, on the whole
        # image, so the follow-up's crop is the first question's and its features are a cache hit.
        "zoomed": (AskOptions(gate_thresh=0.0, roi_thresh=0.0, **common),) * 2,
        # The random SD-RPN's map is flat, so its boxes cannot be steered: the first question zooms on the top-left
        # quarter of the coarse grid, the follow-up on the bottom-right one, so its crop must be encoded anew.
        "new region": (AskOptions(gate_thresh=0.0, **common),) * 2,
    }


REGIONS = {"new region": (0, 1)}  # per case, the forced quarter of the first question and of the follow-up


def answer(engine: QZoomEngine, st: Any, quarter: int | None) -> None:
    """The whole pipeline for one request: the graph, or (``quarter`` 0 = top left, 1 = bottom right) the same engine
    steps with the box forced to that quarter of the coarse grid."""
    if quarter is None:
        run(engine, [st])
        return
    engine.prepare([st])
    engine.encode([st])
    engine.prefill([st])
    engine.gate([st])
    h, w = st.blocks[0].grid_hw
    bw, bh = max(1, w // 2), max(1, h // 2)
    x0, y0 = (0, 0) if quarter == 0 else (w - bw, h - bh)
    engine.zoom([st], [engine.proposal_from_grid_boxes(st, [GridBox(x0, y0, x0 + bw, y0 + bh)])])
    engine.finish([st])
    engine.decode([st])


def _ask(
    engine: QZoomEngine, image_seed: int, query: str, options: AskOptions, quarter: int | None = None
) -> tuple[float, list[str]]:
    st = engine.new_state(bench_image_seeded(image_seed), query, options)
    start = time.perf_counter()
    answer(engine, st, quarter)
    seconds = time.perf_counter() - start
    boxes = [block.box.as_list() for block in st.blocks[1:]]
    return seconds, [*st.cache_hits, f"{st.zoom_steps} zoom steps", f"boxes {boxes}"]


def bench_image_seeded(seed: int) -> Any:
    """A distinct 1024x768 picture per seed (so a cold ask is really cold)."""
    image = bench_image()
    image.putpixel((seed % 1024, seed // 1024 % 768), (seed * 37 % 256, seed * 91 % 256, seed * 13 % 256))
    return image


_CHILD = """
import json, statistics, sys, time
from qzoom.agent import run
from qzoom.cache import FeatureCache
from qzoom.engine import QZoomEngine
from qzoom.evals.bench_followup import answer, bench_image_seeded, FIRST, SECOND
from qzoom.schemas import AskOptions
model_dir, url, repeats, opts_json, seen0, unseen0 = sys.argv[1:7]  # opts_json: [first, follow-up, quarters]
engine = QZoomEngine.from_pretrained(model_dir, cache=FeatureCache.from_url(url, secret=bytes.fromhex(sys.argv[7])))
o1, o2, quarters = json.loads(opts_json)
first, second = AskOptions.model_validate(o1), AskOptions.model_validate(o2)
q1, q2 = quarters or (None, None)
def ask(seed, query, opts, quarter):
    st = engine.new_state(bench_image_seeded(seed), query, opts)
    t = time.perf_counter(); answer(engine, st, quarter)
    return time.perf_counter() - t, [*st.cache_hits, f"{st.zoom_steps} zoom steps"]
ask(999_999, FIRST, first, q1)  # warm-up on an unrelated image: first-call costs out of the way
cold, warm, hits = [], [], []
for r in range(int(repeats)):
    cold.append(ask(int(unseen0) + r, FIRST, first, q1)[0])
    t, h = ask(int(seen0) + r, SECOND, second, q2)
    warm.append(t); hits.append(h)
print(json.dumps({"cold": statistics.median(cold), "warm": statistics.median(warm), "hits": hits[-1]}))
"""


@torch.no_grad()  # the whole benchmark, not the process: tests run after it
def run_followup_benchmark(
    *,
    layers: int = 28,
    split: int = 18,
    hidden: int = 256,
    tokens: int = 576,
    repeats: int = 5,
    new_tokens: int = 4,
    redis_url: str | None = None,
    echo: Callable[[str], Any] = print,
) -> dict[str, float]:
    engine = build_engine(layers, split, hidden)
    echo(
        f"model: random Qwen2.5-VL, L={layers} K={split} hidden={hidden}; {tokens}-token views; "
        f"answers of {new_tokens} tokens; {repeats} runs each"
    )
    echo(environment(engine))
    results: dict[str, float] = {}

    # 1. L1, same process.
    echo("\n1. follow-up vs cold, same process (L1)")
    for name, (opts, follow) in scenarios(tokens, new_tokens).items():
        engine.cache = FeatureCache.from_url(None)
        q1, q2 = REGIONS.get(name, (None, None))
        _ask(engine, 10_000, FIRST, opts, q1)  # warm-up
        cold: list[float] = []
        warm: list[float] = []
        moved = 0
        for r in range(repeats):
            t_cold, first = _ask(engine, 20_000 + r, FIRST, opts, q1)
            t_warm, hits = _ask(engine, 20_000 + r, SECOND, follow, q2)
            cold.append(t_cold)
            warm.append(t_warm)
            moved += first[-1] != hits[-1]
        ratio = statistics.median(cold) / statistics.median(warm)
        results[f"l1_{name}"] = ratio
        reused = ", ".join(sorted(h for h in set(hits) if not h.startswith("boxes")))
        if name != "gate closed":
            reused += f"; the follow-up's box differed from the first's in {moved}/{repeats} runs"
        echo(
            f"   {name:12s} cold {statistics.median(cold) * 1000:8.1f} ms   follow-up "
            f"{statistics.median(warm) * 1000:8.1f} ms   {ratio:5.2f}x faster   (reused: {reused})"
        )

    # 2. L2, a fresh process sharing Redis.
    server = None
    if redis_url is None and redis_server_binary() is not None:
        server = RedisServer(maxmemory="2gb", policy="allkeys-lru").start()
        redis_url = server.url
    if redis_url is None:
        echo("\n2. skipped: no Redis (pass --redis-url or install redis-server)")
        return results
    echo(f"\n2. follow-up in a fresh process vs cold there, shared Redis ({redis_url})")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = save_checkpoint(engine.model, engine.processor, Path(tmp) / engine.name)
            # Replicas share Redis values only when they share the HMAC secret (QZOOM_CACHE_SECRET).
            secret = os.urandom(16)
            parent = QZoomEngine.from_pretrained(model_dir, cache=FeatureCache.from_url(redis_url, secret=secret))
            for s, (name, (opts, follow)) in enumerate(scenarios(tokens, new_tokens).items()):
                seen0, unseen0 = 30_000 + 100 * s, 40_000 + 100 * s
                for r in range(repeats):
                    _ask(
                        parent, seen0 + r, FIRST, opts, REGIONS.get(name, (None, None))[0]
                    )  # fills Redis for the images the child follows up on
                both = json.dumps([opts.model_dump(), follow.model_dump(), REGIONS.get(name)])
                args = [model_dir, redis_url, repeats, both, seen0, unseen0, secret.hex()]
                out = subprocess.run(
                    [sys.executable, "-c", textwrap.dedent(_CHILD), *map(str, args)],
                    capture_output=True,
                    text=True,
                    check=True,
                    timeout=1800,
                )
                child = json.loads(out.stdout.strip().splitlines()[-1])
                ratio = child["cold"] / child["warm"]
                results[f"l2_{name}"] = ratio
                echo(
                    f"   {name:12s} cold {child['cold'] * 1000:8.1f} ms   follow-up {child['warm'] * 1000:8.1f} ms   "
                    f"{ratio:5.2f}x faster   (reused: {', '.join(sorted(set(child['hits'])))})"
                )
    finally:
        if server is not None:
            server.stop()
    echo("\ntargets: L1 >= 3x, L2 (fresh process) >= 2x")
    return results
