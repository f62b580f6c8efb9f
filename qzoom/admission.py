"""Admission before work: what a request will cost, from its image header and options, admitted against a
per-process budget before anything is decoded or computed.

    costs = CostModel.for_engine(engine, settings)
    cost = costs.ask(header_wh, decode_bytes, options)     # RequestTooCostly (422/413) past a per-request cap
    with budget.admit(cost):                               # OverBudget (503 + Retry-After) while the budget is full
        image = load_image(data)                           # decoding runs under the same bound
        ...

Cost model (an upper bound, counted before the work):

* `tokens_per_view` = the visual tokens of one view: the image's pixels clamped into the request's pixel budget
  (`min_pixels`..`max_pixels`, resolved by the engine: request, then checkpoint, then paper), over 28x28 pixels a
  token. Every crop is re-encoded at the same budget and has at most the image's pixels, so no view has more.
* `views` = 1 (the coarse view) + `zoom_views`, where `zoom_views` = max_steps x boxes per step (0 with
  `force_zoom` false); a thinking loop has one view per turn.
* `visual_tokens` = views x tokens_per_view; `sequences` = the boxes of a step with `multi_box` "best" (each box is
  answered in its own sequence), else 1.
* `token_steps` = visual_tokens + `DECODE_WEIGHT` x max_new_tokens x sequences: the prefill and the decode steps the
  request may run (a decoded token costs a full pass over the weights; `DECODE_WEIGHT` states how many prefill tokens
  it is worth).
* `memory` = the bytes decoding the image allocates (`qzoom.guards.decode_cost_bytes`), held until the request ends
  (the decoded pixels stay in the request's state); 0 for an image that is already decoded (an `image_id`).

Per-request caps (`QZOOM_MAX_NEW_TOKENS`, `QZOOM_MAX_ZOOM_VIEWS`, `QZOOM_MAX_VISUAL_TOKENS`) refuse a request past
them with `RequestTooCostly` (422 `request_too_costly`, naming the cap and the setting), and one whose image alone
needs more memory than the whole budget with `ImageTooLarge` (413): neither could ever be admitted. The per-process
`Budget` (`QZOOM_BUDGET_TOKENS` token-steps, `QZOOM_BUDGET_DECODE_MB` of image memory) is shared by everything in
flight; a request that does not fit now gets `OverBudget`, an `Overloaded` (503 with Retry-After).
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from PIL import Image

from qzoom.guards import ImageTooLarge, InputError
from qzoom.schemas import PIXELS_PER_TOKEN, AskOptions
from qzoom.worker import Overloaded

if TYPE_CHECKING:
    from qzoom.engine import QZoomEngine
    from qzoom.settings import Settings

MiB = 1 << 20
# A decoded token is one pass over every weight for one position, a prefill token a share of a batched pass; on the
# demo model on CPU one decode step took about as long as prefilling 8 tokens (`qzoom bench abuse` measures the
# resulting ratios).
DECODE_WEIGHT = 8
_PLACEHOLDER = Image.new("RGB", (1, 1))


class RequestTooCostly(InputError):
    """One request asks for more than a per-request cap allows."""

    status = 422
    code = "request_too_costly"


class OverBudget(Overloaded):
    """The requests in flight leave no room for this one now; retry after `retry_after_s`."""

    def __init__(self, what: str, retry_after_s: float) -> None:
        wait = max(1, math.ceil(retry_after_s))
        RuntimeError.__init__(self, f"the server is at its {what} budget; retry in {wait} s")
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class Cost:
    """What one request may use: token-steps of model work and bytes of image memory."""

    token_steps: int
    memory: int
    visual_tokens: int = 0
    zoom_views: int = 0


@dataclass(frozen=True)
class CostModel:
    """Per-request costs and caps for one engine (its checkpoint's budgets resolve the request's defaults)."""

    engine: QZoomEngine
    max_new_tokens: int
    max_zoom_views: int
    max_visual_tokens: int
    max_memory: int

    @classmethod
    def for_engine(cls, engine: QZoomEngine, settings: Settings) -> CostModel:
        return cls(
            engine=engine,
            max_new_tokens=settings.max_new_tokens,
            max_zoom_views=settings.max_zoom_views,
            max_visual_tokens=settings.max_visual_tokens,
            max_memory=int(settings.budget_decode_mb * MiB),
        )

    def _tokens_per_view(self, pixels: int, min_pixels: int, max_pixels: int) -> int:
        return math.ceil(min(max(pixels, min_pixels), max_pixels) / PIXELS_PER_TOKEN)

    def _check(self, cost: Cost, new_tokens: int, new_tokens_name: str) -> Cost:
        if new_tokens > self.max_new_tokens:
            raise RequestTooCostly(
                f"{new_tokens_name}: {new_tokens}; at most {self.max_new_tokens} are accepted (QZOOM_MAX_NEW_TOKENS)"
            )
        if cost.zoom_views > self.max_zoom_views:
            raise RequestTooCostly(
                f"max_steps x boxes per step: {cost.zoom_views} zoom views; at most {self.max_zoom_views} are "
                "accepted (QZOOM_MAX_ZOOM_VIEWS); lower max_steps or max_boxes"
            )
        if cost.visual_tokens > self.max_visual_tokens:
            raise RequestTooCostly(
                f"the request may prefill {cost.visual_tokens} visual tokens over all its views; at most "
                f"{self.max_visual_tokens} are accepted (QZOOM_MAX_VISUAL_TOKENS); lower max_pixels, max_steps or "
                "max_boxes"
            )
        if cost.memory > self.max_memory:
            raise ImageTooLarge(
                f"decoding the image needs {cost.memory // MiB} MiB, more than the server's whole image budget of "
                f"{self.max_memory // MiB} MiB (QZOOM_BUDGET_DECODE_MB); send a smaller image"
            )
        return cost

    def ask(self, image_wh: tuple[int, int], memory: int, options: AskOptions, query: str = "") -> Cost:
        """The cost of one Q-Zoom ask (`POST /ask`, the graph) on an image of `image_wh`, or `RequestTooCostly`."""
        # The engine resolves the request's budgets exactly as it will for the real request (request, checkpoint,
        # paper); the placeholder image is never read.
        st = self.engine.new_state(_PLACEHOLDER, query or "?", options)
        per_view = self._tokens_per_view(image_wh[0] * image_wh[1], st.min_pixels, st.max_pixels)
        boxes = max(1, st.max_boxes)
        zoom_views = 0 if options.force_zoom is False else options.max_steps * boxes
        sequences = boxes if st.multi_box == "best" and boxes > 1 and zoom_views else 1
        visual = (1 + zoom_views) * per_view
        steps = visual + DECODE_WEIGHT * options.max_new_tokens * sequences
        return self._check(Cost(steps, memory, visual, zoom_views), options.max_new_tokens, "max_new_tokens")

    def look(
        self, image_wh: tuple[int, int], memory: int, *, views: int = 1, new_tokens: int = 0, turns: int = 1
    ) -> Cost:
        """The cost of `views` views of the image at the checkpoint's budget and `turns` turns of up to `new_tokens`
        decoded tokens each (the gate and propose tools: one view, nothing decoded; a thinking loop: one view and one
        turn per zoom call). A thinking loop's views are bounded by its turns and the visual-token cap, not by
        `QZOOM_MAX_ZOOM_VIEWS` (which counts the steps x boxes of the Q-Zoom graph)."""
        st = self.engine.new_state(_PLACEHOLDER, "?")
        per_view = self._tokens_per_view(image_wh[0] * image_wh[1], st.min_pixels, st.max_pixels)
        visual = views * per_view
        cost = Cost(visual + DECODE_WEIGHT * new_tokens * turns, memory, visual, 0)
        return self._check(cost, new_tokens, "max_new_tokens")

    def image_only(self, memory: int) -> Cost:
        """Decoding (and holding) an image, no model work: an upload, a crop at a given box."""
        return self._check(Cost(0, memory), 0, "max_new_tokens")

    def default_ask(self) -> Cost:
        """The cost of a default request (`AskOptions()`) on an image at least as large as the pixel budget: the
        unit in which the documented worst-case multiple is stated."""
        st = self.engine.new_state(_PLACEHOLDER, "?")
        side = math.isqrt(st.max_pixels) + 1
        return self.ask((side, side), 0, AskOptions())


class Budget:
    """The per-process budget of token-steps and image memory shared by every request in flight (thread-safe)."""

    def __init__(self, token_steps: int, memory: int, retry_after_s: float = 1.0) -> None:
        self.token_steps = token_steps
        self.memory = memory
        self.retry_after_s = retry_after_s
        self.used_steps = 0
        self.used_memory = 0
        self.refused = 0
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> Budget:
        return cls(settings.budget_tokens, int(settings.budget_decode_mb * MiB), settings.retry_after_s)

    @contextlib.contextmanager
    def admit(self, cost: Cost) -> Iterator[None]:
        """Hold `cost` for the duration of the block; `OverBudget` at once when it does not fit now."""
        if cost.token_steps > self.token_steps:
            raise RequestTooCostly(
                f"the request may run {cost.token_steps} token-steps, more than the server's whole budget of "
                f"{self.token_steps} (QZOOM_BUDGET_TOKENS)"
            )
        with self._lock:
            if self.used_steps + cost.token_steps > self.token_steps:
                self.refused += 1
                raise OverBudget("token-step", self.retry_after_s)
            if self.used_memory + cost.memory > self.memory:
                self.refused += 1
                raise OverBudget("image memory", self.retry_after_s)
            self.used_steps += cost.token_steps
            self.used_memory += cost.memory
        try:
            yield
        finally:
            with self._lock:
                self.used_steps -= cost.token_steps
                self.used_memory -= cost.memory
