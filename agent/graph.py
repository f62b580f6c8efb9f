"""The Q-Zoom loop as a LangGraph state machine: the one loop every entry point runs through.

    START -> observe -> gate -> propose -> zoom -> (gate | propose) ... -> answer -> END
               |          |         |                  |
               +----------+---------+------------------+-> answer  (gate closed, no box, max_steps reached)

- observe: preprocess the coarse view, vision tower, layers < K (cache hits skip the work).
- gate:    the gate's probability that the question needs detail; routes to propose when it is >= τ_gate.
- propose: the SD-RPN heatmap over the newest image and its box(es); routes to answer when no cell passes τ_roi.
           Its event carries the map (`heatmap`, rows of probabilities in [0, 1]), its `heatmap_grid` (rows, cols)
           and `heatmap_box`, the region of the original image in pixels that the map covers.
- zoom:    crop the original image, re-encode, splice, re-run layers < K on the new tail; loops while
           `max_steps` allows (gating the fused sequence again, or proposing again when zoom is forced).
- answer:  layers >= K and greedy decoding.

Graph state holds only ids, scores, boxes and counts (it can be checkpointed and streamed); the tensors live in the
request's `SequenceState`, which travels in the run-scoped context together with the worker that owns the model.
Every node emits one custom stream event `{"step", "request_id", ...}`; `stream_events` yields them, the answer last.
"""

from __future__ import annotations

import operator
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, TypedDict, cast

from langgraph.config import get_stream_writer
from langgraph.graph import END, START, StateGraph
from langgraph.graph.state import CompiledStateGraph
from langgraph.runtime import Runtime

from qzoom.engine import Proposal, SequenceState
from qzoom.roi import heatmap_rows
from qzoom.worker import Worker


class ZoomGraphState(TypedDict, total=False):
    request_id: str
    steps_done: int  # zoom steps completed
    gate_scores: Annotated[list[float], operator.add]
    boxes: Annotated[list[list[int]], operator.add]  # every zoomed box, original pixels, in order
    last_proposal_boxes: list[list[int]]
    answer: str


@dataclass
class ZoomContext:
    """Run-scoped, never checkpointed: the worker and this request's tensors."""

    worker: Worker
    seq: SequenceState
    pending: list[Proposal] = field(default_factory=list)


NodeName = Literal["observe", "gate", "propose", "zoom", "answer"]


def _emit(event: dict[str, Any]) -> None:
    get_stream_writer()(event)


def _next_after_observe_or_zoom(runtime: Runtime[ZoomContext], steps_done: int) -> NodeName:
    seq, engine = runtime.context.seq, runtime.context.worker.engine
    opts = seq.options
    if steps_done >= opts.max_steps or opts.force_zoom is False or not engine.has_rpn:
        return "answer"
    if opts.force_zoom is None and engine.has_gate:
        return "gate"
    return "propose"  # forced zoom, or an SD-RPN checkpoint without a gate (the paper's Stage-1/2 models)


async def observe(state: ZoomGraphState, runtime: Runtime[ZoomContext]) -> dict[str, Any]:
    start = time.perf_counter()
    seq = runtime.context.seq
    await runtime.context.worker.call("observe", seq)
    _emit(
        {
            "step": "observe",
            "request_id": state["request_id"],
            "visual_tokens": seq.visual_tokens,
            "grid": list(seq.blocks[0].grid_hw),
            "ms": round((time.perf_counter() - start) * 1000, 3),
        }
    )
    return {"steps_done": 0}


async def gate(state: ZoomGraphState, runtime: Runtime[ZoomContext]) -> dict[str, Any]:
    start = time.perf_counter()
    p = float(await runtime.context.worker.call("gate", runtime.context.seq))
    fires = p >= runtime.context.seq.gate_thresh
    _emit(
        {
            "step": "gate",
            "request_id": state["request_id"],
            "gate_score": p,
            "fires": fires,
            "ms": round((time.perf_counter() - start) * 1000, 3),
        }
    )
    return {"gate_scores": [p]}


async def propose(state: ZoomGraphState, runtime: Runtime[ZoomContext]) -> dict[str, Any]:
    start = time.perf_counter()
    proposal: Proposal = await runtime.context.worker.call("propose", runtime.context.seq)
    runtime.context.pending = [proposal]
    boxes = [b.as_list() for b in proposal.boxes]
    _emit(
        {
            "step": "propose",
            "request_id": state["request_id"],
            "boxes": boxes,
            "heatmap": heatmap_rows(proposal.prob),  # the same rows /v1/tools/propose returns
            "heatmap_peak": float(proposal.prob.max()),
            # Where the map lies: the scored image's region of the original, in pixels, and its (rows, cols).
            "heatmap_box": proposal.block.box.as_list(),
            "heatmap_grid": list(proposal.block.grid_hw),
            "on_step": proposal.block.step,
            "ms": round((time.perf_counter() - start) * 1000, 3),
        }
    )
    return {"last_proposal_boxes": boxes}


async def zoom(state: ZoomGraphState, runtime: Runtime[ZoomContext]) -> dict[str, Any]:
    start = time.perf_counter()
    seq = runtime.context.seq
    (proposal,) = runtime.context.pending
    await runtime.context.worker.call("zoom", seq, proposal)
    runtime.context.pending = []
    # Every box of the step, also those answered in a sequence of their own (`multi_box` "best").
    new_blocks = [b for st in (seq, *seq.alternatives) for b in st.blocks if b.step == seq.zoom_steps]
    boxes = [b.box.as_list() for b in new_blocks]
    _emit(
        {
            "step": "zoom",
            "request_id": state["request_id"],
            "zoom_step": seq.zoom_steps,
            "boxes": boxes,
            "visual_tokens": sum(b.num_tokens for b in new_blocks),
            "ms": round((time.perf_counter() - start) * 1000, 3),
        }
    )
    return {"steps_done": seq.zoom_steps, "boxes": boxes}


async def answer(state: ZoomGraphState, runtime: Runtime[ZoomContext]) -> dict[str, Any]:
    start = time.perf_counter()
    text = str(await runtime.context.worker.call("answer", runtime.context.seq))
    _emit(
        {"step": "answer", "request_id": state["request_id"], "answer": text,
         "ms": round((time.perf_counter() - start) * 1000, 3)}
    )  # fmt: skip
    return {"answer": text}


def route_after_observe(state: ZoomGraphState, runtime: Runtime[ZoomContext]) -> NodeName:
    return _next_after_observe_or_zoom(runtime, 0)


def route_after_gate(state: ZoomGraphState, runtime: Runtime[ZoomContext]) -> NodeName:
    return "propose" if state["gate_scores"][-1] >= runtime.context.seq.gate_thresh else "answer"


def route_after_propose(state: ZoomGraphState, runtime: Runtime[ZoomContext]) -> NodeName:
    return "zoom" if state.get("last_proposal_boxes") else "answer"


def route_after_zoom(state: ZoomGraphState, runtime: Runtime[ZoomContext]) -> NodeName:
    return _next_after_observe_or_zoom(runtime, state.get("steps_done", 0))


def build_zoom_graph() -> CompiledStateGraph[Any, Any, Any, Any]:
    """Compile the Q-Zoom graph (no checkpointer: a request runs start to end within one call)."""
    g = StateGraph(ZoomGraphState, context_schema=ZoomContext)
    g.add_node("observe", observe)
    g.add_node("gate", gate)
    g.add_node("propose", propose)
    g.add_node("zoom", zoom)
    g.add_node("answer", answer)
    g.add_edge(START, "observe")
    g.add_conditional_edges("observe", route_after_observe, ["gate", "propose", "answer"])
    g.add_conditional_edges("gate", route_after_gate, ["propose", "answer"])
    g.add_conditional_edges("propose", route_after_propose, ["zoom", "answer"])
    g.add_conditional_edges("zoom", route_after_zoom, ["gate", "propose", "answer"])
    g.add_edge("answer", END)
    return g.compile()


ZOOM_GRAPH = build_zoom_graph()


def _recursion_limit(seq: SequenceState) -> int:
    # observe + answer + 3 nodes (gate, propose, zoom) per step, with slack; LangGraph's default is 10007.
    return 3 * seq.options.max_steps + 8


async def run_graph(worker: Worker, seq: SequenceState, request_id: str) -> ZoomGraphState:
    """Run one request to its answer; returns the final graph state (the tensors stay in `seq`)."""
    config: Any = {"recursion_limit": _recursion_limit(seq)}
    final = await ZOOM_GRAPH.ainvoke(
        {"request_id": request_id}, config=config, context=ZoomContext(worker=worker, seq=seq)
    )
    return cast(ZoomGraphState, final)


async def stream_events(worker: Worker, seq: SequenceState, request_id: str) -> AsyncIterator[dict[str, Any]]:
    """Run one request and yield one event per graph step as it happens; the `answer` event comes last."""
    config: Any = {"recursion_limit": _recursion_limit(seq)}
    async for event in ZOOM_GRAPH.astream(
        {"request_id": request_id},
        config=config,
        context=ZoomContext(worker=worker, seq=seq),
        stream_mode="custom",
    ):
        yield event
