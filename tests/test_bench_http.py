"""The HTTP load benchmark runs end to end on a micro model: a real `qzoom serve` subprocess, both sides measured."""

from __future__ import annotations

import math

import torch

from qzoom.evals.bench_http import Run, run_http_benchmark


def test_percentiles_interpolate_and_p99_is_near_the_slowest():
    run = Run(latencies=[0.1, 0.2, 0.3, 0.4, 1.0], wall_s=2.0)
    assert run.percentile(50) == 0.3
    assert 0.9 < run.percentile(99) <= 1.0
    assert run.throughput == 2.5


def test_http_benchmark_prints_both_sides_at_every_concurrency():
    lines: list[str] = []
    ratios = run_http_benchmark(
        layers=5,
        split=2,
        hidden=64,
        tokens=16,
        new_tokens=2,
        concurrency=(1, 3),
        requests=3,
        rounds=1,
        echo=lines.append,
    )
    assert set(ratios) == {1, 3}
    assert all(math.isfinite(r) and r > 0 for r in ratios.values())
    rows = [line.split() for line in "\n".join(lines).splitlines() if line.strip()[:1].isdigit()]
    assert {(r[0], r[1]) for r in rows} == {("1", "in-process"), ("1", "http"), ("3", "in-process"), ("3", "http")}
    assert sum("HTTP /ask vs in-process" in line for line in lines) == 2
    assert torch.is_grad_enabled()  # the benchmark must not switch autograd off for the rest of the process
