"""The HTTP service: /ask (JSON, multipart, SSE), errors (422/415/413/503/401), readiness, uploads, the zoom tool."""

from __future__ import annotations

import base64
import io
import json
import struct
import threading
import time
import zlib

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from conftest import MAX_PIXELS, MIN_PIXELS, make_tiny_model, scene
from qzoom.engine import QZoomEngine
from qzoom.offline import build_processor, build_tokenizer
from qzoom.service.app import create_app
from qzoom.settings import Settings

CONTRACT_KEYS = {"answer", "zoomed", "gate_score", "steps", "visual_tokens", "timings_ms", "model"}
STEP_KEYS = {"box", "gate_score", "visual_tokens"}

# The service turns Pillow's bomb warning into an error process-wide; pytest resets warning filters per test.
pytestmark = pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")


@pytest.fixture(scope="module")
def shared_model():
    return make_tiny_model()


def factory_for(model):
    def factory(settings, cache):
        processor = build_processor(build_tokenizer(), min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
        return QZoomEngine(model, processor, name="tiny", cache=cache)

    return factory


def settings(**kw) -> Settings:
    # Explicit values, so that QZOOM_* variables in the test environment change nothing here.
    return Settings(**{"api_keys": [], "redis_url": None, "max_pending": 64, **kw})


def wait_ready(client: TestClient, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.get("/readyz").status_code == 200:
            return
        time.sleep(0.05)
    raise AssertionError(f"not ready: {client.get('/readyz').json()}")


@pytest.fixture(scope="module")
def client(shared_model):
    app = create_app(factory_for(shared_model), settings(max_body_mb=1, max_pixels_in=2_000_000))
    with TestClient(app) as c:
        wait_ready(c)
        yield c


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


PICTURE = png_bytes(scene(320, 240, 7))


def bomb_png(width: int = 40000, height: int = 40000) -> bytes:
    """A valid PNG header claiming width x height pixels, with almost no data (cheap to build, costly to decode)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def assert_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    assert body["error"]["code"] == code
    return body["error"]


def assert_contract(body: dict) -> None:
    assert set(body) == CONTRACT_KEYS
    assert isinstance(body["answer"], str) and isinstance(body["zoomed"], bool)
    assert body["model"] == "tiny"
    for step in body["steps"]:
        assert set(step) == STEP_KEYS and len(step["box"]) == 4


# -- /ask --------------------------------------------------------------------------------------------------------


def test_ask_json_base64_returns_the_contract(client):
    r = client.post("/ask", json={"image": base64.b64encode(PICTURE).decode(), "query": "What is written?"})
    assert r.status_code == 200, r.text
    assert_contract(r.json())


def test_ask_json_data_url_with_options_zooms(client):
    data_url = "data:image/png;base64," + base64.b64encode(PICTURE).decode()
    r = client.post("/ask", json={"image": data_url, "query": "Read the code.", "force_zoom": True, "max_steps": 1})
    assert r.status_code == 200, r.text
    body = r.json()
    assert_contract(body)
    assert body["zoomed"] and len(body["steps"]) == 1


def test_ask_multipart_returns_the_contract(client):
    r = client.post(
        "/ask",
        files={"image": ("pic.png", PICTURE, "image/png")},
        data={"query": "Read the code.", "max_new_tokens": "4", "force_zoom": "true", "gate_thresh": ""},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert_contract(body)
    assert body["zoomed"]


def test_ask_sse_streams_steps_then_the_answer(client):
    r = client.post(
        "/ask",
        json={"image": base64.b64encode(PICTURE).decode(), "query": "Read the code.", "force_zoom": True},
        headers={"Accept": "text/event-stream"},
    )
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    events = []
    for block in r.text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if not line.startswith(":"))
        events.append((lines["event"], json.loads(lines["data"])))
    names = [name for name, _ in events]
    assert names == ["observe", "propose", "zoom", "answer"]
    assert all(data["step"] == name for name, data in events)
    answer = events[-1][1]
    assert_contract(answer["result"])
    assert answer["answer"] == answer["result"]["answer"]
    assert answer["result"]["steps"][0]["box"] == events[2][1]["boxes"][0]


# -- errors ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"max_steps": 99}, "max_steps"),
        ({"gate_thresh": "high"}, "gate_thresh"),
        ({"zoom_level": 3}, "zoom_level"),
        ({"min_pixels": 50000, "max_pixels": 4000}, "min_pixels"),
        ({"multi_box": "vote"}, "multi_box"),
    ],
)
def test_bad_option_is_422_naming_the_field(client, fields, named):
    r = client.post("/ask", json={"image": base64.b64encode(PICTURE).decode(), "query": "q", **fields})
    err = assert_error(r, 422, "invalid_request")
    assert named in err["message"]


def test_multi_box_best_as_a_form_field_answers_from_one_of_the_boxes(client):
    """Several boxes answered one at a time: every box in the zoom event, the one the answer was read beside in the
    result."""
    fields = {"query": "What is written in the red box?", "force_zoom": "true", "roi_thresh": "0.1",
              "box_mode": "components", "max_boxes": "3", "multi_box": "best"}  # fmt: skip
    picture = png_bytes(scene(640, 480, 1))  # its map has several components at τ_roi 0.1 (PICTURE's has one)
    r = client.post(
        "/ask", data=fields, files={"image": ("p.png", picture, "image/png")}, headers={"Accept": "text/event-stream"}
    )
    assert r.status_code == 200, r.text
    events = {}
    for block in r.text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if not line.startswith(":"))
        events[lines["event"]] = json.loads(lines["data"])
    zoomed, (step,) = events["zoom"]["boxes"], events["answer"]["result"]["steps"]
    assert len(zoomed) >= 2 and step["box"] in zoomed


def test_unknown_field_lists_accepted_fields(client):
    r = client.post("/ask", data={"query": "q", "colour": "red"}, files={"image": ("p.png", PICTURE, "image/png")})
    err = assert_error(r, 422, "invalid_request")
    assert "colour" in err["message"] and "max_steps" in err["message"]


def test_missing_query_and_missing_image_are_422(client):
    assert "query" in assert_error(client.post("/ask", json={"image": "aGk="}), 422, "invalid_request")["message"]
    assert "image" in assert_error(client.post("/ask", json={"query": "q"}), 422, "invalid_request")["message"]


def test_text_file_named_png_is_415(client):
    r = client.post("/ask", files={"image": ("x.png", b"hello, I am text", "image/png")}, data={"query": "q"})
    assert_error(r, 415, "unsupported_image")


def test_truncated_png_is_415(client):
    r = client.post("/ask", files={"image": ("x.png", PICTURE[: len(PICTURE) // 2], "image/png")}, data={"query": "q"})
    assert_error(r, 415, "unsupported_image")


def test_decompression_bomb_is_413(client):
    r = client.post("/ask", files={"image": ("bomb.png", bomb_png(), "image/png")}, data={"query": "q"})
    assert_error(r, 413, "image_too_large")


def test_image_over_the_pixel_limit_is_413(client):
    big = png_bytes(Image.new("RGB", (2000, 1001)))  # 2,002,000 > the test app's 2,000,000
    r = client.post("/ask", files={"image": ("big.png", big, "image/png")}, data={"query": "q"})
    assert_error(r, 413, "image_too_large")


def test_body_over_the_limit_is_413_declared_and_chunked(client):
    blob = b"\0" * (1024 * 1024 + 10)
    r = client.post("/ask", files={"image": ("big.png", blob, "image/png")}, data={"query": "q"})
    assert_error(r, 413, "body_too_large")

    def chunks():  # no Content-Length: the middleware must count
        for _ in range(20):
            yield b"x" * 100_000

    r = client.post("/ask", content=chunks(), headers={"Content-Type": "application/json"})
    assert_error(r, 413, "body_too_large")


@pytest.mark.parametrize(
    ("content", "ctype", "status", "code"),
    [
        (b"{not json", "application/json", 400, "invalid_json"),
        (b"[1, 2]", "application/json", 422, "invalid_request"),
        (b"\xff\xfe\x00", "application/json", 400, "invalid_json"),
        (b"query=x", "application/x-www-form-urlencoded", 415, "unsupported_media_type"),
        (b"--zz\r\nbroken", "multipart/form-data; boundary=zz", 422, "invalid_request"),
        (b"", "multipart/form-data", 400, "bad_request"),
    ],
)
def test_hostile_bodies_get_4xx_never_500(client, content, ctype, status, code):
    r = client.post("/ask", content=content, headers={"Content-Type": ctype})
    assert r.status_code < 500, r.text
    assert_error(r, status, code)


def test_hostile_images_and_fields_never_500(client):
    cases = [
        {"json": {"image": "not base64 !!!", "query": "q"}},
        {"json": {"image": "data:text/plain;base64,aGk=", "query": "q"}},
        {"json": {"image": base64.b64encode(b"GIF89a" + b"\0" * 20).decode(), "query": "q"}},
        {"json": {"image": base64.b64encode(PICTURE).decode(), "query": "x" * 5000}},
        {"json": {"image_id": "nope", "query": "q"}},
        {"json": {"image": base64.b64encode(PICTURE).decode(), "image_id": "x", "query": "q"}},
        {"content": b'{"image": "aGk=", "query": "q", "margin": NaN}', "headers": {"Content-Type": "application/json"}},
        {"files": {"image": ("a", b"\x89PNG\r\n\x1a\n" + b"\0" * 50, "image/png")}, "data": {"query": "q"}},
        {"files": {"other": ("a", PICTURE, "image/png")}, "data": {"query": "q"}},
    ]
    for kw in cases:
        r = client.post("/ask", **kw)
        assert 400 <= r.status_code < 500, (kw.get("json", kw.get("data")), r.text)
        assert set(r.json()) == {"error"}


def test_overloaded_worker_is_503_with_retry_after(client):
    worker = client.app.state.qzoom.worker
    held = [worker.admit() for _ in range(worker.max_pending)]
    for h in held:
        h.__enter__()
    try:
        for headers in ({}, {"Accept": "text/event-stream"}):
            r = client.post("/ask", json={"image": base64.b64encode(PICTURE).decode(), "query": "q"}, headers=headers)
            assert_error(r, 503, "overloaded")
            assert int(r.headers["Retry-After"]) >= 1
    finally:
        for h in held:
            h.__exit__(None, None, None)
    assert worker.in_flight == 0
    assert client.post("/ask", json={"image": base64.b64encode(PICTURE).decode(), "query": "q"}).status_code == 200


def test_hostile_requests_never_reach_the_catch_all(client, caplog):
    with caplog.at_level("ERROR"):
        test_hostile_images_and_fields_never_500(client)
        for content, ctype in [(b"\0" * 100, "multipart/form-data; boundary=\0"), (b"null", "application/json")]:
            assert client.post("/ask", content=content, headers={"Content-Type": ctype}).status_code < 500
    assert not [r for r in caplog.records if "unhandled error" in r.getMessage()]


def test_a_genuine_bug_is_a_logged_500_in_the_error_model(shared_model, caplog):
    app = create_app(factory_for(shared_model), settings())

    @app.get("/bug")
    async def bug() -> None:
        raise RuntimeError("a bug")

    with TestClient(app, raise_server_exceptions=False) as c, caplog.at_level("ERROR"):
        assert_error(c.get("/bug"), 500, "internal_error")
    assert any("unhandled error" in r.getMessage() for r in caplog.records)


def test_unknown_route_and_method_use_the_error_model(client):
    assert_error(client.get("/nope"), 404, "not_found")
    assert_error(client.get("/ask"), 405, "method_not_allowed")


# -- readiness and API keys --------------------------------------------------------------------------------------


def test_readyz_is_503_until_loaded_and_warmed(shared_model):
    release = threading.Event()
    inner = factory_for(shared_model)

    def slow_factory(settings, cache):
        assert release.wait(30)
        return inner(settings, cache)

    with TestClient(create_app(slow_factory, settings())) as c:
        assert c.get("/healthz").status_code == 200
        err = assert_error(c.get("/readyz"), 503, "not_ready")
        assert "loading" in err["message"]
        r = c.post("/ask", json={"image": base64.b64encode(PICTURE).decode(), "query": "q"})
        assert_error(r, 503, "not_ready")
        assert "Retry-After" in r.headers
        release.set()
        wait_ready(c)
        assert c.get("/readyz").json() == {"status": "ready", "model": "tiny"}


def test_failed_load_is_reported_by_readyz():
    def broken(settings, cache):
        raise FileNotFoundError("no checkpoint at /nowhere")

    with TestClient(create_app(broken, settings())) as c:
        deadline = time.monotonic() + 10
        while "failed" not in c.get("/readyz").json()["error"]["message"] and time.monotonic() < deadline:
            time.sleep(0.02)
        err = assert_error(c.get("/readyz"), 503, "not_ready")
        assert "/nowhere" in err["message"]
        assert c.get("/healthz").json() == {"status": "ok"}


def test_api_key_required_when_configured_health_open(shared_model):
    app = create_app(factory_for(shared_model), settings(api_keys=["k-one", "k-two"]))
    body = {"image": base64.b64encode(PICTURE).decode(), "query": "q", "max_new_tokens": 2}
    with TestClient(app) as c:
        wait_ready(c)
        assert c.get("/healthz").status_code == 200
        assert_error(c.post("/ask", json=body), 401, "unauthorized")
        assert_error(c.post("/ask", json=body, headers={"X-API-Key": "k-three"}), 401, "unauthorized")
        assert_error(c.post("/v1/tools/zoom", json={}), 401, "unauthorized")
        assert c.post("/ask", json=body, headers={"X-API-Key": "k-two"}).status_code == 200


# -- uploads and the zoom tool -----------------------------------------------------------------------------------


def test_upload_then_ask_by_image_id(client):
    r = client.post("/v1/images", files={"image": ("pic.png", PICTURE, "image/png")})
    assert r.status_code == 200, r.text
    up = r.json()
    assert up["width"] == 320 and up["height"] == 240
    again = client.post("/v1/images", files={"image": ("same.png", PICTURE, "image/png")}).json()
    assert again["image_id"] == up["image_id"]
    r = client.post("/ask", json={"image_id": up["image_id"], "query": "q"})
    assert r.status_code == 200, r.text
    assert_contract(r.json())
    # Multipart with the id as a plain field (no file part).
    r = client.post("/ask", files=[("image_id", (None, up["image_id"])), ("query", (None, "q"))])
    assert r.status_code == 200, r.text
    assert_contract(r.json())


def test_upload_errors(client):
    assert_error(client.post("/v1/images", files={"image": ("x.png", b"text", "image/png")}), 415, "unsupported_image")
    assert_error(client.post("/v1/images", files={"image": ("b.png", bomb_png(), "image/png")}), 413, "image_too_large")
    assert_error(client.post("/v1/images", json={"image": "x"}), 415, "unsupported_media_type")
    assert_error(client.post("/v1/images", data={"image": "x"}, files={"f": ("a", b"", "x/y")}), 422, "invalid_request")


def test_zoom_tool_with_a_box(client):
    image_id = client.post("/v1/images", files={"image": ("pic.png", PICTURE, "image/png")}).json()["image_id"]
    r = client.post("/v1/tools/zoom", json={"image_id": image_id, "box": {"coords": [0.5, 0, 1, 0.5], "frame": "unit"}})
    assert r.status_code == 200, r.text
    res = r.json()
    assert res["box"] == [160, 0, 320, 120] and res["image_wh"] == [320, 240] and res["box_source"] == "caller"
    crop = Image.open(io.BytesIO(base64.b64decode(res["crop_png_b64"])))
    assert crop.size == (160, 120)


def test_zoom_tool_with_image_data_and_query(client):
    r = client.post(
        "/v1/tools/zoom", json={"image_data": base64.b64encode(PICTURE).decode(), "query": "Read the code."}
    )
    assert r.status_code == 200, r.text
    assert r.json()["box_source"] == "sd_rpn"


def test_zoom_tool_errors(client):
    bad_box = {"image_id": "x", "box": {"coords": [0, 0], "frame": "unit"}}
    err = assert_error(client.post("/v1/tools/zoom", json=bad_box), 422, "invalid_request")
    assert "coords" in err["message"]
    assert_error(client.post("/v1/tools/zoom", json={"image_id": "missing", "query": "q"}), 404, "unknown_image")
    r = client.post("/v1/tools/zoom", json={"image_path": "/etc/passwd", "query": "q"})
    assert_error(r, 422, "invalid_request")
    r = client.post("/v1/tools/zoom", json={"image_data": base64.b64encode(bomb_png()).decode(), "query": "q"})
    assert_error(r, 413, "image_too_large")
    r = client.post("/v1/tools/zoom", content=b"{", headers={"Content-Type": "application/json"})
    assert_error(r, 400, "invalid_json")


# -- the command ---------------------------------------------------------------------------------------------------


def test_serve_help_and_missing_model():
    from typer.testing import CliRunner

    from qzoom.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["serve", "--help"])
    assert r.exit_code == 0, r.output
    for option in ("--host", "--port", "--model", "--redis-url", "--device"):
        assert option in r.output
    r = runner.invoke(app, ["serve", "--model", "/nowhere/at/all"])
    assert r.exit_code == 2 and "does not exist" in r.output


def test_metrics_expose_queue_and_cache_counters(client):
    client.post("/ask", json={"image": base64.b64encode(PICTURE).decode(), "query": "q", "max_new_tokens": 2})
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert "qzoom_ready 1.0" in text
    for series in ("qzoom_queue_depth", "qzoom_requests_in_flight", 'qzoom_worker_batches_total{step="observe"}',
                   'qzoom_cache_events_total{event="misses",kind="vision"}', "qzoom_cache_l1_bytes"):  # fmt: skip
        assert series in text, series
    observe = [line for line in text.splitlines() if line.startswith('qzoom_worker_batches_total{step="observe"}')]
    assert float(observe[0].split()[-1]) >= 2  # warm-up + at least one request
