"""High-resolution benchmarks: V* Bench, HR-Bench 4K/8K and MME-RealWorld-Lite, all multiple choice.

Option order moves a model's score by several points, so each question can be asked in ``shuffles`` option orders
(Avg@k): order 0 is the published one, the others are seeded permutations (the same on every run and machine), and
the score is the mean over all orders. ``order0`` in the aggregate is the published order alone (the paper's
setting). Prompts follow lmms-eval's tasks, then :data:`~qzoom.evals.benchmarks.common.PAPER_SUFFIX`:

* V*: the question, the options as ``A. text`` lines, "Answer with the option's letter from the given choices
  directly." (the published ``text`` field carries ``(A) text`` options, which are parsed out first);
* HR-Bench: the question, ``A. text`` lines, "Answer the option letter directly."; scored by the option letter the
  reply names (rule-based; lmms-eval asks a GPT judge only when this fails), averaged per ``cycle_category`` and then
  over them;
* MME-RealWorld-Lite: the question, "The choices are listed below:", the ``(A) text`` lines, the instruction to answer
  with the letter and "The best answer is: "; accuracy overall and per task, subtask and category.
"""

from __future__ import annotations

import random
import re
import statistics
import zlib
from collections.abc import Iterator, Sequence
from functools import partial
from itertools import permutations
from math import factorial
from pathlib import Path
from typing import Any

from qzoom.evals.benchmarks import metrics
from qzoom.evals.benchmarks.common import (
    Benchmark,
    BenchmarkDataError,
    Sample,
    decode_image,
    find_files,
    read_rows,
    with_suffix,
)

LETTERS = "ABCDEFGH"


def option_orders(key: str, n_options: int, shuffles: int) -> list[list[int]]:
    """``shuffles`` distinct orders of ``n_options`` options (at most n!): the published order first, then
    permutations drawn from a generator seeded by ``key`` (so every run asks the same orders)."""
    want = min(max(1, shuffles), factorial(n_options))
    orders = [list(range(n_options))]
    if want == 1:
        return orders
    rng = random.Random(zlib.crc32(key.encode()))
    if factorial(n_options) <= 24:  # small: draw without replacement from all of them
        rest = [list(p) for p in permutations(range(n_options)) if list(p) != orders[0]]
        return orders + rng.sample(rest, want - 1)
    while len(orders) < want:
        p = list(range(n_options))
        rng.shuffle(p)
        if p not in orders:
            orders.append(p)
    return orders


def _variants(
    name: str, qid: str, options: Sequence[str], answer: str, shuffles: int
) -> Iterator[tuple[str, dict[str, str], str, int]]:
    """Per option order: (sample id, {letter: option text}, the right letter, order index)."""
    right = LETTERS.index(answer)
    for k, order in enumerate(option_orders(f"{name}:{qid}", len(options), shuffles)):
        lettered = {LETTERS[i]: options[j] for i, j in enumerate(order)}
        yield f"{qid}#{k}", lettered, LETTERS[order.index(right)], k


def _mc_aggregate(samples: Sequence[Sample], scores: Sequence[float], by: str | None) -> dict[str, float]:
    if by is None:
        out = {"accuracy": statistics.fmean(scores) if scores else float("nan")}
        groups: dict[str, list[float]] = {}
        for x, s in zip(samples, scores, strict=True):
            groups.setdefault(str(x.meta.get("category", "")), []).append(s)
        out.update({f"category/{g}": statistics.fmean(v) for g, v in sorted(groups.items()) if g})
    else:
        per = metrics.grouped_mean((str(x.meta[by]), s) for x, s in zip(samples, scores, strict=True))
        out = {"accuracy": per.pop("average"), **{f"{by}/{g}": v for g, v in per.items()}}
    first = [s for x, s in zip(samples, scores, strict=True) if x.meta.get("order") == 0]
    if first and len(first) < len(scores):
        out["order0"] = statistics.fmean(first)
    out["orders"] = len(scores) / max(1, len(first))
    return out


def _mc_score(sample: Sample, reply: str) -> float:
    return float(metrics.choice_letter(reply, sample.meta["options"]) == sample.target)


# --- V* Bench --------------------------------------------------------------------------------------------------------

VSTAR_LAYOUT = (
    "craigwu/vstar_bench: test_questions.jsonl (image, text, category, question_id, label) beside the "
    "direct_attributes/ and relative_position/ image folders; or lmms-lab/vstar-bench: data/test-*.parquet"
)
_VSTAR_OPTION = re.compile(r"\(([A-H])\)\s*(.*?)\s*(?=\([A-H]\)|$)", re.S)
_VSTAR_INSTRUCTION = "Answer with the option's letter from the given choices directly."


def parse_vstar_text(text: str) -> tuple[str, list[str]]:
    """The question and its options from V*'s ``text`` field ("question\\n(A) x\\n(B) y\\n[instruction]")."""
    body = text.replace(_VSTAR_INSTRUCTION, "").strip()
    if "(A)" not in body:
        raise BenchmarkDataError(f"V* text without (A)/(B) options: {text[:80]!r}")
    question, _, rest = body.partition("(A)")
    options = [m.group(2).strip() for m in _VSTAR_OPTION.finditer("(A)" + rest)]
    return question.strip(), options


def load_vstar(data: Path, limit: int | None, shuffles: int, paper_suffix: bool) -> Iterator[Sample]:
    files = find_files(data, ["test_questions.jsonl", "**/test_questions.jsonl", "**/test-*.parquet"], VSTAR_LAYOUT)
    cols = ("image", "text", "category", "question_id", "label")
    for n, (path, row) in enumerate(read_rows(files, cols)):
        if limit is not None and n >= limit:
            return
        question, options = parse_vstar_text(str(row["text"]))
        qid = str(row["question_id"])
        label = str(row["label"]).strip().upper()
        image = row["image"]
        for sid, lettered, right, k in _variants("vstar", qid, options, label, shuffles):
            lines = "\n".join(f"{letter}. {text}" for letter, text in lettered.items())
            prompt = with_suffix(f"{question}\n{lines}\n{_VSTAR_INSTRUCTION}", paper_suffix)
            yield Sample(
                "vstar",
                sid,
                qid,
                prompt,
                partial(decode_image, image, path.parent),
                right,
                {"category": row["category"], "options": lettered, "order": k},
            )


# --- HR-Bench --------------------------------------------------------------------------------------------------------


def _hr_layout(res: str) -> str:
    return (
        f"DreamMr/HR-Bench: hr_bench_{res}.parquet or hr_bench_{res}.tsv (columns index, question, answer, "
        "category, cycle_category, A, B, C, D, image as base64)"
    )


def _load_hrbench(res: str) -> Any:
    def load(data: Path, limit: int | None, shuffles: int, paper_suffix: bool) -> Iterator[Sample]:
        layout = _hr_layout(res)
        pats = [
            f"hr_bench_{res}.parquet",
            f"**/hr_bench_{res}.parquet",
            f"hr_bench_{res}.tsv",
            f"**/hr_bench_{res}.tsv",
        ]
        cols = ("index", "question", "answer", "category", "cycle_category", "A", "B", "image")
        for n, (_path, row) in enumerate(read_rows(find_files(data, pats, layout), cols)):
            if limit is not None and n >= limit:
                return
            options = [str(row[c]) for c in LETTERS if row.get(c) not in (None, "") and str(row[c]) != "nan"]
            qid = str(row["index"])
            image = row["image"]
            for sid, lettered, right, k in _variants(f"hrbench{res}", qid, options, str(row["answer"]), shuffles):
                lines = "".join(f"{letter}. {text}\n" for letter, text in lettered.items())
                prompt = with_suffix(
                    f"{str(row['question']).strip()}\n{lines}Answer the option letter directly.", paper_suffix
                )
                yield Sample(
                    f"hrbench{res}",
                    sid,
                    qid,
                    prompt,
                    partial(decode_image, image),
                    right,
                    {
                        "category": row["category"],
                        "cycle_category": str(row["cycle_category"]),
                        "options": lettered,
                        "order": k,
                    },
                )

    return load


# --- MME-RealWorld-Lite ----------------------------------------------------------------------------------------------

MME_LAYOUT = (
    "yifanzhang114/MME-RealWorld-lite-lmms-eval: data/train-*.parquet (columns index, question, "
    "multi-choice options, answer, category, l2-category, bytes as base64)"
)
_MME_OPTION = re.compile(r"^\s*[(（]([A-H])[)）]\s?(.*)$", re.S)
_MME_INSTRUCTION = (
    "Select the best answer to the above multiple-choice question based on the image. Respond with only the letter "
    "(A, B, C, D, or E) of the correct option.\nThe best answer is: "
)


def load_mme_realworld(data: Path, limit: int | None, shuffles: int, paper_suffix: bool) -> Iterator[Sample]:
    cols = ("index", "question", "multi-choice options", "answer", "category", "l2-category", "bytes")
    files = find_files(data, ["**/train-*.parquet", "**/*.parquet"], MME_LAYOUT)
    for n, (_path, row) in enumerate(read_rows(files, cols)):
        if limit is not None and n >= limit:
            return
        texts = []
        for opt in row["multi-choice options"]:
            m = _MME_OPTION.match(str(opt))
            if m is None:
                raise BenchmarkDataError(f"MME-RealWorld option not of the form '(A) text': {opt!r}")
            texts.append(m.group(2))
        qid = str(row["index"])
        image = row["bytes"]
        for sid, lettered, right, k in _variants("mme", qid, texts, str(row["answer"]).strip(), shuffles):
            listed = "\n".join(f"({letter}) {text}" for letter, text in lettered.items())
            prompt = f"{row['question']} The choices are listed below:\n{listed}\n{_MME_INSTRUCTION}"
            yield Sample(
                "mme-realworld-lite",
                sid,
                qid,
                with_suffix(prompt, paper_suffix),
                partial(decode_image, image),
                right,
                {"category": row["category"], "l2": row["l2-category"], "options": lettered, "order": k},
            )


def _mme_score(sample: Sample, reply: str) -> float:
    return float(metrics.mme_realworld_correct(metrics.mme_realworld_letter(reply), sample.target))


def _mme_aggregate(samples: Sequence[Sample], scores: Sequence[float]) -> dict[str, float]:
    out = metrics.mme_realworld_summary(
        (str(x.meta["category"]), str(x.meta["l2"]), s) for x, s in zip(samples, scores, strict=True)
    )
    first = [s for x, s in zip(samples, scores, strict=True) if x.meta.get("order") == 0]
    if first and len(first) < len(scores):
        out["order0"] = statistics.fmean(first)
    return out


BENCHMARKS = (
    Benchmark(
        "vstar",
        "hr",
        "V* Bench",
        "https://huggingface.co/datasets/craigwu/vstar_bench",
        VSTAR_LAYOUT,
        191,
        16,
        load_vstar,
        _mc_score,
        lambda x, s: _mc_aggregate(x, s, None),
        shuffles=4,
    ),
    Benchmark(
        "hrbench4k",
        "hr",
        "HR-Bench 4K",
        "https://huggingface.co/datasets/DreamMr/HR-Bench",
        _hr_layout("4k"),
        800,
        16,
        _load_hrbench("4k"),
        _mc_score,
        lambda x, s: _mc_aggregate(x, s, "cycle_category"),
        shuffles=4,
    ),
    Benchmark(
        "hrbench8k",
        "hr",
        "HR-Bench 8K",
        "https://huggingface.co/datasets/DreamMr/HR-Bench",
        _hr_layout("8k"),
        800,
        16,
        _load_hrbench("8k"),
        _mc_score,
        lambda x, s: _mc_aggregate(x, s, "cycle_category"),
        shuffles=4,
    ),
    Benchmark(
        "mme-realworld-lite",
        "hr",
        "MME-RealWorld-Lite",
        "https://huggingface.co/datasets/yifanzhang114/MME-RealWorld-lite-lmms-eval",
        MME_LAYOUT,
        1920,
        16,
        load_mme_realworld,
        _mme_score,
        _mme_aggregate,
    ),
)
