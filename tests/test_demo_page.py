"""The demo page at `/`, in a real browser: Debian's Chromium driven by Playwright against uvicorn on a loopback
port, serving a tiny model with an API key set.

The browser picks an image, types a question, is refused without the key (the error is shown), then with the key
streams the SSE steps and shows the answer, the zoom box drawn where the API put it, the heatmap and the gate score.
Under CI=true a missing Chromium fails; elsewhere the browser test is skipped with the reason.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn
from PIL import Image

from conftest import MAX_PIXELS, MIN_PIXELS, make_tiny_model, scene
from qzoom.engine import QZoomEngine
from qzoom.offline import build_processor, build_tokenizer
from qzoom.service.app import create_app
from qzoom.service.page import ASSETS, STATIC_DIR
from qzoom.settings import Settings

API_KEY = "demo-key-1"
IMAGE = scene(640, 400, 11)
QUESTION = "What is written in the small box?"
BOX_STROKE = (0xFF, 0x3D, 0x71)  # COLORS[0] in app.js: the first zoom box's stroke


def _need(message: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def chromium_path() -> str:
    path = "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else shutil.which("chromium")
    if path is None:
        _need("Chromium is not installed (apt-get install chromium): the demo page test drives a real browser")
    assert path is not None
    return path


class LiveServer:
    """uvicorn serving the app on 127.0.0.1 with a free port, in a background thread."""

    def __init__(self, **settings):
        def factory(s, cache):
            processor = build_processor(build_tokenizer(), min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
            return QZoomEngine(make_tiny_model(), processor, name="tiny", cache=cache)

        app = create_app(factory, Settings(redis_url=None, **{"api_keys": [], "max_pending": 64, **settings}))
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}"
        while httpx.get(self.url + "/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def live():
    with LiveServer(api_keys=[API_KEY]) as server:
        yield server


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def api_ask(live: LiveServer, **options: str) -> dict:
    """What the API itself answers for the page's request (same image, question and options)."""
    r = httpx.post(
        live.url + "/ask",
        data={"query": QUESTION, **options},
        files={"image": ("scene.png", png_bytes(IMAGE), "image/png")},
        headers={"X-API-Key": API_KEY},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    return r.json()


# -- serving (no browser) ----------------------------------------------------------------------------------------


def test_page_and_assets_load_without_a_key_from_this_origin_only(live):
    page = httpx.get(live.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    html = page.text
    for ref in re.findall(r'(?:src|href)="([^"]+)"', html):
        assert ref.startswith("/"), f"the page must load nothing from other hosts: {ref}"
        if ref.startswith("/static/"):
            asset = httpx.get(live.url + ref)
            assert asset.status_code == 200, ref
            assert "charset" in asset.headers["content-type"] or ref.endswith(".svg")
    assert {"index.html", "app.js", "style.css", "favicon.svg"} <= set(ASSETS)
    assert "url(" not in (STATIC_DIR / "style.css").read_text()  # no web fonts or remote images
    assert not re.search(r"fetch\(\s*[\"'`]https?:", (STATIC_DIR / "app.js").read_text())
    # Unknown names and attempts to leave the folder are the JSON 404, not a file.
    for bad in ("/static/nope.js", "/static/..%2Fpage.py", "/static/%2e%2e/page.py"):
        r = httpx.get(live.url + bad)
        assert r.status_code == 404, bad
        assert r.json()["error"]["code"] == "not_found"
    # The page is open; the API it calls is not.
    assert httpx.post(live.url + "/ask", data={"query": "q"}).status_code == 401


def test_propose_events_say_where_the_heatmap_lies(live):
    with httpx.stream(
        "POST",
        live.url + "/ask",
        data={"query": QUESTION, "force_zoom": "true"},
        files={"image": ("scene.png", png_bytes(IMAGE), "image/png")},
        headers={"X-API-Key": API_KEY, "Accept": "text/event-stream"},
        timeout=60,
    ) as r:
        text = r.read().decode()
    events = {}
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if not line.startswith(":"))
        events[lines["event"]] = json.loads(lines["data"])
    propose = events["propose"]
    rows, cols = propose["heatmap_grid"]
    assert len(propose["heatmap"]) == rows and {len(r) for r in propose["heatmap"]} == {cols}
    assert all(0.0 <= v <= 1.0 for r in propose["heatmap"] for v in r)
    assert propose["heatmap_box"] == [0, 0, IMAGE.width, IMAGE.height]  # step 0 scores the whole image


# -- the browser -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    executable = chromium_path()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _need("playwright is not installed (pip install -e '.[dev]')")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, headless=True)
        yield b
        b.close()


def submit_and_wait(page) -> None:
    """Press Ask and wait until that request has finished (answered, refused or failed)."""
    before = int(page.get_attribute("#ask-form", "data-finished") or 0)
    page.click("#submit")
    page.wait_for_selector(f"#ask-form[data-finished='{before + 1}']", timeout=60_000)


def rendered_box(page) -> tuple[list[int], dict, dict]:
    """The drawn box's data, its on-screen rectangle, and the image's on-screen rectangle and natural size."""
    return page.evaluate(
        """() => {
            const rect = document.querySelector('#boxes rect.zoom-box');
            const img = document.getElementById('preview');
            const r = rect.getBoundingClientRect(), i = img.getBoundingClientRect();
            return [rect.dataset.box.split(',').map(Number),
                    {x: r.x, y: r.y, w: r.width, h: r.height},
                    {x: i.x, y: i.y, w: i.width, h: i.height, nw: img.naturalWidth, nh: img.naturalHeight}];
        }"""
    )


def test_a_person_asks_and_sees_steps_box_heatmap_and_answer(live, browser, tmp_path):
    forced = api_ask(live, force_zoom="true")
    gated = api_ask(live, gate_thresh="0")
    assert forced["steps"] and gated["gate_score"] is not None  # the tiny model must give the page something to draw

    image_path = tmp_path / "scene.png"
    IMAGE.save(image_path)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    js_errors: list[str] = []
    page.on("pageerror", lambda err: js_errors.append(str(err)))
    foreign: list[str] = []
    page.on(
        "request",
        lambda req: None if req.url.startswith((live.url, "data:", "blob:")) else foreign.append(req.url),
    )

    page.goto(live.url + "/")
    page.wait_for_selector("#server-status[data-state='ready']", timeout=30_000)
    assert "tiny" in page.inner_text("#server-status")
    page.set_input_files("#image-input", str(image_path))
    page.wait_for_selector("#frame:not([hidden])")
    assert "640×400" in page.inner_text("#image-name")
    page.fill("#query", QUESTION)
    page.select_option("#force-zoom", "true")

    # 1. No key: the API's 401 is shown to the person, and nothing is drawn.
    submit_and_wait(page)
    error = page.inner_text("#error")
    assert page.is_visible("#error") and "401" in error and "unauthorized" in error and "X-API-Key" in error
    assert page.locator("#boxes rect").count() == 0

    # 2. With the key (remembered in localStorage): the streamed steps, the answer, the box where the API put it.
    page.fill("#api-key", API_KEY)
    submit_and_wait(page)
    assert not page.is_visible("#error")
    assert page.evaluate("localStorage.getItem('qzoom.apiKey')") == API_KEY
    assert page.inner_text("#answer") == (forced["answer"] or "(empty answer)")
    steps = page.eval_on_selector_all("#steps li", "els => els.map(e => e.dataset.step)")
    assert steps == ["observe", "propose", "zoom", "answer"]
    assert page.inner_text("#gate-score") == "not run (zoom forced)"
    assert page.inner_text("#visual-tokens") == str(forced["visual_tokens"])
    assert page.inner_text("#zoom-count") == "1"
    assert page.locator("#timings tr").count() == len(forced["timings_ms"])
    box, on_screen, img = rendered_box(page)
    assert box == forced["steps"][0]["box"]
    scale = img["w"] / img["nw"]
    assert img["nw"] == IMAGE.width and abs(img["h"] / img["nh"] - scale) < 1e-3
    # Drawn in original-image pixels, scaled to the displayed image.
    assert on_screen["x"] == pytest.approx(img["x"] + box[0] * scale, abs=2)
    assert on_screen["y"] == pytest.approx(img["y"] + box[1] * scale, abs=2)
    assert on_screen["w"] == pytest.approx((box[2] - box[0]) * scale, abs=2)
    assert on_screen["h"] == pytest.approx((box[3] - box[1]) * scale, abs=2)
    heat = page.eval_on_selector("#heatmap", "e => [e.getAttribute('visibility'), e.dataset.box, e.dataset.grid]")
    assert heat[0] == "visible" and heat[1] == f"0,0,{IMAGE.width},{IMAGE.height}" and re.fullmatch(r"\d+x\d+", heat[2])

    # 3. The gate decides (threshold 0 so that it fires): its score is shown, and the box again.
    page.select_option("#force-zoom", "")
    page.click(".advanced summary")
    page.fill("#gate-thresh", "0")
    submit_and_wait(page)
    shown = float(page.get_attribute("#gate-score", "data-score"))
    assert shown == pytest.approx(gated["gate_score"], abs=1e-6)
    assert page.inner_text("#gate-score").startswith(f"{gated['gate_score']:.3f} → zoom")
    steps = page.eval_on_selector_all("#steps li", "els => els.map(e => e.dataset.step)")
    assert steps == ["observe", "gate", "propose", "zoom", "answer"]
    assert page.inner_text("#answer") == (gated["answer"] or "(empty answer)")
    box, on_screen, _ = rendered_box(page)
    assert box == gated["steps"][0]["box"]

    # 4. The box mode reaches the API: the heaviest blob alone, as the API draws it for the same request.
    blob = api_ask(live, force_zoom="true", box_mode="components")
    assert blob["steps"][0]["box"] != forced["steps"][0]["box"]  # on this map the two modes differ
    page.select_option("#force-zoom", "true")
    page.select_option("#box-mode", "components")
    submit_and_wait(page)
    assert rendered_box(page)[0] == blob["steps"][0]["box"]
    page.select_option("#box-mode", "")
    page.select_option("#force-zoom", "")
    submit_and_wait(page)
    box, on_screen, _ = rendered_box(page)
    assert box == gated["steps"][0]["box"]

    shot = tmp_path / "demo_page.png"
    page.screenshot(path=str(shot))  # the viewport: a full-page capture resizes it, and the image with it
    with Image.open(shot) as im:
        rgb = im.convert("RGB")
    assert rgb.size == (1400, 1000)
    assert len(rgb.getcolors(maxcolors=1 << 20) or []) > 500  # a rendered page, not a blank canvas
    # The box's stroke really is painted: the middle of its bottom edge has the stroke colour.
    x = round(on_screen["x"] + on_screen["w"] / 2)
    y = round(on_screen["y"] + on_screen["h"])
    near = [rgb.getpixel((x, y + dy)) for dy in (-2, -1, 0, 1, 2)]
    assert any(max(abs(a - b) for a, b in zip(px, BOX_STROKE, strict=True)) < 30 for px in near), near

    # 5. Several boxes answered one at a time: every box is drawn, and those the answer was not read beside are
    # marked. On this map the most confident of three boxes is the third.
    best = api_ask(live, force_zoom="true", box_mode="components", max_boxes="3", multi_box="best")
    (read,) = [step["box"] for step in best["steps"]]
    page.select_option("#force-zoom", "true")
    page.select_option("#box-mode", "components")
    page.fill("#max-boxes", "3")
    page.select_option("#multi-box", "best")
    submit_and_wait(page)
    drawn = page.eval_on_selector_all(
        "#boxes rect.zoom-box", "els => els.map(e => [e.dataset.box, e.classList.contains('unread')])"
    )
    assert len(drawn) == 3 and drawn[2][0] == ",".join(map(str, read))
    assert [unread for _, unread in drawn] == [True, True, False]
    assert page.inner_text("#answer") == (best["answer"] or "(empty answer)")

    assert js_errors == []
    assert foreign == []
    page.close()


def test_api_docs_render_with_the_network_blocked(live, browser):
    # /docs and /redoc are served from packaged assets: with every request to another origin aborted, Swagger UI
    # still renders the operations of the live OpenAPI schema.
    context = browser.new_context()
    foreign: list[str] = []

    def only_this_origin(route):
        if route.request.url.startswith(live.url):
            route.continue_()
        else:
            foreign.append(route.request.url)
            route.abort()

    context.route("**/*", only_this_origin)
    page = context.new_page()
    js_errors: list[str] = []
    page.on("pageerror", lambda err: js_errors.append(str(err)))
    page.goto(live.url + "/docs")
    page.wait_for_selector(".swagger-ui .opblock", timeout=30_000)
    paths = page.eval_on_selector_all(".opblock-summary-path", "els => els.map(e => e.dataset.path)")
    schema = httpx.get(live.url + "/openapi.json").json()
    assert "/ask" in paths and set(paths) <= set(schema["paths"])
    assert schema["info"]["title"] in page.inner_text(".swagger-ui .info .title")
    assert foreign == []
    page.goto(live.url + "/redoc")
    page.wait_for_selector("[role='navigation'], .menu-content", timeout=30_000)
    assert "/ask" in page.content()
    # ReDoc's own script is packaged too; only its "powered by" logo image points at its CDN (blocked, not needed).
    assert all(url.endswith("logo-mini.svg") for url in foreign), foreign
    assert js_errors == []
    context.close()
