"""One guard set for every entry point (qzoom.guards): each hole a hostile client found, reproduced.

The service answers deep JSON, unpaired surrogates and odd encodings with 4xx (never 500) on every JSON route; the
415 and 413 messages name what was wrong without Python object reprs and quote one cap figure; the CLI refuses the
same inputs with one line and exit 2 before any model loads.
"""

from __future__ import annotations

import base64
import io
import re
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from qzoom.cli import app as cli_app
from qzoom.guards import (
    BodyError,
    ImageError,
    ImageTooLarge,
    QueryError,
    check_query,
    open_image,
    parse_json,
    probe_image,
)
from qzoom.images import load_image
from qzoom.service.app import create_app
from test_service import PICTURE, assert_error, bomb_png, factory_for, settings, wait_ready

pytestmark = pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")

DEEP = b'{"a":' * 1100 + b"1" + b"}" * 1100  # 2.2 KB, 1,100 levels: Python's json raised RecursionError (a 500)
JSON_ROUTES = ["/ask", "/v1/tools/gate", "/v1/tools/propose", "/v1/tools/zoom", "/v1/think"]
CAP = 2_000_000


@pytest.fixture(scope="module")
def client(shared_model):
    app = create_app(factory_for(shared_model), settings(max_body_mb=1, max_pixels_in=CAP))
    with TestClient(app, raise_server_exceptions=False) as c:
        wait_ready(c)
        yield c


@pytest.fixture(scope="module")
def shared_model():
    from conftest import make_tiny_model

    return make_tiny_model()


# -- the guards themselves -------------------------------------------------------------------------------------------


def test_parse_json_refuses_deep_nesting_surrogates_nan_and_non_utf8():
    for body in [DEEP, b'{"q": "\\ud800"}', b'{"q": NaN}', '{"q": "é"}'.encode("utf-16"), b'{"q": "\xc3\x28"}']:
        with pytest.raises(BodyError) as err:
            parse_json(body)
        assert err.value.status == 400 and "JSON" in str(err.value)
    assert parse_json(b'{"q": "\\u00e9", "n": [1, 2]}') == {"q": "é", "n": [1, 2]}


def test_open_image_reads_the_header_only_and_quotes_one_cap():
    header = probe_image(bomb_png(1500, 1000), max_pixels=CAP)
    assert (header.width, header.height, header.format) == (1500, 1000, "PNG")
    for w, h in [(3000, 3000), (30000, 30000), (100000, 100000)]:  # under, at and far over Pillow's own limits
        with pytest.raises(ImageTooLarge) as err:
            open_image(bomb_png(w, h), max_pixels=CAP)
        figures = {int(n) for n in re.findall(r"\d{6,}", str(err.value))}
        assert figures == {w * h, CAP}, str(err.value)  # the image's pixels and the one cap, nothing else


def test_load_image_refuses_other_formats_and_names_no_object_repr(tmp_path):
    for data in [b"hello", b"", b"\x89PNG\r\n\x1a\n" + b"\0" * 20, b"SIMPLE  =                    T" + b" " * 2850]:
        with pytest.raises(ImageError) as err:
            load_image(data, max_pixels=CAP)
        assert "<_io" not in str(err.value) and "object at 0x" not in str(err.value)
        assert "PNG, JPEG, WebP, GIF, BMP or TIFF" in str(err.value) or "empty" in str(err.value)
    psd = tmp_path / "x.ico"
    Image.new("RGB", (16, 16)).save(psd, format="ICO")  # a real image in a format outside the allow-list
    with pytest.raises(ImageError):
        load_image(psd, max_pixels=CAP)


def test_check_query_refuses_blank_and_overlong():
    for text in ["", "   \n\t"]:
        with pytest.raises(QueryError, match="empty or blank"):
            check_query(text)
    with pytest.raises(QueryError, match="at most 4000"):
        check_query("x" * 4001)
    assert check_query(" a ") == " a "


# -- the service: no request content produces a 500 ------------------------------------------------------------------


@pytest.mark.parametrize("route", JSON_ROUTES)
def test_deep_json_is_a_400_on_every_json_route(client, route):
    r = client.post(route, content=DEEP, headers={"content-type": "application/json"})
    assert_error(r, 400, "invalid_json")
    assert "nested deeper" in r.json()["error"]["message"]


@pytest.mark.parametrize("route", JSON_ROUTES)
@pytest.mark.parametrize(
    "body",
    [
        b'{"query": "\\ud800", "image": "x"}',  # an unpaired surrogate: valid for Python's json, unencodable later
        '{"query": "what?"}'.encode("utf-16"),
        b'{"query": "\xff\xfe"}',
        b'{"query": NaN}',
    ],
    ids=["lone-surrogate", "utf-16", "bad-utf-8", "nan"],
)
def test_odd_encodings_are_a_400_on_every_json_route(client, route, body):
    assert_error(client.post(route, content=body, headers={"content-type": "application/json"}), 400, "invalid_json")


@pytest.mark.parametrize("route", ["/ask", "/v1/tools/gate", "/v1/think"])
def test_a_blank_query_is_a_422(client, route):
    body = {"image": base64.b64encode(PICTURE).decode(), "query": "  \n ", "profile": "deepeyes"}
    if route != "/v1/think":
        body.pop("profile")
    err = assert_error(client.post(route, json=body), 422, "invalid_request")
    assert "query" in err["message"] and "blank" in err["message"]


def test_415_names_the_accepted_formats_not_a_stream_object(client):
    r = client.post("/ask", files={"image": ("x.png", b"not an image at all", "image/png")}, data={"query": "q"})
    err = assert_error(r, 415, "unsupported_image")
    assert "object at 0x" not in err["message"] and "PNG, JPEG, WebP, GIF, BMP or TIFF" in err["message"]


@pytest.mark.parametrize("size", [(3000, 3000), (9000, 9000), (40000, 40000)])
def test_413_quotes_the_same_cap_for_every_size(client, size):
    r = client.post("/v1/images", files={"image": ("b.png", bomb_png(*size), "image/png")})
    err = assert_error(r, 413, "image_too_large")
    assert f"at most {CAP} pixels" in err["message"]
    assert str(2 * CAP) not in err["message"] and "80000000" not in err["message"]


# -- the CLI: one line on stderr, exit 2, before any model loads -----------------------------------------------------


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    small = d / "small.png"
    Image.new("RGB", (64, 48), (9, 9, 9)).save(small)
    huge = d / "huge.png"
    huge.write_bytes(bomb_png(30000, 30000))
    over = d / "over.png"
    over.write_bytes(bomb_png(12000, 10000))  # 120 Mpx: over the service's default cap of 40 Mpx
    return {"small": small, "huge": huge, "over": over, "missing": d / "missing.png"}


CLI_CASES = [
    (["huge", "what?"], "at most 40000000 pixels"),
    (["over", "what?"], "120000000 pixels; at most 40000000 pixels"),
    (["small", "   "], "query: must not be empty or blank"),
    (["small", ""], "query: must not be empty or blank"),
    (["small", "q", "--max-steps", "9"], "--max-steps"),
    (["small", "q", "--max-new-tokens", "abc"], "--max-new-tokens"),
    (["small", "q", "--box-mode", "nope"], "--box-mode"),
    (["small", "q", "--device", "cuda"], "device 'cuda' is not available"),
    (["small", "q", "--device", "tpu:7"], "device 'tpu:7'"),
    (["missing", "q"], "image file not found"),
]


@pytest.mark.parametrize(("argv", "needle"), CLI_CASES, ids=[c[1][:24] for c in CLI_CASES])
def test_cli_user_errors_are_one_line_exit_2(pictures, argv, needle, tmp_path):
    # --model names a folder that is no checkpoint: loading it would fail with "no config.json", so the error seen
    # proves the input was checked before the model load.
    args = ["ask", str(pictures[argv[0]]), *argv[1:], "--model", str(tmp_path)]
    if "--device" in argv and "cuda" in argv:
        pytest.importorskip("torch")
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    result = CliRunner().invoke(cli_app, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.stderr
    assert "Traceback" not in result.output


def test_cli_errors_through_the_real_entry_point(pictures):
    # The installed `qzoom` script, in a fresh process: a bomb PNG and a bad option value, one line each.
    script = Path(sys.executable).parent / "qzoom"
    for argv, needle in [([str(pictures["huge"]), "q"], "pixels"), ([str(pictures["small"]), "q", "--zoom=x"], "")]:
        out = subprocess.run([str(script), "ask", *argv], capture_output=True, text=True, timeout=120)
        assert out.returncode == 2, out.stderr
        lines = [line for line in out.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], out.stderr


def test_cli_blank_api_keys_setting_is_a_one_line_error(pictures, monkeypatch):
    from qzoom.settings import get_settings

    monkeypatch.setenv("QZOOM_API_KEYS", " , ")
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(cli_app, ["ask", str(pictures["small"]), "q"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 2 and "QZOOM_API_KEYS" in result.stderr and len(result.stderr.splitlines()) == 1


def test_python_api_load_image_applies_the_setting(monkeypatch):
    from qzoom.settings import get_settings

    monkeypatch.setenv("QZOOM_MAX_PIXELS_IN", "1000")
    get_settings.cache_clear()
    try:
        with pytest.raises(ImageTooLarge, match="at most 1000 pixels"):
            load_image(bomb_png(100, 100))
        buf = io.BytesIO()
        Image.new("RGB", (20, 20)).save(buf, format="PNG")
        assert load_image(buf.getvalue()).size == (20, 20)
    finally:
        get_settings.cache_clear()


@pytest.mark.parametrize("command", [["serve", "--device", "cuda:7", "--port", "1"], ["mcp"]])
def test_serve_and_mcp_refuse_a_missing_device_before_starting(command, monkeypatch):
    from qzoom.settings import get_settings

    monkeypatch.setenv("QZOOM_DEVICE", "cuda:7")
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(cli_app, command)
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 2 and result.stderr.startswith("error: device 'cuda:7'"), result.output
    assert len(result.stderr.splitlines()) == 1
