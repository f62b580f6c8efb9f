"""What every public-benchmark loader shares: the sample record, the benchmark record, reading the published files.

A loader turns a benchmark's files, as their owners publish them (Hugging Face parquet shards, a JSONL beside an image
folder, a TSV with base64 images), into :class:`Sample` records, streamed: images are decoded only when a sample is
run, so ``--limit`` on a 5000-question set reads a few row groups. A :class:`Benchmark` names its files, its prompt,
its per-sample score and its aggregate. Missing or malformed files raise :class:`BenchmarkDataError` naming what was
expected where (the CLI prints it in one line and exits 2).

The prompt is the lmms-eval task's, then the suffix the Q-Zoom evaluation model appends to every question that lacks
it (:data:`PAPER_SUFFIX`), so that the numbers are comparable with the paper's.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from PIL import Image

# The Q-Zoom lmms-eval model class appends this to every question that does not already contain it.
PAPER_SUFFIX = "\nAnswer the question using a single word or phrase."

Family = Literal["doc", "hr", "synthetic"]


class BenchmarkDataError(ValueError):
    """The benchmark's files are missing or not in the published format (the message says what was expected)."""


@dataclass(frozen=True)
class Sample:
    """One question to ask. ``group`` is the source question's id: the option orders of one multiple-choice question
    (``id`` = ``group#k``) share it. ``target`` is what the benchmark's score needs (references, a letter, ...)."""

    benchmark: str
    id: str
    group: str
    prompt: str
    load_image: Callable[[], Image.Image] = field(repr=False, compare=False)
    target: Any = None
    meta: Mapping[str, Any] = field(default_factory=dict)
    box: tuple[int, int, int, int] | None = None  # a ground-truth box, where the benchmark has one (synthetic)

    def image(self) -> Image.Image:
        return self.load_image()


@dataclass(frozen=True)
class Benchmark:
    """A benchmark: how to find and read its files, and how to score and aggregate.

    ``score(sample, prediction)`` is the per-sample score in [0, 1]; ``aggregate(samples, scores)`` gives named
    numbers whose ``accuracy`` entry is the benchmark's headline metric (in [0, 1]).
    """

    name: str
    family: Family
    title: str
    source: str  # where to download it
    layout: str  # the files --data must hold
    full_size: int  # questions in the evaluated split (for group throughput, spec: "rectified")
    max_new_tokens: int
    load: Callable[[Path, int | None, int, bool], Iterator[Sample]] = field(repr=False)
    score: Callable[[Sample, str], float] = field(repr=False)
    aggregate: Callable[[Sequence[Sample], Sequence[float]], dict[str, float]] = field(repr=False)
    metric: str = "accuracy"
    shuffles: int = 1  # default option orders per multiple-choice question (Avg@k)


def with_suffix(prompt: str, paper_suffix: bool) -> str:
    return prompt + PAPER_SUFFIX if paper_suffix and PAPER_SUFFIX not in prompt else prompt


def find_files(data: Path, patterns: Sequence[str], layout: str) -> list[Path]:
    """The files of the first glob pattern that matches under ``data`` (sorted), else BenchmarkDataError."""
    if not data.is_dir():
        raise BenchmarkDataError(f"--data {data}: not a directory; expected {layout}")
    for pattern in patterns:
        found = sorted(p for p in data.glob(pattern) if p.is_file())
        if found:
            return found
    raise BenchmarkDataError(f"--data {data}: no {' or '.join(patterns)} found; expected {layout}")


def decode_image(value: Any, base: Path | None = None) -> Image.Image:
    """A Hugging Face image cell ({bytes, path}), raw bytes, a base64 string, or a path relative to ``base``."""
    try:
        if isinstance(value, Mapping):
            if value.get("bytes"):
                return Image.open(io.BytesIO(value["bytes"])).convert("RGB")
            if value.get("path") and base is not None:
                return Image.open(base / str(value["path"])).convert("RGB")
        if isinstance(value, bytes | bytearray):
            return Image.open(io.BytesIO(value)).convert("RGB")
        if isinstance(value, str):
            candidate = base / value if base is not None else None
            if candidate is not None and len(value) < 1024 and candidate.is_file():
                return Image.open(candidate).convert("RGB")
            return Image.open(io.BytesIO(base64.b64decode(value, validate=False))).convert("RGB")
    except (OSError, ValueError) as exc:
        raise BenchmarkDataError(f"cannot decode an image cell ({type(value).__name__}): {exc}") from exc
    raise BenchmarkDataError(f"an image cell of type {type(value).__name__} is neither bytes, base64 nor a path")


def _require(row: Mapping[str, Any], columns: Sequence[str], where: Path) -> None:
    missing = [c for c in columns if c not in row]
    if missing:
        raise BenchmarkDataError(f"{where}: missing column(s) {', '.join(missing)}; has {', '.join(sorted(row))}")


def read_rows(files: Sequence[Path], columns: Sequence[str]) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Rows of parquet, JSONL/JSON or TSV files, streamed, each checked for ``columns``."""
    for path in files:
        suffix = path.suffix.lower()
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            try:
                reader = pq.ParquetFile(path)
            except Exception as exc:  # pyarrow raises its own ArrowInvalid/OSError family
                raise BenchmarkDataError(f"{path}: not a readable parquet file ({exc})") from exc
            for batch in reader.iter_batches(batch_size=32):
                for row in batch.to_pylist():
                    _require(row, columns, path)
                    yield path, row
        elif suffix in (".jsonl", ".json"):
            text = path.read_text(encoding="utf-8")
            try:
                rows = json.loads(text) if suffix == ".json" else [json.loads(x) for x in text.splitlines() if x]
            except json.JSONDecodeError as exc:
                raise BenchmarkDataError(f"{path}: not valid JSON ({exc})") from exc
            for row in rows:
                _require(row, columns, path)
                yield path, row
        elif suffix == ".tsv":
            csv.field_size_limit(sys.maxsize)  # one cell holds a whole base64 image
            with path.open(newline="", encoding="utf-8") as fh:
                for row in csv.DictReader(fh, delimiter="\t"):
                    _require(row, columns, path)
                    yield path, row
        else:
            raise BenchmarkDataError(f"{path}: unsupported file type {suffix} (parquet, jsonl, json or tsv)")
