"""Accuracy against throughput across token budgets: the paper's trade-off sweep, through the real Q-Zoom graph.

Contract of :func:`sweep` (``qzoom eval bench NAME --sweep``): every configuration runs on the same samples, chunk by
chunk (each chunk through every configuration in turn, so that load on the machine hits all alike), batched
(``batch_size`` requests per engine call), and appends one JSON line per (configuration, sample) to
``OUT/results.jsonl``; a rerun skips the pairs already there (resumable). :func:`summarize` reads that file back:
per configuration the benchmark's own metric, samples/s (samples / the summed wall time of their batches, the device
synchronised around each batch), visual tokens after RoI insertion (mean), p50/p95 latency (a request's latency is
its batch's wall time), the gate's firing rate, with the hardware, torch threads, machine load and commit of the run
that started the folder (``OUT/run.json``; use a fresh folder per machine or commit).

Configurations (``method@budget``, budgets in merged visual tokens; the paper's lists scaled by ``scale``):

* ``baseline@N``: no zoom, the whole image at N tokens (paper grid 576/1024/2048/4096);
* ``qzoom@N``: the gate decides, the SD-RPN proposes (paper grid 256/384/576/1024/2048/4096), with the thresholds of
  the official evaluation scripts (:func:`paper_thresholds`);
* ``vicrop@N``: a training-free attention crop in the style of ViCrop (:func:`run_vicrop`): the base model's answer->
  image attention relative to that of a generic question, one crop, always;
* ``oracle@N``: one zoom on the cells covering the ground-truth box (benchmarks with boxes: the synthetic one).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from qzoom import roi
from qzoom.engine import QZoomEngine, SequenceState
from qzoom.evals.benchmarks import Benchmark, Sample
from qzoom.schemas import PIXELS_PER_TOKEN, AskOptions

Method = Literal["baseline", "qzoom", "vicrop", "oracle"]
METHODS: tuple[Method, ...] = ("baseline", "qzoom", "vicrop", "oracle")
PAPER_BASELINE = (576, 1024, 2048, 4096)
PAPER_QZOOM = (256, 384, 576, 1024, 2048, 4096)
# ViCrop's reference question: attention it draws marks what any question looks at, not what this one needs.
GENERIC_QUESTION = "Write a general description of the image."

# τ_roi per Doc/OCR task below 2048 tokens (eval_qwen2_5vl_stage3.sh); τ_gate 0.05 for all of them.
_DOC_ROI = {"textvqa": 0.15, "infovqa": 0.15, "ocrbench": 0.15, "chartqa": 0.125, "docvqa": 0.125}


class SweepError(ValueError):
    """A sweep argument that cannot work (the message names it and what is accepted)."""


def paper_thresholds(bench: Benchmark, max_tokens: int) -> tuple[float | None, float | None]:
    """(τ_roi, τ_gate) as the official scripts set them for Qwen2.5-VL-7B at a paper budget of ``max_tokens``:
    Doc/OCR per task (0.15 or 0.125 / 0.05) below 2048 tokens, the "Tab2" 0.04 / 0.02 from 2048 up; V* 0.03 / 0.02;
    HR-Bench and MME-RealWorld 0.04 / 0.02. The synthetic benchmark: the checkpoint's own (None)."""
    if bench.family == "synthetic":
        return None, None
    if bench.name == "vstar":
        return 0.03, 0.02
    if bench.family == "hr" or max_tokens >= 2048:
        return 0.04, 0.02
    return _DOC_ROI[bench.name], 0.05


def paper_min_tokens(bench: Benchmark, max_tokens: int) -> int | None:
    """The lower budget of the official scripts: 128 when max = 256 (and always on OCRBench), 512 for HR from 2048
    tokens up, else 256 (never above max). The synthetic benchmark: the checkpoint's own (None)."""
    if bench.family == "synthetic":
        return None
    if max_tokens <= 256 or bench.name == "ocrbench":
        return min(128, max_tokens)
    if bench.family == "hr" and max_tokens >= 2048:
        return 512
    return min(256, max_tokens)


@dataclass(frozen=True)
class SweepConfig:
    method: Method
    tokens: int  # the budget as run (scaled)
    paper_tokens: int  # the paper budget it stands for (thresholds and min tokens follow it)
    roi_thresh: float | None
    gate_thresh: float | None
    min_tokens: int | None

    @property
    def name(self) -> str:
        return f"{self.method}@{self.tokens}"

    def options(self, max_new_tokens: int) -> AskOptions:
        return AskOptions(
            max_pixels=self.tokens * PIXELS_PER_TOKEN,
            min_pixels=None if self.min_tokens is None else self.min_tokens * PIXELS_PER_TOKEN,
            roi_thresh=self.roi_thresh,
            gate_thresh=self.gate_thresh,
            force_zoom={"baseline": False, "qzoom": None}.get(self.method, True),
            max_new_tokens=max_new_tokens,
        )


def paper_configs(
    bench: Benchmark,
    *,
    methods: Sequence[str] = ("baseline", "qzoom"),
    scale: float = 1.0,
    baseline_budgets: Sequence[int] = PAPER_BASELINE,
    qzoom_budgets: Sequence[int] = PAPER_QZOOM,
) -> list[SweepConfig]:
    """The sweep's configurations: baseline at every baseline budget, the zooming methods at every Q-Zoom budget
    (ViCrop and the oracle at the smallest only: they always zoom), each budget scaled by ``scale``."""
    for m in methods:
        if m not in METHODS:
            raise SweepError(f"unknown method {m!r}; one of {', '.join(METHODS)}")
    if "oracle" in methods and bench.family != "synthetic":
        raise SweepError(f"oracle needs ground-truth boxes, which {bench.name} does not have (use synthetic)")
    if scale <= 0:
        raise SweepError(f"--scale must be positive, got {scale}")

    def make(method: Method, paper: int) -> SweepConfig:
        tokens = max(4, round(paper * scale))
        roi_t, gate_t = paper_thresholds(bench, paper)
        low = paper_min_tokens(bench, paper)
        low = None if low is None else max(4, min(tokens, round(low * scale)))
        return SweepConfig(method, tokens, paper, roi_t, gate_t, low)

    out: list[SweepConfig] = []
    for method in methods:
        budgets = baseline_budgets if method == "baseline" else qzoom_budgets
        if method in ("vicrop", "oracle"):
            budgets = sorted(qzoom_budgets)[:1]
        out += [make(method, b) for b in budgets]  # type: ignore[arg-type]
    if not out:
        raise SweepError("no configuration to run: give at least one method and budget")
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Running the methods


def _coarse(engine: QZoomEngine, states: Sequence[SequenceState]) -> None:
    engine.prepare(states)
    engine.encode(states)
    engine.prefill(states)


def run_on_boxes(engine: QZoomEngine, states: Sequence[SequenceState], boxes: Sequence[Sequence[float]]) -> None:
    """One zoom step per request on the coarse cells covering its pixel box, then the answer (the oracle)."""
    _coarse(engine, states)
    proposals = []
    for st, box in zip(states, boxes, strict=True):
        block = st.blocks[0]
        cells = roi.covering_grid_box(box, block.grid_hw, st.image.size)
        proposals.append(engine.proposal_from_grid_boxes(st, [cells]))
    engine.zoom(states, proposals)
    engine.finish(states)
    engine.decode(states)


def vicrop_box(rel: torch.Tensor, frac: float = 0.5) -> roi.GridBox:
    """The cells whose relative attention reaches ``frac`` of its peak, as one tight box (at least one cell)."""
    box = roi.tight_box(rel >= rel.max() * frac)
    return box if box is not None else roi.GridBox(0, 0, rel.shape[1], rel.shape[0])


def run_vicrop(engine: QZoomEngine, states: Sequence[SequenceState], layer: int | None = None) -> None:
    """ViCrop-style zoom (training-free): the base model's attention from the first answer token to the coarse
    image at the middle layer (mean over heads), divided by that for :data:`GENERIC_QUESTION`, gives one box
    (:func:`vicrop_box`); the crop is then answered the way Q-Zoom answers its RoI. Three passes per question, as the
    method costs."""
    from qzoom.train.stage1 import answer_attention

    probe = [st.options.model_copy(update={"max_new_tokens": 2, "force_zoom": False}) for st in states]
    asked = [engine.new_state(st.image, st.query, o) for st, o in zip(states, probe, strict=True)]
    generic = [engine.new_state(st.image, GENERIC_QUESTION, o) for st, o in zip(states, probe, strict=True)]
    both = [*asked, *generic]
    _coarse(engine, both)
    engine.finish(both)
    maps = answer_attention(engine, both)
    n = len(states)
    _coarse(engine, states)
    proposals = []
    for st, a_q, a_g in zip(states, maps[:n], maps[n:], strict=True):
        h, w = st.blocks[0].grid_hw
        if a_q is None or a_g is None:  # stopped at once: no attention row; zoom on the whole view
            box = roi.GridBox(0, 0, w, h)
        else:
            j = a_q.shape[0] // 2 if layer is None else layer
            box = vicrop_box(a_q[j].mean(0) / (a_g[j].mean(0) + 1e-6))
        proposals.append(engine.proposal_from_grid_boxes(st, [box]))
    engine.zoom(states, proposals)
    engine.finish(states)
    engine.decode(states)


def _sync(engine: QZoomEngine) -> None:
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)


def run_batch(
    engine: QZoomEngine, config: SweepConfig, bench: Benchmark, samples: Sequence[Sample]
) -> list[dict[str, Any]]:
    """One engine call over ``samples`` in ``config``: a JSON record per sample (prediction, score, zoomed, visual
    tokens, the batch's synchronised wall time)."""
    from qzoom.agent.zoom import run

    opts = config.options(bench.max_new_tokens)
    low = engine.settings.min_pixels or engine.backbone.min_pixels
    if opts.min_pixels is None and opts.max_pixels is not None and low > opts.max_pixels:
        opts = opts.model_copy(update={"min_pixels": opts.max_pixels})  # the checkpoint's floor, capped by the budget
    states = [engine.new_state(s.image(), s.prompt, opts) for s in samples]
    _sync(engine)
    start = time.perf_counter()
    if config.method == "oracle":
        run_on_boxes(engine, states, [s.box or (0, 0, *st.image.size) for s, st in zip(samples, states, strict=True)])
    elif config.method == "vicrop":
        run_vicrop(engine, states)
    else:
        run(engine, states, max_batch=len(states))
    _sync(engine)
    seconds = time.perf_counter() - start
    batch_id = f"{time.time_ns()}-{os.getpid()}"
    return [
        {
            "config": config.name,
            "method": config.method,
            "tokens": config.tokens,
            "benchmark": bench.name,
            "sample": s.id,
            "prediction": st.answer,
            "score": bench.score(s, st.answer),
            "zoomed": len(st.blocks) > 1,
            "gate_score": st.gate_scores[0] if st.gate_scores else None,
            "visual_tokens": st.visual_tokens,
            "batch": batch_id,
            "batch_size": len(samples),
            "batch_s": seconds,
        }
        for s, st in zip(samples, states, strict=True)
    ]


# ---------------------------------------------------------------------------------------------------------------------
# The sweep and its summary


def run_info(engine: QZoomEngine) -> dict[str, Any]:
    """Where and how the numbers were measured (written to ``run.json``)."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=Path(__file__).resolve().parent,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import version

        commit = f"qzoom {version('qzoom')}"
    device = engine.device
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        "model": engine.name,
        "device": str(device),
        "gpu": gpu,
        "dtype": str(engine.dtype).removeprefix("torch."),
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_avg": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "commit": commit,
    }


def _done(path: Path) -> set[tuple[str, str]]:
    if not path.exists():
        return set()
    return {(r["config"], r["sample"]) for r in map(json.loads, path.read_text().splitlines()) if r}


def _released() -> Any:
    raise RuntimeError("this sample's image was released after its chunk ran")


def sweep(
    engine: QZoomEngine,
    bench: Benchmark,
    samples: Iterable[Sample],
    configs: Sequence[SweepConfig],
    out: str | Path,
    *,
    batch_size: int = 8,
    on_samples: Callable[[int], None] | None = None,
) -> list[Sample]:
    """Run every configuration on every sample (see the module docstring); returns the samples (images released)."""
    if batch_size < 1:
        raise SweepError(f"--batch-size must be at least 1, got {batch_size}")
    directory = Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    results = directory / "results.jsonl"
    done = _done(results)
    info_file = directory / "run.json"
    if not info_file.exists():  # the run that measured the first results; a resumed run adds to its numbers
        info_file.write_text(json.dumps({**run_info(engine), "benchmark": bench.name}, indent=1))
    kept: list[Sample] = []
    with results.open("a") as sink:
        for chunk in _chunks(samples, batch_size):
            for config in configs:
                todo = [s for s in chunk if (config.name, s.id) not in done]
                if todo:
                    for record in run_batch(engine, config, bench, todo):
                        sink.write(json.dumps(record) + "\n")
                    sink.flush()
            kept += [dataclasses.replace(s, load_image=_released) for s in chunk]
            if on_samples:
                on_samples(len(chunk))
    return kept


def _chunks(samples: Iterable[Sample], size: int) -> Iterator[list[Sample]]:
    chunk: list[Sample] = []
    for s in samples:
        chunk.append(s)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def summarize(bench: Benchmark, samples: Sequence[Sample], out: str | Path) -> dict[str, Any]:
    """Per configuration in ``OUT/results.jsonl`` (over the given samples): the benchmark's metrics, throughput,
    visual tokens, latency and gate firing rate; written to ``OUT/summary.json`` and returned."""
    directory = Path(out)
    by_id = {s.id: s for s in samples}
    rows: dict[str, list[dict[str, Any]]] = {}
    for line in (directory / "results.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["sample"] in by_id:
            rows.setdefault(r["config"], []).append(r)
    configs: dict[str, Any] = {}
    for name, rs in rows.items():
        picked = [by_id[r["sample"]] for r in rs]
        batches = {r["batch"]: r["batch_s"] for r in rs}
        seconds = sum(batches.values())
        latency = [r["batch_s"] for r in rs]
        configs[name] = {
            "method": rs[0]["method"],
            "tokens": rs[0]["tokens"],
            "samples": len(rs),
            "metrics": bench.aggregate(picked, [r["score"] for r in rs]),
            "samples_per_s": len(rs) / seconds if seconds > 0 else float("nan"),
            "visual_tokens": statistics.fmean(r["visual_tokens"] for r in rs),
            "latency_p50_s": _percentile(latency, 0.5),
            "latency_p95_s": _percentile(latency, 0.95),
            "zoom_rate": statistics.fmean(float(r["zoomed"]) for r in rs),
            "batch_size": max(r["batch_size"] for r in rs),
        }
    info_file = directory / "run.json"
    summary = {
        "benchmark": bench.name,
        "family": bench.family,
        "metric": bench.metric,
        "run": json.loads(info_file.read_text()) if info_file.exists() else {},
        "configs": configs,
    }
    (directory / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """A Markdown table of a summary, with the run's hardware line under it."""
    lines = [
        f"| {summary['benchmark']} config | {summary['metric']} | samples/s | visual tokens | p50 s | p95 s | zoomed |",
        "|---|---|---|---|---|---|---|",
    ]
    order = sorted(summary["configs"].items(), key=lambda kv: (METHODS.index(kv[1]["method"]), kv[1]["tokens"]))
    for name, c in order:
        lines.append(
            f"| {name} | {100 * c['metrics']['accuracy']:.1f} | {c['samples_per_s']:.2f} | {c['visual_tokens']:.0f} "
            f"| {c['latency_p50_s']:.2f} | {c['latency_p95_s']:.2f} | {100 * c['zoom_rate']:.0f}% |"
        )
    run = summary.get("run", {})
    if run:
        where = run.get("gpu") or f"{run.get('cpu')} ({run.get('cpus')} CPUs, {run.get('threads')} torch threads)"
        lines.append("")
        batch = max((c["batch_size"] for c in summary["configs"].values()), default=0)
        lines.append(
            f"{run.get('model')} on {where}, {run.get('dtype')}, load average {run.get('load_avg')}, "
            f"commit {run.get('commit')}, batch {batch}."
        )
    return "\n".join(lines)


def family_summary(summaries: Sequence[dict[str, Any]], sizes: dict[str, int]) -> dict[str, dict[str, float]]:
    """Across benchmarks of one family, per configuration present in all: the plain mean of accuracies and the
    "rectified" throughput Σ N_i / Σ (N_i / sps_i) weighted by the full benchmark sizes (as the paper's summariser)."""
    common = set.intersection(*(set(s["configs"]) for s in summaries)) if summaries else set()
    out: dict[str, dict[str, float]] = {}
    for name in sorted(common):
        parts = [(sizes[s["benchmark"]], s["configs"][name]) for s in summaries]
        out[name] = {
            "accuracy": statistics.fmean(c["metrics"]["accuracy"] for _, c in parts),
            "samples_per_s": sum(n for n, _ in parts) / sum(n / c["samples_per_s"] for n, c in parts),
            "visual_tokens": statistics.fmean(c["visual_tokens"] for _, c in parts),
        }
    return out


FAMILY_DEFAULT_BUDGET = {"doc": 576, "hr": 4096, "synthetic": 256}


def evaluate_benchmark(
    engine: QZoomEngine,
    bench: Benchmark,
    samples: Iterable[Sample],
    configs: Sequence[SweepConfig],
    out: str | Path,
    *,
    batch_size: int = 8,
    total: int | None = None,
    echo: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """``qzoom eval bench``: the sweep with a tqdm bar, its summary (``summary.json``, ``summary.md``), the Pareto
    plots when more than one configuration ran, and the table echoed."""
    from tqdm import tqdm

    from qzoom.evals.plots import plot_sweep, summary_points

    directory = Path(out)
    with tqdm(total=total, desc=f"eval {bench.name}", unit="sample") as bar:
        kept = sweep(engine, bench, samples, configs, directory, batch_size=batch_size, on_samples=bar.update)
    if not kept:
        raise SweepError(f"{bench.name}: the data held no sample")
    summary = summarize(bench, kept, directory)
    table = format_summary(summary)
    (directory / "summary.md").write_text(table + "\n")
    echo(table)
    for name, c in summary["configs"].items():
        details = ", ".join(f"{k} {v:.4g}" for k, v in c["metrics"].items() if k != "accuracy")
        if details:
            echo(f"{name}: {details}")
    if len(summary["configs"]) > 1:
        for path in plot_sweep(summary_points(summary), f"{bench.title}: {len(kept)} samples", directory, bench.name):
            echo(f"wrote {path}")
    return summary
