"""Doc/OCR benchmarks: TextVQA, ChartQA, DocVQA, InfoVQA and OCRBench, read from their Hugging Face parquet shards.

Prompts are lmms-eval's (``question`` + the task's post-prompt; TextVQA capitalises the question the way Python's
``str.capitalize`` does) followed by :data:`~qzoom.evals.benchmarks.common.PAPER_SUFFIX`. Scores: VQA accuracy
(TextVQA), relaxed accuracy (ChartQA), ANLS (DocVQA, InfoVQA), OCRBench's containment rule per question type.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from qzoom.evals.benchmarks import metrics
from qzoom.evals.benchmarks.common import Benchmark, Sample, decode_image, find_files, read_rows, with_suffix

SINGLE_WORD = "\nAnswer the question using a single word or phrase."


def _image_loader(value: Any, base: Path) -> Any:
    return lambda: decode_image(value, base)


def _answers(value: Any) -> list[str]:
    return [str(a) for a in value] if isinstance(value, list | tuple) else [str(value)]


def _rows(data: Path, patterns: Sequence[str], layout: str, columns: Sequence[str], limit: int | None) -> Iterator[Any]:
    for n, item in enumerate(read_rows(find_files(data, patterns, layout), columns)):
        if limit is not None and n >= limit:
            return
        yield n, item


def _mean(samples: Sequence[Sample], scores: Sequence[float]) -> dict[str, float]:
    return {"accuracy": statistics.fmean(scores) if scores else float("nan")}


# --- TextVQA ---------------------------------------------------------------------------------------------------------

TEXTVQA_LAYOUT = "lmms-lab/textvqa: data/validation-*.parquet (columns question_id, question, image, answers)"


def load_textvqa(data: Path, limit: int | None, shuffles: int, paper_suffix: bool) -> Iterator[Sample]:
    cols = ("question_id", "question", "image", "answers")
    for _, (path, row) in _rows(data, ["**/validation-*.parquet"], TEXTVQA_LAYOUT, cols, limit):
        qid = str(row["question_id"])
        prompt = with_suffix(str(row["question"]).capitalize() + SINGLE_WORD, paper_suffix)
        yield Sample("textvqa", qid, qid, prompt, _image_loader(row["image"], path.parent), _answers(row["answers"]))


# --- ChartQA ---------------------------------------------------------------------------------------------------------

CHARTQA_LAYOUT = "lmms-lab/ChartQA: data/test-*.parquet (columns type, question, answer, image)"


def load_chartqa(data: Path, limit: int | None, shuffles: int, paper_suffix: bool) -> Iterator[Sample]:
    cols = ("type", "question", "answer", "image")
    for n, (path, row) in _rows(data, ["**/test-*.parquet"], CHARTQA_LAYOUT, cols, limit):
        prompt = with_suffix(f"{row['question']}\nAnswer the question with a single word.", paper_suffix)
        yield Sample(
            "chartqa",
            str(n),
            str(n),
            prompt,
            _image_loader(row["image"], path.parent),
            str(row["answer"]),
            {"type": row["type"]},
        )


def chartqa_aggregate(samples: Sequence[Sample], scores: Sequence[float]) -> dict[str, float]:
    out = _mean(samples, scores)
    for split, name in (("human_test", "human"), ("augmented_test", "augmented")):
        picked = [s for x, s in zip(samples, scores, strict=True) if x.meta.get("type") == split]
        if picked:
            out[name] = statistics.fmean(picked)
    return out


# --- DocVQA / InfoVQA ------------------------------------------------------------------------------------------------

DOCVQA_LAYOUT = "lmms-lab/DocVQA: DocVQA/validation-*.parquet (columns questionId, question, image, answers)"
INFOVQA_LAYOUT = "lmms-lab/DocVQA: InfographicVQA/validation-*.parquet (columns questionId, question, image, answers)"


def _load_anls(name: str, sub: str, layout: str) -> Any:
    def load(data: Path, limit: int | None, shuffles: int, paper_suffix: bool) -> Iterator[Sample]:
        patterns = [f"{sub}/validation-*.parquet", f"**/{sub}/validation-*.parquet", "validation-*.parquet"]
        cols = ("questionId", "question", "image", "answers")
        for _, (path, row) in _rows(data, patterns, layout, cols, limit):
            qid = str(row["questionId"])
            prompt = with_suffix(f"{row['question']}{SINGLE_WORD}", paper_suffix)
            yield Sample(name, qid, qid, prompt, _image_loader(row["image"], path.parent), _answers(row["answers"]))

    return load


# --- OCRBench --------------------------------------------------------------------------------------------------------

OCRBENCH_LAYOUT = "echo840/OCRBench: data/test-*.parquet (columns dataset, question, question_type, answer, image)"


def load_ocrbench(data: Path, limit: int | None, shuffles: int, paper_suffix: bool) -> Iterator[Sample]:
    cols = ("dataset", "question", "question_type", "answer", "image")
    for n, (path, row) in _rows(data, ["**/test-*.parquet"], OCRBENCH_LAYOUT, cols, limit):
        prompt = with_suffix(str(row["question"]).strip(), paper_suffix)
        yield Sample(
            "ocrbench",
            str(n),
            str(n),
            prompt,
            _image_loader(row["image"], path.parent),
            _answers(row["answer"]),
            {"dataset": row["dataset"], "question_type": row["question_type"]},
        )


def ocrbench_aggregate(samples: Sequence[Sample], scores: Sequence[float]) -> dict[str, float]:
    return metrics.ocrbench_summary((str(x.meta["question_type"]), s) for x, s in zip(samples, scores, strict=True))


BENCHMARKS = (
    Benchmark(
        "textvqa",
        "doc",
        "TextVQA (val)",
        "https://huggingface.co/datasets/lmms-lab/textvqa",
        TEXTVQA_LAYOUT,
        5000,
        32,
        load_textvqa,
        lambda s, p: metrics.vqa_accuracy(p, s.target),
        _mean,
        "VQA accuracy",
    ),
    Benchmark(
        "chartqa",
        "doc",
        "ChartQA (test)",
        "https://huggingface.co/datasets/lmms-lab/ChartQA",
        CHARTQA_LAYOUT,
        2500,
        16,
        load_chartqa,
        lambda s, p: float(metrics.relaxed_correctness(p.strip(), s.target)),
        chartqa_aggregate,
        "relaxed accuracy",
    ),
    Benchmark(
        "docvqa",
        "doc",
        "DocVQA (val)",
        "https://huggingface.co/datasets/lmms-lab/DocVQA (config DocVQA)",
        DOCVQA_LAYOUT,
        5301,
        32,  # the paper's summariser weighs DocVQA-val as 5301
        _load_anls("docvqa", "DocVQA", DOCVQA_LAYOUT),
        lambda s, p: metrics.anls(p, s.target),
        _mean,
        "ANLS",
    ),
    Benchmark(
        "infovqa",
        "doc",
        "InfographicVQA (val)",
        "https://huggingface.co/datasets/lmms-lab/DocVQA (config InfographicVQA)",
        INFOVQA_LAYOUT,
        2801,
        32,
        _load_anls("infovqa", "InfographicVQA", INFOVQA_LAYOUT),
        lambda s, p: metrics.anls(p, s.target),
        _mean,
        "ANLS",
    ),
    Benchmark(
        "ocrbench",
        "doc",
        "OCRBench",
        "https://huggingface.co/datasets/echo840/OCRBench",
        OCRBENCH_LAYOUT,
        1000,
        128,
        load_ocrbench,
        lambda s, p: float(metrics.ocrbench_correct(p, s.target, str(s.meta["dataset"]))),
        ocrbench_aggregate,
        "final score / 1000",
    ),
)
