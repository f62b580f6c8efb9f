"""Agent loops that drive the Q-Zoom steps (`qzoom.agent`): the LangGraph zoom graph and the ask entry points.

from qzoom.agent import ask
results = ask(engine, [image], ["What is written on the sign?"])
"""

from __future__ import annotations

from qzoom.agent.graph import ZOOM_GRAPH, build_zoom_graph, run_graph, stream_events
from qzoom.agent.zoom import ask, ask_one, result, run, run_states

__all__ = [
    "ZOOM_GRAPH",
    "ask",
    "ask_one",
    "build_zoom_graph",
    "result",
    "run",
    "run_graph",
    "run_states",
    "stream_events",
]
