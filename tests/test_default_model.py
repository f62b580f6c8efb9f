"""The default model: `--model`, else QZOOM_MODEL, else the demo model shipped in the package (`qzoom.models`); an
install without one says how to get a model instead of failing with a stack trace."""

from __future__ import annotations

import io
import json
import time

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

import qzoom.models
from qzoom.cli import app
from qzoom.models import ModelNotFoundError, default_model_dir
from qzoom.service.app import create_app
from qzoom.settings import Settings, get_settings

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("models") / "qzoom-tiny"
    result = runner.invoke(app, ["init-tiny", str(out)])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def shipped(monkeypatch, tiny_dir):
    """A package whose demo model is `tiny_dir`."""
    monkeypatch.setattr(qzoom.models, "DEMO_MODEL", tiny_dir)
    return tiny_dir


@pytest.fixture
def not_shipped(monkeypatch, tmp_path):
    monkeypatch.setattr(qzoom.models, "DEMO_MODEL", tmp_path / "qzoom-tiny")
    return tmp_path / "qzoom-tiny"


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv("QZOOM_MODEL", raising=False)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def picture_png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (320, 240), (30, 120, 200)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("value", [None, ""])  # compose passes QZOOM_MODEL through empty when .env leaves it unset
def test_settings_fall_back_to_the_shipped_model(shipped, value):
    assert Settings(model=value).model_dir() == str(shipped)
    assert Settings(model="/ckpt/other").model_dir() == "/ckpt/other"


def test_without_a_shipped_model_the_error_says_how_to_get_one(not_shipped):
    with pytest.raises(ModelNotFoundError, match="qzoom train demo") as err:
        Settings(model=None).model_dir()
    assert str(not_shipped) in str(err.value) and "--model" in str(err.value)
    assert isinstance(err.value, OSError)  # callers that report OSErrors as user errors report this one too
    not_shipped.mkdir()  # an empty folder (say, a wheel built without the weights) is no model either
    with pytest.raises(ModelNotFoundError):
        default_model_dir()


def test_ask_without_model_uses_the_shipped_one(shipped, no_env, tmp_path):
    image = tmp_path / "blue.png"
    image.write_bytes(picture_png())
    result = runner.invoke(app, ["ask", str(image), "What colour is it?", "--json", "--max-new-tokens", "2"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["model"] == shipped.name


@pytest.mark.parametrize("command", [["ask", "x.png", "q"], ["serve"], ["mcp"], ["eval", "demo"]])
def test_commands_without_any_model_fail_clearly(not_shipped, no_env, command):
    result = runner.invoke(app, command)
    assert result.exit_code == 2
    assert "no model given" in result.output and "qzoom train demo" in result.output


def test_service_without_model_serves_the_shipped_one(shipped):
    with TestClient(create_app(settings=Settings(model=None, redis_url=None, api_keys=[]))) as c:
        deadline = time.monotonic() + 60
        while c.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, c.get("/readyz").text
            time.sleep(0.1)
        resp = c.post("/ask", files={"image": ("b.png", picture_png(), "image/png")}, data={"query": "Colour?"})
    assert resp.status_code == 200, resp.text
    assert resp.json()["model"] == shipped.name
