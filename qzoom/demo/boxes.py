"""Box settings of a trained checkpoint: τ_roi and boxes per zoom step, picked by the answers they lead to.

Contract of :func:`calibrate_boxes` (``qzoom train boxes``): every candidate setting ``(τ_roi, boxes)`` of
:attr:`BoxConfig.candidates` answers every item after one *forced* zoom step through the engine's own steps
(prepare, encode, prefill, propose, zoom, finish, decode: exactly the inference path, gate bypassed), and a judge
scores each answer against the item's reference answer. The candidates are taken in order, the paper's setting
first: a later one replaces the choice so far only when it answers more than ``min_gain`` of the items more right,
so that a difference within the noise of a few items keeps the setting nearer the paper. :func:`write_box_settings`
records the choice in the checkpoint's ``config.json`` (``roi_thresh``, ``max_boxes``, the box mode they were scored in:
the paper's union for one box, components for more, no peak fraction; ``multi_box``, whether several boxes were
answered in one sequence or one sequence each, :attr:`BoxConfig.multi_box`; and every candidate's score in
``qzoom_training``), from where the engine takes its defaults; a request's own ``roi_thresh`` / ``max_boxes`` still
override them.

Only the reference *answers* are read, never a box of the data: like Stage 1, this stays self-supervised.

Why it exists: the paper's proposal is one box around every cell above τ_roi. A map that lights the target and a few
look-alikes beside it (the demo model's SD-RPN finds plates better than it picks the named one) then gives one box
over most of the image, and the crop is re-encoded at the coarse budget again. One box per connected component at a
higher threshold crops each candidate tightly and lets the answer pass pick among them. Which setting is better
depends on the checkpoint, so it is measured, not assumed; on a checkpoint where the paper's box wins, it stays.
Forced zoom on the questions that need it does not see what tight boxes cost on the other questions the gate zooms
on: measure the gated pipeline on held-out items before shipping a choice (on the demo model the gain on train items
did not carry to the test split, and zoomed count questions lost; docs/demo_model.md).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from tqdm.auto import tqdm

from qzoom.roi import BoxMode
from qzoom.schemas import MultiBox
from qzoom.train.common import (
    TrainingError,
    TrainItem,
    answer_batch,
    items_fingerprint,
    load_frozen,
    make_engine,
    update_config,
)
from qzoom.train.labels import Judge, exact_match_judge

# The paper's box first (τ_roi 0.1, the official default; one box), then components at higher thresholds.
DEFAULT_CANDIDATES: tuple[tuple[float, int], ...] = ((0.1, 1), (0.2, 2), (0.3, 2), (0.2, 3), (0.3, 3))


class BoxConfig(BaseModel):
    """What :func:`calibrate_boxes` tries and how it runs the model."""

    model_config = ConfigDict(extra="forbid")

    candidates: list[tuple[float, int]] = Field(
        default_factory=lambda: list(DEFAULT_CANDIDATES),
        min_length=1,
        description="(τ_roi, boxes per step) pairs in order of preference, the paper's first (see min_gain)",
    )
    min_gain: float = Field(
        0.03, ge=0.0, le=1.0, description="share of the items a later candidate must answer better to be chosen"
    )
    multi_box: MultiBox = Field(
        "joint", description="how a candidate's several boxes are answered: joint (one sequence) or best (one each)"
    )
    batch_size: int = Field(8, ge=1, description="items answered together")
    max_new_tokens: int = Field(32, ge=1, le=1024, description="answer length limit")
    min_pixels: int | None = Field(None, ge=784, description="lower pixel budget of each view (default: checkpoint)")
    max_pixels: int | None = Field(None, ge=784, description="upper pixel budget of each view (default: checkpoint)")
    device: str = Field("cpu", description="cpu, cuda, cuda:1, ...")
    progress: bool = Field(True, description="a tqdm progress bar on stderr")

    @field_validator("candidates")
    @classmethod
    def _in_range(cls, candidates: list[tuple[float, int]]) -> list[tuple[float, int]]:
        for thresh, boxes in candidates:
            if not 0.0 <= thresh <= 1.0 or not 1 <= boxes <= 8:
                raise ValueError(f"candidate {thresh:g}:{boxes}: τ_roi must lie in [0, 1] and boxes in 1..8")
        return candidates


class BoxCalibration(BaseModel):
    """Every candidate's number of right answers on the same items, and the chosen setting."""

    roi_thresh: float
    max_boxes: int
    multi_box: MultiBox = "joint"  # how the candidates with several boxes were answered
    items: int
    right: dict[str, int]  # "τ_roi/boxes" -> right answers
    data: str  # fingerprint of the items

    def as_record(self) -> dict[str, Any]:
        return {"stage": "boxes", **self.model_dump()}


def _key(thresh: float, boxes: int) -> str:
    return f"{thresh:g}/{boxes}"


def _mode(boxes: int) -> BoxMode:
    """A candidate's boxes whatever the checkpoint recorded before: one is the paper's union, more are components."""
    return "union" if boxes == 1 else "components"


def calibrate_boxes(
    model_dir: str | Path,
    items: Sequence[TrainItem],
    config: BoxConfig | None = None,
    *,
    judge: Judge = exact_match_judge,
) -> BoxCalibration:
    """Score each candidate by forced-zoom answers on ``items`` and pick the best (see the module docstring)."""
    from qzoom.schemas import AskOptions

    config = config or BoxConfig()
    if not items:
        raise TrainingError("box calibration needs at least one item with a reference answer")
    # The engine's in-process feature cache serves every candidate after the first the same coarse view.
    engine = make_engine(*load_frozen(model_dir, config.device))
    if not engine.has_rpn:
        raise TrainingError(f"{model_dir} has no SD-RPN (twig layers): there are no boxes to calibrate")

    right: dict[str, int] = {}
    bar = tqdm(total=len(items) * len(config.candidates), desc="boxes", unit="item", disable=not config.progress)
    with torch.inference_mode():
        for thresh, boxes in config.candidates:
            options = AskOptions(
                roi_thresh=thresh,
                max_boxes=boxes,
                box_mode=_mode(boxes),
                roi_peak_frac=0.0,
                multi_box=config.multi_box,
                force_zoom=True,
                min_pixels=config.min_pixels,
                max_pixels=config.max_pixels,
                max_new_tokens=config.max_new_tokens,
            )
            count = 0
            for start in range(0, len(items), config.batch_size):
                batch = list(items[start : start + config.batch_size])
                for item, answer in zip(batch, answer_batch(engine, batch, options, zoom=True), strict=True):
                    # An unparsable judge reply counts as wrong, for every candidate alike.
                    with contextlib.suppress(ValueError):
                        count += judge(item.question, item.answer, answer, answer)[0]
                bar.update(len(batch))
            right[_key(thresh, boxes)] = count
            bar.set_postfix({_key(thresh, boxes): count})
    bar.close()
    best = config.candidates[0]
    for candidate in config.candidates[1:]:
        if right[_key(*candidate)] > right[_key(*best)] + config.min_gain * len(items):
            best = candidate
    return BoxCalibration(
        roi_thresh=best[0],
        max_boxes=best[1],
        multi_box=config.multi_box,
        items=len(items),
        right=right,
        data=items_fingerprint(items),
    )


def write_box_settings(model_dir: str | Path, calibration: BoxCalibration) -> Path:
    """Record the chosen ``roi_thresh`` and ``max_boxes`` (and the scores) in ``model_dir/config.json``, with the box
    mode and the way several boxes were answered when they were scored (``box_mode``, ``roi_peak_frac`` 0,
    ``multi_box``), replacing any the checkpoint recorded before."""
    settings = {
        "roi_thresh": calibration.roi_thresh,
        "max_boxes": calibration.max_boxes,
        "box_mode": _mode(calibration.max_boxes),
        "roi_peak_frac": 0.0,
        "multi_box": calibration.multi_box,
    }
    return update_config(model_dir, settings, calibration.as_record())
