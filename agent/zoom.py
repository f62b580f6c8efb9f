"""Asking questions through the Q-Zoom graph: async for servers, sync for scripts, tests and the CLI.

    async with Worker(engine) as worker:
        result = await ask_one(worker, image, "What is the serial number?")

    results = ask(engine, images, questions)       # sync: a temporary worker, all requests concurrently

Concurrent requests are micro-batched by the worker at every step, so `ask` over N images runs batched.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence

from PIL import Image

from qzoom.agent.graph import run_graph
from qzoom.engine import QZoomEngine, SequenceState
from qzoom.schemas import AskOptions, AskResult, StepResult
from qzoom.worker import Worker

_ids = itertools.count(1)


def result(engine: QZoomEngine, st: SequenceState) -> AskResult:
    """The JSON contract for one finished request."""
    steps = []
    for block in st.blocks[1:]:
        # The gate score that opened step k is the k-th one computed for this request (forced steps have none).
        score = st.gate_scores[block.step - 1] if len(st.gate_scores) >= block.step else None
        steps.append(StepResult(box=block.box.as_list(), gate_score=score, visual_tokens=block.num_tokens))
    return AskResult(
        answer=st.answer,
        zoomed=len(st.blocks) > 1,
        gate_score=st.gate_scores[0] if st.gate_scores else None,
        steps=steps,
        visual_tokens=st.visual_tokens,
        timings_ms={k: round(v, 3) for k, v in st.timings_ms.items()},
        model=engine.name,
    )


async def run_states(worker: Worker, states: Sequence[SequenceState]) -> None:
    """Run prepared (or fresh) states through the graph concurrently, each holding a place in the worker."""

    async def one(st: SequenceState) -> None:
        with worker.admit():
            await run_graph(worker, st, f"r{next(_ids)}")

    await asyncio.gather(*(one(st) for st in states))


async def ask_one(
    worker: Worker, image: Image.Image, query: str, options: AskOptions | None = None, request_id: str | None = None
) -> AskResult:
    """Answer one question about one image; raises `Overloaded` at once when the worker is full."""
    with worker.admit():
        st = worker.engine.new_state(image, query, options)
        await run_graph(worker, st, request_id or f"r{next(_ids)}")
    return result(worker.engine, st)


def run(engine: QZoomEngine, states: Sequence[SequenceState], *, max_batch: int = 16) -> None:
    """Sync: run `states` through the graph on a temporary worker (all batched together where steps coincide).

    The model runs on the calling thread (`Worker(inline=True)`): nothing else needs serving meanwhile.
    """

    async def main() -> None:
        async with Worker(engine, max_pending=max(1, len(states)), max_batch=max_batch, inline=True) as worker:
            await run_states(worker, states)

    asyncio.run(main())


def ask(
    engine: QZoomEngine,
    images: Sequence[Image.Image],
    queries: Sequence[str],
    options: AskOptions | Sequence[AskOptions] | None = None,
) -> list[AskResult]:
    """Sync: answer `queries[i]` about `images[i]` for every i. `options` is shared or one per request."""
    if len(images) != len(queries):
        raise ValueError(f"got {len(images)} images but {len(queries)} queries; pass one query per image")
    per_request = list(options) if isinstance(options, Sequence) else [options or AskOptions()] * len(images)
    if len(per_request) != len(images):
        raise ValueError(f"got {len(per_request)} option sets for {len(images)} requests")
    states = [engine.new_state(img, q, o) for img, q, o in zip(images, queries, per_request, strict=True)]
    run(engine, states)
    return [result(engine, st) for st in states]
