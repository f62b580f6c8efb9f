"""The LangGraph zoom graph and the micro-batching worker."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch
from transformers import Qwen2_5_VLConfig

from conftest import MAX_PIXELS, MIN_PIXELS
from qzoom.agent import ask_one, stream_events
from qzoom.engine import QZoomEngine
from qzoom.modeling import QZoomQwen2_5_VLForConditionalGeneration, enable_qzoom
from qzoom.offline import build_tokenizer, tiny_qwen25vl_config
from qzoom.schemas import AskOptions
from qzoom.worker import Overloaded, Worker

BUDGET = {"min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS}
QUESTIONS = ["What is written in the red box?", "hi", "What colour is the sky?", "How many boxes are there?"]
MIXED = [
    AskOptions(force_zoom=True, roi_thresh=0.1, max_new_tokens=5, **BUDGET),
    AskOptions(gate_thresh=1.0, max_new_tokens=5, **BUDGET),
    AskOptions(gate_thresh=0.0, roi_thresh=0.02, max_steps=2, max_new_tokens=5, **BUDGET),
    AskOptions(force_zoom=False, max_new_tokens=5, **BUDGET),
]


def comparable(res):
    return res.model_dump(exclude={"timings_ms"})


def test_concurrent_asks_are_batched_and_equal_sequential(engine, images):
    async def sequential():
        async with Worker(engine) as worker:
            return [await ask_one(worker, i, q, o) for i, q, o in zip(images, QUESTIONS, MIXED, strict=True)]

    async def concurrent():
        async with Worker(engine, max_batch=8, batch_window_ms=20) as worker:
            res = await asyncio.gather(
                *(ask_one(worker, i, q, o) for i, q, o in zip(images, QUESTIONS, MIXED, strict=True))
            )
            return res, worker.stats

    seq = asyncio.run(sequential())
    con, stats = asyncio.run(concurrent())
    assert stats.batched_calls["observe"] == 4 and stats.batches["observe"] == 1  # one batch of four
    assert sum(stats.batched_calls.values()) > sum(stats.batches.values())
    assert [r.zoomed for r in con] == [True, False, True, False]
    for a, b in zip(seq, con, strict=True):
        assert a.answer == b.answer and a.steps == b.steps
        assert (
            a.gate_score == pytest.approx(b.gate_score, abs=1e-5) if a.gate_score is not None else b.gate_score is None
        )


def test_stream_emits_one_event_per_step_answer_last(engine, images):
    async def collect():
        async with Worker(engine) as worker:
            st = engine.new_state(images[3], QUESTIONS[3], MIXED[2])
            return [e async for e in stream_events(worker, st, "req-1")], st

    events, st = asyncio.run(collect())
    names = [e["step"] for e in events]
    assert names == ["observe", "gate", "propose", "zoom", "gate", "propose", "zoom", "answer"]
    assert all(e["request_id"] == "req-1" for e in events)
    assert events[-1]["answer"] == st.answer
    zooms = [e for e in events if e["step"] == "zoom"]
    assert [z["boxes"][0] for z in zooms] == [b.box.as_list() for b in st.blocks[1:]]
    json.dumps(events)  # events are plain JSON: no tensors leak out of the graph


def test_max_steps_bounds_the_loop(engine, images):
    async def go(max_steps):
        async with Worker(engine) as worker:
            opts = AskOptions(gate_thresh=0.0, roi_thresh=0.0, max_steps=max_steps, max_new_tokens=2, **BUDGET)
            st = engine.new_state(images[0], "q", opts)
            return [e["step"] async for e in stream_events(worker, st, "r")]

    for max_steps in (0, 1, 3):
        names = asyncio.run(go(max_steps))
        assert names.count("zoom") == max_steps and names.count("gate") == max_steps
        assert names[0] == "observe" and names[-1] == "answer"


def test_full_worker_refuses_at_once_and_frees_places(engine):
    async def go():
        worker = Worker(engine, max_pending=1)
        with worker.admit():
            with pytest.raises(Overloaded) as err, worker.admit():
                pass
            assert err.value.retry_after_s > 0
        with worker.admit():  # the place was freed
            assert worker.in_flight == 1
        assert worker.in_flight == 0 and worker.stats.refused == 1

    asyncio.run(go())


def test_cancelled_request_frees_its_place_and_others_proceed(engine, images):
    async def go():
        async with Worker(engine, max_pending=2) as worker:
            slow = asyncio.create_task(ask_one(worker, images[0], "q", AskOptions(max_new_tokens=64, **BUDGET)))
            await asyncio.sleep(0)  # queued, not yet finished
            slow.cancel()
            with pytest.raises(asyncio.CancelledError):
                await slow
            assert worker.in_flight == 0
            ok = await ask_one(worker, images[1], "hi", AskOptions(force_zoom=False, max_new_tokens=2, **BUDGET))
            return ok

    assert asyncio.run(go()).zoomed is False


def test_stage1_checkpoint_without_gate_always_proposes(processor, images):
    torch.manual_seed(0)
    config: Qwen2_5_VLConfig = enable_qzoom(
        tiny_qwen25vl_config(build_tokenizer()), twig_K=2, twig_T=2, enable_high_res=False
    )
    engine = QZoomEngine(QZoomQwen2_5_VLForConditionalGeneration(config).eval(), processor)
    assert engine.has_rpn and not engine.has_gate

    async def go():
        async with Worker(engine) as worker:
            st = engine.new_state(images[0], "q", AskOptions(roi_thresh=0.0, max_new_tokens=2, **BUDGET))
            return [e["step"] async for e in stream_events(worker, st, "r")]

    assert asyncio.run(go()) == ["observe", "propose", "zoom", "answer"]


def test_stock_model_without_branches_answers_directly(processor, images):
    torch.manual_seed(0)
    model = QZoomQwen2_5_VLForConditionalGeneration(tiny_qwen25vl_config(build_tokenizer())).eval()
    engine = QZoomEngine(model, processor)

    async def go():
        async with Worker(engine) as worker:
            return await ask_one(worker, images[0], "q", AskOptions(max_new_tokens=2, **BUDGET))

    res = asyncio.run(go())
    assert res.zoomed is False and res.gate_score is None and res.steps == []
