"""The public benchmarks: scoring rules checked by hand against the published scorers, loaders on small files written
in each benchmark's published format (parquet shards with HF image cells, JSONL beside an image folder, TSV and
parquet with base64 images), and the CLI's refusals."""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from qzoom.cli import app
from qzoom.evals import benchmarks
from qzoom.evals.benchmarks import metrics
from qzoom.evals.benchmarks.common import PAPER_SUFFIX
from qzoom.evals.benchmarks.hr import option_orders, parse_vstar_text

# ---------------------------------------------------------------------------------------------------------------------
# Metrics


def test_anls_normalises_case_and_spaces_but_divides_by_raw_length():
    assert metrics.anls("Hello World", ["hello world"]) == 1.0
    assert metrics.anls("  hello   world ", ["hello world"]) == 1.0
    # one edit over max(len("hello world"), len("helo world")) = 11 characters
    assert metrics.anls("helo world", ["hello world"]) == pytest.approx(1 - 1 / 11)
    # the closest reference counts; below 0.5 similarity the score is 0
    assert metrics.anls("helo world", ["xyz", "hello world"]) == pytest.approx(1 - 1 / 11)
    assert metrics.anls("abc", ["xyz"]) == 0.0
    assert metrics.anls("abcd", ["abxy"]) == 0.5  # exactly at the threshold: kept


def test_relaxed_accuracy():
    assert metrics.relaxed_correctness("10.4", "10")  # 4 % off
    assert not metrics.relaxed_correctness("10.6", "10")  # 6 % off
    assert metrics.relaxed_correctness("50%", "0.5")  # a percentage is divided by 100
    assert metrics.relaxed_correctness("Yes", "yes")
    assert not metrics.relaxed_correctness("0.0", "0")  # a zero target is compared as text, as the scorer does
    assert metrics.relaxed_correctness("0", "0")


def test_vqa_normalisation_and_ten_answer_accuracy():
    assert metrics.vqa_normalize("Two dogs.") == "2 dogs"
    assert metrics.vqa_normalize("The Cat") == "cat"
    assert metrics.vqa_normalize("dont") == "don't"
    assert metrics.vqa_normalize("1,000") == "1000"
    assert metrics.vqa_normalize("hello-world") == "hello world"  # a hyphen inside a word separates
    assert metrics.vqa_normalize("x - y") == "x y"  # beside a space it is dropped
    answers = ["cat"] * 3 + ["dog"] * 7
    # each leave-one-out subset: min(1, matches / 3); three subsets keep 2 "cat"s, seven keep 3
    assert metrics.vqa_accuracy("cat", answers) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)
    assert metrics.vqa_accuracy("A cat.", answers) == pytest.approx(0.9)
    assert metrics.vqa_accuracy("dog", answers) == 1.0
    assert metrics.vqa_accuracy("cow", answers) == 0.0
    assert metrics.vqa_accuracy("cat", ["cat", "cat"] + ["x"] * 8) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)


def test_ocrbench_containment_and_categories():
    assert metrics.ocrbench_correct("The answer is Paris", ["paris"], "IIIT5K")
    assert not metrics.ocrbench_correct("Lyon", ["paris", "nice"], "IIIT5K")
    assert metrics.ocrbench_correct("x ^ 2 + 1", ["x^2+1"], "HME100k")  # formulas: spaces removed
    assert not metrics.ocrbench_correct("x ^ 2 + 1", ["x^2+1"], "IIIT5K")
    summary = metrics.ocrbench_summary(
        [("Regular Text Recognition", 1.0), ("Digit String Recognition", 1.0), ("Doc-oriented VQA", 0.0),
         ("Key Information Extraction", 1.0)]
    )  # fmt: skip
    assert summary["Text Recognition"] == 2
    assert summary["Final Score"] == 3
    assert summary["accuracy"] == 0.75


def test_choice_letter_reads_common_reply_forms():
    opts = {"A": "red", "B": "blue", "C": "green", "D": "white"}
    assert metrics.choice_letter("B", opts) == "B"
    assert metrics.choice_letter("(C) green", opts) == "C"
    assert metrics.choice_letter("C. green", opts) == "C"
    assert metrics.choice_letter("The answer is D.", opts) == "D"
    assert metrics.choice_letter("blue", opts) == "B"  # the text of exactly one option
    assert metrics.choice_letter("A or B", opts) == "A"  # a reply that starts with a letter picks it (V*'s rule)
    assert metrics.choice_letter("maybe (A) or (B)", opts) == "A"
    assert metrics.choice_letter("either red or blue", opts) is None  # two options named: no choice
    assert metrics.choice_letter("E", opts) is None  # not an option


def test_mme_realworld_letter_and_per_task_summary():
    assert metrics.mme_realworld_letter("The best answer is (C)") == "C"
    assert metrics.mme_realworld_letter("b") == "B"  # a lone lower-case letter names that option
    assert metrics.mme_realworld_letter("") == "A"  # the published scorer's quirk: "" is inside "(a)"
    assert metrics.mme_realworld_letter("I cannot tell what this picture shows at all, sorry about that friend") == ""
    assert metrics.mme_realworld_correct("C", "C") and not metrics.mme_realworld_correct("A", "C")
    s = metrics.mme_realworld_summary(
        [("perception/Autonomous_Driving", "Object/attribute/color", 1.0),
         ("perception/Autonomous_Driving", "Object/attribute/shape", 0.0),
         ("reasoning/Monitoring", "counting", 1.0)]
    )  # fmt: skip
    assert s["accuracy"] == pytest.approx(2 / 3)
    assert s["Perception"] == 0.5 and s["Reasoning"] == 1.0
    assert s["Perception/Autonomous_Driving/object/attribute"] == 0.5  # attribute categories merged


def test_option_orders_are_seeded_distinct_and_start_published():
    orders = option_orders("vstar:7", 4, 4)
    assert orders[0] == [0, 1, 2, 3]
    assert len({tuple(o) for o in orders}) == 4
    assert option_orders("vstar:7", 4, 4) == orders  # the same on every run
    assert len(option_orders("x", 2, 5)) == 2  # at most n! orders


# ---------------------------------------------------------------------------------------------------------------------
# Files in the published formats


def _png(color: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _hf_parquet(path: Path, rows: list[dict], image_cols: tuple[str, ...] = ("image",)) -> None:
    """A parquet shard as `datasets` writes it: image columns as {bytes, path} structs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for row in rows:
        for col in image_cols:
            row[col] = {"bytes": row[col], "path": None}
    pq.write_table(pa.Table.from_pylist(rows), path)


def test_textvqa_parquet(tmp_path: Path):
    _hf_parquet(
        tmp_path / "data" / "validation-00000-of-00001.parquet",
        [{"question_id": 34602, "question": "what IS the brand?", "image": _png((255, 0, 0)),
          "answers": ["nokia"] * 10, "ocr_tokens": ["nokia"], "set_name": "val"}],
    )  # fmt: skip
    (s,) = benchmarks.load("textvqa", tmp_path)
    assert s.id == "34602"
    # lmms-eval's prompt (question capitalised, single-word post-prompt); the paper's suffix is already in it
    assert s.prompt == "What is the brand?\nAnswer the question using a single word or phrase."
    assert s.image().getpixel((0, 0)) == (255, 0, 0)
    bench = benchmarks.get("textvqa")
    assert bench.score(s, "Nokia") == 1.0 and bench.score(s, "lg") == 0.0


def test_chartqa_and_ocrbench_parquet(tmp_path: Path):
    _hf_parquet(
        tmp_path / "chart" / "data" / "test-00000-of-00001.parquet",
        [{"type": "human_test", "question": "Max value?", "answer": "42", "image": _png((0, 0, 255))},
         {"type": "augmented_test", "question": "Colour?", "answer": "Blue", "image": _png((0, 0, 255))}],
    )  # fmt: skip
    samples = list(benchmarks.load("chartqa", tmp_path / "chart"))
    assert samples[0].prompt == "Max value?\nAnswer the question with a single word." + PAPER_SUFFIX
    bench = benchmarks.get("chartqa")
    scores = [bench.score(samples[0], "43"), bench.score(samples[1], "red")]
    assert scores == [1.0, 0.0]
    agg = bench.aggregate(samples, scores)
    assert agg == {"accuracy": 0.5, "human": 1.0, "augmented": 0.0}

    _hf_parquet(
        tmp_path / "ocr" / "data" / "test-00000-of-00001.parquet",
        [{"dataset": "IIIT5K", "question": " what is written in the image? ",
          "question_type": "Regular Text Recognition", "answer": ["CENTRE"], "image": _png((9, 9, 9))}],
    )  # fmt: skip
    (o,) = benchmarks.load("ocrbench", tmp_path / "ocr", paper_suffix=False)
    assert o.prompt == "what is written in the image?"
    ocr = benchmarks.get("ocrbench")
    assert ocr.aggregate([o], [ocr.score(o, "centre")])["Regular Text Recognition"] == 1.0


def test_docvqa_and_infovqa_share_one_download(tmp_path: Path):
    """lmms-lab/DocVQA holds both: each loader reads its own config's folder."""
    for sub, qid in (("DocVQA", 1), ("InfographicVQA", 2)):
        _hf_parquet(
            tmp_path / sub / "validation-00000-of-00001.parquet",
            [{"questionId": qid, "question": f"q{qid}", "image": _png((1, 2, 3)), "answers": ["Total", "total"],
              "docId": 5}],
        )  # fmt: skip
    (d,) = benchmarks.load("docvqa", tmp_path)
    (i,) = benchmarks.load("infovqa", tmp_path)
    assert (d.id, i.id) == ("1", "2")
    assert benchmarks.get("docvqa").score(d, "totl") == pytest.approx(0.8)  # ANLS


def test_vstar_jsonl_with_image_folder_and_shuffled_orders(tmp_path: Path):
    (tmp_path / "direct_attributes").mkdir()
    Image.new("RGB", (50, 40), (0, 255, 0)).save(tmp_path / "direct_attributes" / "sa_1.jpg")
    text = (
        "What is the color of the cup?\n(A) green\n(B) red\n(C) blue\n(D) black\n"
        "Answer with the option's letter from the given choices directly."
    )
    (tmp_path / "test_questions.jsonl").write_text(
        json.dumps({"image": "direct_attributes/sa_1.jpg", "text": text, "category": "direct_attributes",
                    "question_id": 0, "label": "A"}) + "\n"
    )  # fmt: skip
    assert parse_vstar_text(text) == ("What is the color of the cup?", ["green", "red", "blue", "black"])
    variants = list(benchmarks.load("vstar", tmp_path, shuffles=3))
    assert [v.id for v in variants] == ["0#0", "0#1", "0#2"]
    first = variants[0]
    assert first.prompt == (
        "What is the color of the cup?\nA. green\nB. red\nC. blue\nD. black\n"
        "Answer with the option's letter from the given choices directly." + PAPER_SUFFIX
    )
    assert first.image().size == (50, 40)
    bench = benchmarks.get("vstar")
    for v in variants:  # the right letter follows "green" wherever the shuffle put it
        assert v.meta["options"][v.target] == "green"
        assert bench.score(v, f"{v.target}.") == 1.0
    scores = [1.0, 0.0, 0.0]
    agg = bench.aggregate(variants, scores)
    assert agg["accuracy"] == pytest.approx(1 / 3)  # Avg@3
    assert agg["order0"] == 1.0  # the published order alone


def _b64(color: tuple[int, int, int]) -> str:
    return base64.b64encode(_png(color)).decode()


def test_hrbench_tsv_and_parquet_with_base64_images(tmp_path: Path):
    rows = [
        {"index": 0, "question": "What is on the sign?", "answer": "B", "category": "single",
         "cycle_category": "0", "A": "stop", "B": "exit", "C": "open", "D": "closed", "image": _b64((5, 5, 5))},
        {"index": 1, "question": "Which is left?", "answer": "C", "category": "cross",
         "cycle_category": "1", "A": "car", "B": "bus", "C": "bike", "D": "van", "image": _b64((6, 6, 6))},
    ]  # fmt: skip
    with (tmp_path / "hr_bench_4k.tsv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]), delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "hr_bench_8k.parquet")
    four = list(benchmarks.load("hrbench4k", tmp_path, shuffles=1))
    eight = list(benchmarks.load("hrbench8k", tmp_path, shuffles=1))
    assert [s.target for s in four] == ["B", "C"] == [s.target for s in eight]
    assert four[0].prompt == (
        "What is on the sign?\nA. stop\nB. exit\nC. open\nD. closed\nAnswer the option letter directly." + PAPER_SUFFIX
    )
    assert four[0].image().getpixel((1, 1)) == (5, 5, 5)
    bench = benchmarks.get("hrbench4k")
    scores = [bench.score(four[0], "exit"), bench.score(four[1], "A")]
    agg = bench.aggregate(four, scores)
    assert agg["accuracy"] == 0.5  # mean over cycle categories of their means
    assert agg["cycle_category/0"] == 1.0 and agg["cycle_category/1"] == 0.0


def test_mme_realworld_lite_parquet(tmp_path: Path):
    row = {
        "index": 12, "question": "What colour is the car?",
        "multi-choice options": ["(A) red", "(B) blue", "(C) grey", "(D) white", "(E) The image does not feature it."],
        "answer": "C", "category": "perception/Autonomous_Driving", "l2-category": "object/attribute/color",
        "bytes": _b64((7, 7, 7)),
    }  # fmt: skip
    (tmp_path / "data").mkdir()
    pq.write_table(pa.Table.from_pylist([row]), tmp_path / "data" / "train-00000-of-00004.parquet")
    (s,) = benchmarks.load("mme-realworld-lite", tmp_path)
    assert s.prompt.startswith("What colour is the car? The choices are listed below:\n(A) red\n(B) blue\n")
    assert "Respond with only the letter (A, B, C, D, or E)" in s.prompt
    assert s.prompt.endswith("The best answer is: " + PAPER_SUFFIX)
    bench = benchmarks.get("mme-realworld-lite")
    agg = bench.aggregate([s], [bench.score(s, "The best answer is C")])
    assert agg["accuracy"] == 1.0 and agg["Perception/Autonomous_Driving"] == 1.0


def test_wrong_files_are_named_errors(tmp_path: Path):
    with pytest.raises(benchmarks.BenchmarkDataError, match="lmms-lab/textvqa"):
        list(benchmarks.load("textvqa", tmp_path))
    pq.write_table(pa.Table.from_pylist([{"question": "q"}]), tmp_path / "test-0.parquet")
    with pytest.raises(benchmarks.BenchmarkDataError, match="missing column"):
        list(benchmarks.load("chartqa", tmp_path))
    with pytest.raises(benchmarks.BenchmarkDataError, match="unknown benchmark"):
        benchmarks.get("mmmu")
    with pytest.raises(benchmarks.BenchmarkDataError, match="needs --data"):
        benchmarks.load("docvqa", None)


def test_cli_refusals_are_one_line_exit_2(tmp_path: Path):
    runner = CliRunner()
    for args, needle in (
        (["eval", "bench", "mmmu", "--data", str(tmp_path)], "unknown benchmark"),
        (["eval", "bench", "textvqa", "--data", str(tmp_path)], "validation-*.parquet"),
        (["eval", "bench", "textvqa"], "needs --data"),
        (["eval", "bench", "synthetic", "--methods", "zoomy"], "unknown method"),
        (["eval", "bench", "synthetic", "--qzoom-budgets", "a,b"], "comma-separated"),
    ):
        res = runner.invoke(app, args)
        assert res.exit_code == 2, (args, res.output)
        assert needle in res.output
        assert "Traceback" not in res.output
