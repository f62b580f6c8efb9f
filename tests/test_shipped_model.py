"""The shipped demo model `qzoom-tiny`: it is there, it is what its card says, and it still does what it did.

A regression guard on the artifact (not a measurement: `qzoom eval demo --items 300 --card` made the numbers in
`qzoom/models/qzoom-tiny/MODEL_CARD.md`). The same evaluation runs here on the first test items, and each bound sits
below what the card reports, by more than the sampling noise of this many items. Where the checkpoint misses a target
of the issue (Q-Zoom detail accuracy >= 85%) the bound is what it does reach, so that a retrained checkpoint that does
worse fails here; the card says which targets are missed.
"""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from qzoom.demo.model import BaseRecipe
from qzoom.demo.pipeline import DemoRecipe
from qzoom.evals.demo import DemoReport, evaluate_demo, uncached_engine
from qzoom.models import DEMO_MODEL, default_model_dir

ITEMS = 70  # 50 detail questions, 20 coarse ones (the seven families round-robin)
# Bounds below the card's numbers (300 items) by more than the sampling noise of ITEMS; measured here: see each test.
COARSE_RIGHT = 0.70  # 75% on these items
DETAIL_ZOOMED = 0.55  # 68% on these items
DETAIL_GAIN = 0.45  # 62 points on these items
GATE_FIRES = 0.80  # 98% of 47 questions on these items


@pytest.fixture(scope="module")
def report() -> DemoReport:
    return evaluate_demo(uncached_engine(default_model_dir()), ITEMS, budgets=())


def test_the_package_ships_the_demo_model_with_its_card():
    assert default_model_dir() == DEMO_MODEL
    config = json.loads((DEMO_MODEL / "config.json").read_text())
    assert config["enable_twig"] and config["enable_high_res"]  # SD-RPN and gate
    assert config["qzoom_stage1_heads"]["grounding"]  # Stage 1 recorded the heads it distilled from
    # The base was trained by the recipe `qzoom train demo` runs today, so that the command reproduces it.
    assert config["qzoom_base_recipe"] == json.loads(json.dumps(asdict(BaseRecipe())))
    # The boxes are the recipe's (written by `qzoom train demo`), not left from a calibration or a hand edit.
    recipe = DemoRecipe()
    assert (config["box_mode"], config["max_boxes"], config["roi_peak_frac"], config["multi_box"]) == (
        recipe.box_mode,
        recipe.max_boxes,
        recipe.roi_peak_frac,
        recipe.multi_box,
    )
    # So is the gate's threshold: the last one written was chosen by the recipe's rule, and it is the one served.
    (*_, threshold) = [record["threshold"] for record in config["qzoom_training"] if "threshold" in record]
    assert threshold["rule"] == recipe.stage3.high_res_thresh and threshold["value"] == config["high_res_thresh"]
    assert threshold["rule"] != "recall" or threshold["recall"] == recipe.stage3.gate_recall
    # With the recipe's bound on the right answers fired on, too; the shipped run's calibration met both bounds.
    bound = recipe.stage3.gate_max_fpr
    assert bound is None or (threshold["max_fpr"] == bound and threshold["fpr"] <= bound)
    training = json.loads((DEMO_MODEL / "training.json").read_text())
    assert training["command"] == "qzoom train demo" and set(training["seconds"]) == {
        "base",
        "stage1",
        "stage2",
        "stage3",
    }
    card = (DEMO_MODEL / "MODEL_CARD.md").read_text()
    assert "qzoom eval demo --items 300" in card and "## Status" in card


def test_the_coarse_view_fails_on_detail_and_answers_coarse_questions(report):
    assert report.accuracy("coarse@256", "detail") <= 0.40  # the bound: detail is lost at this budget
    assert report.accuracy("coarse@256", "coarse") >= COARSE_RIGHT  # the card: 80% of colour and count, here 75%


def test_zooming_reads_details_the_coarse_view_cannot(report):
    # The issue asks 85%, which this checkpoint misses (the card: 64.7% against 10.7% on the coarse view); the bound
    # is what it does reach, so that a retrained checkpoint that zooms worse fails here.
    qzoom, coarse = report.accuracy("qzoom@256", "detail"), report.accuracy("coarse@256", "detail")
    assert qzoom >= DETAIL_ZOOMED and qzoom - coarse >= DETAIL_GAIN


def test_the_gate_fires_on_detail_and_skips_most_coarse_right_questions(report):
    # The issue asks 90%; the card: 96.9%. A bound below it by more than the noise of ~45 questions.
    assert report.gate_fire_rate() >= GATE_FIRES
    assert report.gate_skip_rate() >= 0.60  # the bound is 70%; the card: 74.7%, here 83%


def test_the_sd_rpn_box_holds_the_target(report):
    assert report.rpn_hit_rate() >= 0.85  # the bound; the card: 91.6%, here 92%
    assert report.rpn_box_share() < 0.10  # boxes around plates, not the image (the card: median 2.5%, here 2.5%)


def test_zooming_costs_one_view_more_at_most_and_keeps_the_coarse_answers(report):
    # A zoom step re-encodes up to two regions (the checkpoint's `max_boxes`), each at most at the coarse view's budget
    # and mostly far below it (small boxes), and the answer is read beside one of them (`multi_box` best); the gate
    # leaves about a third of the questions unzoomed: on these items 1.50x the coarse view's tokens in the final
    # sequences (the card: 359 against 240 a question).
    assert sum(report.runs["qzoom@256"].visual_tokens) <= 2 * sum(report.runs["coarse@256"].visual_tokens)
    assert report.accuracy("qzoom@256", "coarse") >= COARSE_RIGHT  # the card: 77.6%, here 80%
