"""The model worker: one owner of the engine on one device thread, fed by an asyncio queue with micro-batching.

    async with Worker(engine, max_pending=64) as worker:
        with worker.admit():                          # raises Overloaded at once when max_pending requests are in
            state = engine.new_state(image, query, options)
            await worker.call("observe", state)       # prepare + encode + prefill
            (p,) = await worker.call("gate", state)   # ...each call is one engine step for one request

Concurrent `call`s for the same step are collected for up to `batch_window_ms` (or until `max_batch`) and run as one
batched engine call on the device thread, so the graph of each request stays simple while the GPU sees batches.
Steps of different kinds are never mixed in one batch. A request whose task is cancelled while queued is dropped
before it reaches the device; its state is garbage once the caller lets go of it.

Never run more than one worker per device (nor `uvicorn --workers N` with N > 1): each would load its own model.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

from qzoom.engine import Proposal, QZoomEngine, SequenceState

Step = Literal["observe", "gate", "propose", "zoom", "answer", "finish", "generate", "append"]
STEPS: tuple[Step, ...] = ("observe", "gate", "propose", "zoom", "answer", "finish", "generate", "append")


class Overloaded(RuntimeError):
    """Too many requests in flight; try again after `retry_after_s` seconds."""

    def __init__(self, in_flight: int, retry_after_s: float) -> None:
        super().__init__(f"the worker has {in_flight} requests in flight, its limit; retry in {retry_after_s:.0f} s")
        self.retry_after_s = retry_after_s


@dataclass
class _Job:
    step: Step
    state: SequenceState
    arg: Any
    future: asyncio.Future[Any]


@dataclass
class WorkerStats:
    """Counters for metrics: batches run per step, requests per batch, refusals."""

    batches: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STEPS, 0))
    batched_calls: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STEPS, 0))
    refused: int = 0
    cancelled: int = 0
    last_batch_size: int = 0


class Worker:
    """Runs engine steps for many concurrent requests on one device thread, batching same-step calls."""

    def __init__(
        self,
        engine: QZoomEngine,
        *,
        max_pending: int = 64,
        max_batch: int = 8,
        batch_window_ms: float = 2.0,
        retry_after_s: float = 1.0,
        inline: bool = False,
    ) -> None:
        if max_pending < 1 or max_batch < 1:
            raise ValueError("max_pending and max_batch must be at least 1")
        self.engine = engine
        self.max_pending = max_pending
        self.max_batch = max_batch
        self.batch_window_s = batch_window_ms / 1000.0
        self.retry_after_s = retry_after_s
        # inline: run batches on the event loop's own thread. For scripts and the CLI (one caller, nothing else to
        # serve) this is faster on CPU, where torch ops on a second OS thread are markedly slower; a server keeps
        # the device thread so its event loop stays responsive while the model computes.
        self.inline = inline
        self.stats = WorkerStats()
        self._in_flight = 0
        self._lock = threading.Lock()
        self._queue: asyncio.Queue[_Job] | None = None
        self._held: deque[_Job] = deque()
        self._dispatcher: asyncio.Task[None] | None = None
        self._device = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qzoom-device")

    # -- lifecycle --------------------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._dispatcher is None:
            self._queue = asyncio.Queue()
            self._dispatcher = asyncio.create_task(self._dispatch(), name="qzoom-dispatcher")

    async def stop(self) -> None:
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._dispatcher
            self._dispatcher = None
        self._device.shutdown(wait=True)

    async def __aenter__(self) -> Worker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- admission ----------------------------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def queue_depth(self) -> int:
        return (self._queue.qsize() if self._queue else 0) + len(self._held)

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        """Hold one of `max_pending` places for the duration of a request; refuse at once when none is free."""
        with self._lock:
            if self._in_flight >= self.max_pending:
                self.stats.refused += 1
                raise Overloaded(self._in_flight, self.retry_after_s)
            self._in_flight += 1
        try:
            yield
        finally:
            with self._lock:
                self._in_flight -= 1

    # -- calls --------------------------------------------------------------------------------------------------

    async def call(self, step: Step, state: SequenceState, arg: Any = None) -> Any:
        """Run one engine step for one request (batched with concurrent calls of the same step)."""
        if self._queue is None:
            raise RuntimeError("the worker is not started; use `async with Worker(engine)`")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Job(step, state, arg, future))
        return await future

    async def _next_job(self) -> _Job:
        assert self._queue is not None
        return self._held.popleft() if self._held else await self._queue.get()

    async def _dispatch(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            first = await self._next_job()
            if first.future.cancelled():
                self.stats.cancelled += 1
                continue
            batch = [first]
            # Jobs held back from an earlier batch (another step's) join this one when they match it.
            for job in [j for j in self._held if j.step == first.step][: self.max_batch - 1]:
                self._held.remove(job)
                batch.append(job)
            deadline = loop.time() + self.batch_window_s
            while len(batch) < self.max_batch:
                if not self._queue.empty():
                    job = self._queue.get_nowait()
                else:
                    timeout = deadline - loop.time()
                    if timeout <= 0:
                        break
                    try:
                        job = await asyncio.wait_for(self._queue.get(), timeout=timeout)
                    except TimeoutError:
                        break
                if job.future.cancelled():
                    self.stats.cancelled += 1
                elif job.step == first.step:
                    batch.append(job)
                else:
                    self._held.append(job)
            self.stats.batches[first.step] += 1
            self.stats.batched_calls[first.step] += len(batch)
            self.stats.last_batch_size = len(batch)
            try:
                if self.inline:
                    results = self._run_batch(first.step, batch)
                else:
                    results = await loop.run_in_executor(self._device, self._run_batch, first.step, batch)
            except Exception as err:  # a failed batch fails each of its requests, never the dispatcher
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(err)
                continue
            for job, res in zip(batch, results, strict=True):
                if not job.future.done():
                    job.future.set_result(res)

    def _run_batch(self, step: Step, jobs: Sequence[_Job]) -> list[Any]:
        """On the device thread: one batched engine call for `jobs` (all of the same step)."""
        engine = self.engine
        states = [job.state for job in jobs]
        if step == "observe":
            engine.prepare([st for st in states if st.input_ids.numel() == 0])
            engine.encode(states)
            engine.prefill(states)
            return [None] * len(states)
        if step == "gate":
            return list(engine.gate(states))
        if step == "propose":
            return list(engine.propose(states))
        if step == "zoom":
            proposals: list[Proposal] = [job.arg for job in jobs]
            engine.zoom(states, proposals)
            return [None] * len(states)
        if step == "answer":
            engine.finish(states)
            engine.decode(states)
            return [st.answer for st in states]
        if step == "finish":  # layers >= K over the prompt, keeping the whole KV for a conversation
            engine.finish(states)
            return [None] * len(states)
        if step == "generate":  # arg: (stop strings, max new tokens); history kept for the next turn
            texts = engine.generate(
                states,
                stop_strings=[job.arg[0] for job in jobs],
                max_new_tokens=[job.arg[1] for job in jobs],
                keep_history=True,
            )
            return list(texts)
        if step == "append":  # arg: the pieces (text and ImagePiece) of the next turn
            engine.append(states, [job.arg for job in jobs])
            return [None] * len(states)
        raise ValueError(f"unknown step {step!r}; expected one of {', '.join(STEPS)}")
