"""Pareto plots of a sweep, in the style of the paper's figures (matplotlib, PNG files).

:func:`plot_sweep` draws, from one or more sweep summaries (:func:`qzoom.evals.sweep.summarize`), accuracy against
throughput and accuracy against visual tokens: one line per method across its budgets, each point labelled with its
budget, and the Pareto front over every point (dashed; best accuracy for the throughput, or for the tokens). Several
benchmarks of one family are first averaged (:func:`qzoom.evals.sweep.family_summary`) so each family gets one pair
of plots. Log-scaled axes carry plain numbers at 1-2-5 steps and no minor labels, so tick labels never overlap.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

STYLE: dict[str, dict[str, Any]] = {
    "baseline": {"color": "tab:gray", "marker": "o", "label": "no zoom (budget grows)"},
    "qzoom": {"color": "tab:red", "marker": "*", "markersize": 11, "label": "Q-Zoom (gate decides)"},
    "vicrop": {"color": "tab:blue", "marker": "D", "label": "ViCrop-style attention crop"},
    "oracle": {"color": "tab:green", "marker": "s", "markerfacecolor": "none", "label": "ground-truth box (oracle)"},
}


def pareto_front(points: Sequence[tuple[float, float]], *, larger_x_better: bool) -> list[tuple[float, float]]:
    """The points no other point beats on both axes (higher y; higher x, or lower x), sorted by x."""
    front = []
    for x, y in points:
        dominated = any(
            (y2 >= y and (x2 >= x if larger_x_better else x2 <= x)) and (y2, x2) != (y, x) for x2, y2 in points
        )
        if not dominated:
            front.append((x, y))
    return sorted(set(front))


def log_axis(axis: Any) -> None:
    """Plain-number labels at 1-2-5 steps of a log axis, none at the minor ticks (where they would overlap)."""
    import matplotlib.ticker as ticker

    axis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(ticker.NullFormatter())


def plot_sweep(points: dict[str, dict[str, Any]], title: str, out_dir: str | Path, stem: str) -> list[Path]:
    """Two PNGs (``STEM-throughput.png``, ``STEM-tokens.png``) from ``points``: configuration name (``method@N``)
    -> {accuracy (0..1), samples_per_s, visual_tokens}. Returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for key, xlabel, larger, suffix in (
        ("samples_per_s", "throughput (samples/s, log scale)", True, "throughput"),
        ("visual_tokens", "visual tokens after RoI insertion (log scale)", False, "tokens"),
    ):
        fig, ax = plt.subplots(figsize=(6.4, 4.6), dpi=120)
        every: list[tuple[float, float]] = []
        for method, style in STYLE.items():
            mine = sorted(
                ((int(n.split("@")[1]), v) for n, v in points.items() if n.split("@")[0] == method),
                key=lambda t: t[0],
            )
            if not mine:
                continue
            xs = [v[key] for _, v in mine]
            ys = [100 * v["accuracy"] for _, v in mine]
            every += list(zip(xs, ys, strict=True))
            ax.plot(xs, ys, linestyle="-", **style)
            for i, ((budget, _), x, y) in enumerate(zip(mine, xs, ys, strict=True)):
                dy = 7 if i % 2 == 0 else -12  # alternate above/below so neighbouring labels do not collide
                ax.annotate(str(budget), (x, y), textcoords="offset points", xytext=(4, dy), fontsize=7, color="0.3")
        front = pareto_front(every, larger_x_better=larger)
        if len(front) > 1:
            fx, fy = zip(*front, strict=True)
            ax.plot(fx, fy, linestyle="--", color="black", linewidth=0.8, alpha=0.6, label="Pareto front")
        ax.set_xscale("log")
        log_axis(ax.xaxis)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("accuracy (%)")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8, loc="best")
        fig.tight_layout()
        path = directory / f"{stem}-{suffix}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def summary_points(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A single benchmark's summary as the points :func:`plot_sweep` takes."""
    return {
        name: {
            "accuracy": c["metrics"]["accuracy"],
            "samples_per_s": c["samples_per_s"],
            "visual_tokens": c["visual_tokens"],
        }
        for name, c in summary["configs"].items()
    }
