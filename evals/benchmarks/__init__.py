"""The paper's nine public benchmarks (and the synthetic one) behind one registry: ``get(name)`` -> :class:`Benchmark`.

Doc/OCR family (:mod:`.doc`): ``textvqa``, ``chartqa``, ``docvqa``, ``infovqa``, ``ocrbench``. High-resolution family
(:mod:`.hr`): ``vstar``, ``hrbench4k``, ``hrbench8k``, ``mme-realworld-lite``. ``synthetic``: the test split of the
synthetic high-res benchmark (no files; ground-truth boxes, so the oracle crop can run). Scoring rules:
:mod:`.metrics`. Where each dataset comes from and the layout ``--data`` must have: ``docs/benchmarks.md``.
"""

from __future__ import annotations

import functools
import itertools
import statistics
from collections.abc import Iterator, Sequence
from pathlib import Path

from PIL import Image

from qzoom.evals.benchmarks import doc, hr
from qzoom.evals.benchmarks.common import PAPER_SUFFIX, Benchmark, BenchmarkDataError, Sample

__all__ = ["BENCHMARKS", "PAPER_SUFFIX", "Benchmark", "BenchmarkDataError", "Sample", "get", "load"]

SYNTHETIC_ITEMS = 300


@functools.lru_cache(maxsize=16)
def _synthetic_image(index: int, seed: int) -> Image.Image:
    from qzoom.evals.synthetic import generate_item

    return generate_item("test", index, seed=seed).image


def load_synthetic(data: Path, limit: int | None, shuffles: int, paper_suffix: bool) -> Iterator[Sample]:
    """Items 0.. of the synthetic test split (``--data`` is ignored); the question as the demo model was trained on
    it (no suffix); images regenerated when run (they are deterministic), so that a long run holds few of them."""
    from qzoom.evals.synthetic import iterate

    for item in iterate("test", limit if limit is not None else SYNTHETIC_ITEMS):
        yield Sample(
            "synthetic",
            item.uid,
            item.uid,
            item.question,
            functools.partial(_synthetic_image, item.index, item.seed),
            item.answer,
            {"family": item.family, "detail": item.needs_detail},
            tuple(item.box),  # type: ignore[arg-type]
        )


def _synthetic_score(sample: Sample, reply: str) -> float:
    from qzoom.evals.synthetic import exact_match

    return float(exact_match(reply, str(sample.target)))


def _synthetic_aggregate(samples: Sequence[Sample], scores: Sequence[float]) -> dict[str, float]:
    out = {"accuracy": statistics.fmean(scores) if scores else float("nan")}
    for which, flag in (("detail", True), ("coarse", False)):
        picked = [s for x, s in zip(samples, scores, strict=True) if x.meta.get("detail") is flag]
        if picked:
            out[which] = statistics.fmean(picked)
    return out


SYNTHETIC = Benchmark(
    "synthetic",
    "synthetic",
    "synthetic high-res (test split)",
    "generated on the fly (qzoom.evals.synthetic)",
    "nothing (generated)",
    SYNTHETIC_ITEMS,
    8,
    load_synthetic,
    _synthetic_score,
    _synthetic_aggregate,
    "exact match",
)

BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (*doc.BENCHMARKS, *hr.BENCHMARKS, SYNTHETIC)}


def get(name: str) -> Benchmark:
    """The benchmark called ``name``; BenchmarkDataError naming the accepted names otherwise."""
    try:
        return BENCHMARKS[name]
    except KeyError:
        raise BenchmarkDataError(f"unknown benchmark {name!r}; one of {', '.join(BENCHMARKS)}") from None


def load(
    name: str,
    data: str | Path | None,
    *,
    limit: int | None = None,
    shuffles: int | None = None,
    paper_suffix: bool = True,
) -> Iterator[Sample]:
    """The samples of benchmark ``name`` from ``data`` (its downloaded files), streamed: the first ``limit``
    questions, each multiple-choice question in ``shuffles`` option orders (default: the benchmark's). The arguments
    are checked at once, and the files by reading the first sample."""
    bench = get(name)
    if data is None and bench.family != "synthetic":
        raise BenchmarkDataError(f"{name} needs --data DIR holding {bench.layout}")
    if limit is not None and limit < 1:
        raise BenchmarkDataError(f"--limit must be at least 1, got {limit}")
    k = bench.shuffles if shuffles is None else shuffles
    if k < 1:
        raise BenchmarkDataError(f"--shuffles must be at least 1, got {k}")
    samples = bench.load(Path(data or "."), limit, k, paper_suffix)
    first = next(samples, None)  # reads the first rows now, so that missing or wrong files fail before a model loads
    return samples if first is None else itertools.chain([first], samples)
