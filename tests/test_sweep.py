"""The accuracy/throughput sweep through the real graph (tiny random model): the paper's thresholds and budgets, the
baselines (no zoom, ViCrop-style attention crop, oracle box), resumable JSONL, the summary and the Pareto plots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from qzoom import roi
from qzoom.evals import benchmarks
from qzoom.evals.benchmarks import Sample
from qzoom.evals.plots import pareto_front, plot_sweep, summary_points
from qzoom.evals.sweep import (
    SweepError,
    format_summary,
    paper_configs,
    paper_min_tokens,
    paper_thresholds,
    run_batch,
    summarize,
    sweep,
    vicrop_box,
)


def test_paper_thresholds_and_budgets_follow_the_official_scripts():
    get = benchmarks.get
    assert paper_thresholds(get("textvqa"), 576) == (0.15, 0.05)
    assert paper_thresholds(get("docvqa"), 576) == (0.125, 0.05)
    assert paper_thresholds(get("docvqa"), 2048) == (0.04, 0.02)  # "Tab2" from 2048 tokens up
    assert paper_thresholds(get("vstar"), 576) == (0.03, 0.02)
    assert paper_thresholds(get("hrbench8k"), 576) == (0.04, 0.02)
    assert paper_thresholds(get("synthetic"), 576) == (None, None)  # the checkpoint's own
    assert paper_min_tokens(get("ocrbench"), 576) == 128
    assert paper_min_tokens(get("chartqa"), 256) == 128
    assert paper_min_tokens(get("chartqa"), 576) == 256
    assert paper_min_tokens(get("mme-realworld-lite"), 4096) == 512
    configs = paper_configs(get("vstar"), methods=["baseline", "qzoom", "vicrop"], scale=0.25)
    names = [c.name for c in configs]
    assert names == [
        "baseline@144", "baseline@256", "baseline@512", "baseline@1024",
        "qzoom@64", "qzoom@96", "qzoom@144", "qzoom@256", "qzoom@512", "qzoom@1024",
        "vicrop@64",
    ]  # fmt: skip
    qz4096 = configs[-2]
    assert (qz4096.paper_tokens, qz4096.min_tokens, qz4096.roi_thresh) == (4096, 128, 0.03)  # 512 scaled by 1/4
    assert configs[0].options(16).force_zoom is False and configs[4].options(16).force_zoom is None
    with pytest.raises(SweepError, match="ground-truth"):
        paper_configs(get("vstar"), methods=["oracle"])
    with pytest.raises(SweepError, match="unknown method"):
        paper_configs(get("vstar"), methods=["zoomy"])


def test_vicrop_box_covers_the_cells_near_the_peak():
    rel = torch.zeros(6, 8)
    rel[2, 5] = 4.0
    rel[3, 6] = 2.5
    rel[0, 0] = 1.0  # below half the peak
    assert vicrop_box(rel) == roi.GridBox(5, 2, 7, 4)


def _samples(n: int) -> list[Sample]:
    """Small pictures with a box and an answer, shaped like the synthetic benchmark's samples (its own canvases are
    896-4096 px: slow to draw for a test)."""
    out = []
    for i in range(n):
        image = Image.new("RGB", (224 + 28 * i, 168), (200, 200, 210))
        ImageDraw.Draw(image).rectangle((20, 30, 80, 70), fill=(200, 0, 0))
        out.append(
            Sample("synthetic", f"s{i}", f"s{i}", "What colour is the box?", lambda im=image: im, "red",
                   {"detail": i % 2 == 0}, (20, 30, 80, 70))
        )  # fmt: skip
    return out


def test_sweep_runs_every_method_resumes_and_summarises(engine, tmp_path: Path):
    bench = benchmarks.get("synthetic")
    samples = _samples(3)
    configs = paper_configs(
        bench, methods=["baseline", "qzoom", "vicrop", "oracle"], baseline_budgets=[32, 64], qzoom_budgets=[32]
    )
    kept = sweep(engine, bench, samples, configs, tmp_path, batch_size=2)
    lines = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(lines) == 3 * len(configs)
    by = {(r["config"], r["sample"]): r for r in lines}
    for s in samples:
        assert not by[("baseline@32", s.id)]["zoomed"]
        assert by[("oracle@32", s.id)]["zoomed"] and by[("vicrop@32", s.id)]["zoomed"]  # always one crop
        # a crop adds its tokens to the global view's
        assert by[("oracle@32", s.id)]["visual_tokens"] > by[("baseline@32", s.id)]["visual_tokens"]
    assert {r["batch_size"] for r in lines} == {2, 1}  # batched: chunks of 2, then the rest

    # Resumable: a rerun finds every pair done and appends nothing.
    sweep(engine, bench, samples, configs, tmp_path, batch_size=2)
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == len(lines)

    summary = summarize(bench, kept, tmp_path)
    assert set(summary["configs"]) == {c.name for c in configs}
    base = summary["configs"]["baseline@64"]
    assert base["samples"] == 3 and base["zoom_rate"] == 0.0 and base["samples_per_s"] > 0
    assert base["latency_p95_s"] >= base["latency_p50_s"] > 0
    assert summary["run"]["threads"] == torch.get_num_threads() and summary["run"]["commit"]
    table = format_summary(summary)
    assert "| oracle@32 |" in table and "torch threads" in table
    paths = plot_sweep(summary_points(summary), "tiny", tmp_path, "synthetic")
    assert [p.name for p in paths] == ["synthetic-throughput.png", "synthetic-tokens.png"]
    assert all(p.stat().st_size > 10_000 for p in paths)


def test_run_batch_scores_with_the_benchmarks_metric(engine, tmp_path: Path):
    bench = benchmarks.get("synthetic")
    (s,) = list(benchmarks.load("synthetic", None, limit=1))  # a real synthetic item
    (config,) = paper_configs(bench, methods=["baseline"], baseline_budgets=[32])
    (record,) = run_batch(engine, config, bench, [s])
    assert record["score"] == bench.score(s, record["prediction"])


def test_pareto_front():
    pts = [(1.0, 50.0), (2.0, 60.0), (3.0, 55.0), (0.5, 70.0), (2.0, 40.0)]
    assert pareto_front(pts, larger_x_better=True) == [(0.5, 70.0), (2.0, 60.0), (3.0, 55.0)]
    assert pareto_front(pts, larger_x_better=False) == [(0.5, 70.0)]
