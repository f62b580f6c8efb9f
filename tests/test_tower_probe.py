"""The tower probe (`qzoom eval tower-probe`): the linear probe learns what features show and nothing more, and on the
shipped checkpoint it finds the details its tower was trained to read."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from qzoom.cli import app
from qzoom.engine import QZoomEngine
from qzoom.evals.tower_probe import CROPS, TowerProbe, fit_linear_probe, format_probe, probe_tower
from qzoom.models import default_model_dir


def test_the_probe_reads_separable_features_and_not_noise():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(10, 32, generator=g) * 3
    labels = torch.randint(0, 10, (600,), generator=g)
    features = centres[labels] + torch.randn(600, 32, generator=g)
    predict = fit_linear_probe(features[:400], labels[:400], 10, steps=300)
    assert (predict(features[400:]) == labels[400:]).float().mean() > 0.95
    noise = torch.randn(600, 32, generator=g)  # the same labels on features that say nothing about them
    predict = fit_linear_probe(noise[:400], labels[:400], 10, steps=300)
    assert (predict(noise[400:]) == labels[400:]).float().mean() < 0.3  # chance is 0.1


def test_whole_answers_need_every_glyph_of_a_code():
    report = TowerProbe(accuracy={"native": {"code": 0.9, "letter": 0.9}})
    assert report.whole_answer("native", "code") == pytest.approx(0.729)
    assert report.whole_answer("native", "letter") == pytest.approx(0.9)


@pytest.fixture(scope="module")
def shipped() -> TowerProbe:
    return probe_tower(QZoomEngine.from_pretrained(default_model_dir()), train_items=150, val_items=40)


def test_the_shipped_tower_shows_the_details_far_above_chance(shipped):
    for crop in CROPS:
        assert set(shipped.accuracy[crop]) == {"code", "code_at", "letter", "pattern", "shape"}
        assert shipped.train_tokens[crop] > 150  # several tokens per code
        hits = sum(shipped.accuracy[crop][f] * n for f, n in shipped.tokens[crop].items())
        # Chance is 1 in 38 classes; on 2,700 training tokens the probe reads 81-97% (docs/demo_model.md).
        assert hits / sum(shipped.tokens[crop].values()) > 0.5
    table = format_probe(shipped)
    assert "true box" in table and "whole answer" in table


def test_the_command_refuses_an_empty_item_count():
    result = CliRunner().invoke(app, ["eval", "tower-probe", "--train-items", "0"])
    assert result.exit_code != 0 and "--train-items" in result.output
