"""The `qzoom` command line: `ask --json` prints exactly the contract; errors name the problem."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from conftest import scene
from qzoom.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    result = runner.invoke(app, ["init-tiny", str(out)])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "pic.png"
    scene(480, 360, 5).save(path)
    return path


def test_ask_json_prints_exactly_one_contract_object(tiny_dir, picture, tmp_path):
    show = tmp_path / "show.png"
    args = [
        "ask",
        str(picture),
        "What is in the box?",
        "--model",
        str(tiny_dir),
        "--json",
        "--zoom",
        "--roi-thresh",
        "0.4",
        "--max-new-tokens",
        "3",
        "--show",
        str(show),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)  # the whole of stdout is one JSON object
    assert set(data) == {"answer", "zoomed", "gate_score", "steps", "visual_tokens", "timings_ms", "model"}
    assert data["zoomed"] is True and data["gate_score"] is None  # forced zoom: the gate is not consulted
    (step,) = data["steps"]
    x0, y0, x1, y1 = step["box"]
    assert all(isinstance(v, int) for v in step["box"]) and 0 <= x0 < x1 <= 480 and 0 <= y0 < y1 <= 360
    assert data["model"] == tiny_dir.name
    from PIL import Image

    assert Image.open(show).size == (480, 360)


def test_ask_readable_output_names_gate_and_boxes(tiny_dir, picture):
    result = runner.invoke(
        app, ["ask", str(picture), "hi", "--model", str(tiny_dir), "--no-zoom", "--max-new-tokens", "2"]
    )
    assert result.exit_code == 0, result.output
    assert "gate score:" in result.stdout and "zoomed: no" in result.stdout


def test_ask_max_steps_0_says_so_and_times_only_when_verbose(tiny_dir, picture):
    args = ["ask", str(picture), "hi", "--model", str(tiny_dir), "--max-steps", "0", "--max-new-tokens", "2"]
    quiet = runner.invoke(app, args)
    assert quiet.exit_code == 0, quiet.output
    assert "gate score: not consulted (--max-steps 0" in quiet.stdout and "zoomed: no" in quiet.stdout
    assert "time:" not in quiet.output
    loud = runner.invoke(app, [*args, "--verbose"])
    (line,) = [x for x in loud.stderr.splitlines() if x.startswith("time:")]
    assert "prefill" in line  # the split per step, beside the total
    assert loud.stdout == quiet.stdout


def test_a_missing_image_is_reported_before_the_model_loads(tiny_dir, tmp_path, monkeypatch):
    from qzoom.engine import QZoomEngine

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the image was checked")

    monkeypatch.setattr(QZoomEngine, "from_pretrained", load)
    result = runner.invoke(app, ["ask", str(tmp_path / "nope.png"), "q", "--model", str(tiny_dir)])
    assert result.exit_code == 2 and "nope.png" in result.output and len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--min-pixels", "9000000", "--max-pixels", "1000"], "must not exceed"),
        (["--model", "/nonexistent"], "model directory /nonexistent does not exist"),
    ],
)
def test_ask_errors_are_clear(tiny_dir, picture, extra, message):
    args = ["ask", str(picture), "q", "--model", str(tiny_dir), *extra]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and message in result.output


def test_ask_names_a_folder_that_is_not_a_checkpoint(picture, tmp_path):
    result = runner.invoke(app, ["ask", str(picture), "q", "--model", str(tmp_path)])
    assert result.exit_code == 2 and "no config.json" in result.output


def test_ask_rejects_a_text_file_posing_as_png(tiny_dir, tmp_path):
    fake = tmp_path / "fake.png"
    fake.write_text("hello")
    result = runner.invoke(app, ["ask", str(fake), "q", "--model", str(tiny_dir)])
    assert result.exit_code == 2 and "not a readable image" in result.output


def test_export_synthetic_writes_jsonl_and_pngs(tmp_path):
    result = runner.invoke(app, ["eval", "export-synthetic", str(tmp_path), "--n", "2", "--families", "colour,count"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in (tmp_path / "items.jsonl").read_text().splitlines()]
    assert [item["family"] for item in lines] == ["colour", "count"]
    assert all((tmp_path / item["image"]).is_file() for item in lines)
    bad = runner.invoke(app, ["eval", "export-synthetic", str(tmp_path), "--families", "nope"])
    assert bad.exit_code == 2 and "choose from" in bad.output
