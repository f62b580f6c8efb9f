"""The OpenAI-compatible endpoints driven by the real `openai` client against a real uvicorn server on loopback,
serving the shipped demo model qzoom-tiny: plain, streamed, multi-turn, sampling, data-URL and refused URL images,
think models, the client-tool round trip with an image in the tool result, an lmms-eval-style request, and the
4xx of bad inputs. Scripted assistant turns (the service's `think_policy` seam) stand in for a model that calls
tools, which the demo model was never trained to do; the tools are executed for real."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from PIL import Image

from qzoom.cache import FeatureCache
from qzoom.engine import QZoomEngine
from qzoom.evals.synthetic import generate_item
from qzoom.service.app import create_app, default_engine_factory
from qzoom.settings import Settings

pytestmark = pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")

KEY = "sk-test-key"


def data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)  # a few hundred kB where a PNG of the noisy canvas is megabytes
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


# The demo model at a smaller pixel budget than its own (64 tokens a view instead of 256): the same graph, a
# quarter of the vision and prefill work per request on CI's two cores.
TEST_MAX_PIXELS = 64 * 28 * 28


def demo_engine(settings: Settings, cache: FeatureCache) -> QZoomEngine:
    engine = default_engine_factory(settings, cache)
    engine.settings = dataclasses.replace(engine.settings, max_pixels=TEST_MAX_PIXELS)
    return engine


class LiveServer:
    """`create_app()` on the shipped demo model under uvicorn, on a free loopback port."""

    def __init__(self) -> None:
        settings = Settings(api_keys=[KEY], redis_url=None, max_pending=16)
        self.app = create_app(demo_engine, settings=settings)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 120
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        while httpx.get(self.url + "/readyz").status_code != 200:
            assert time.monotonic() < deadline, httpx.get(self.url + "/readyz").text
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def set_policy(self, turns: list[str] | None, seen: list[str] | None = None) -> None:
        """Scripted assistant turns in place of the model's (None: the model writes them again)."""
        if turns is None:
            self.app.state.qzoom.think_policy = None
            return

        def policy(turn: int, conversation: str) -> str:
            if seen is not None:
                seen.append(conversation)
            return turns[min(turn, len(turns)) - 1]

        self.app.state.qzoom.think_policy = policy


@pytest.fixture(scope="module")
def live() -> Iterator[LiveServer]:
    with LiveServer() as server:
        yield server


@pytest.fixture(scope="module")
def client(live: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.url + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def item() -> Any:
    # A detail question of the synthetic benchmark: the demo model zooms on it.
    items = (generate_item("val", i, min_side=896, max_side=1024) for i in range(40))
    return next(it for it in items if it.needs_detail)


def question(item: Any, text: str | None = None) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(item.image)}},
        {"type": "text", "text": text or item.question},
    ]}]  # fmt: skip


def ask(live: LiveServer, item: Any, **options: Any) -> dict[str, Any]:
    body = {"image": data_url(item.image), "query": item.question, **options}
    response = httpx.post(live.url + "/ask", json=body, headers={"X-API-Key": KEY}, timeout=120)
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_models_lists_the_checkpoint_and_one_think_model_per_profile(client, model):
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == model == "qzoom-tiny"
    assert {f"{model}:think-{p}" for p in ("deepeyes", "mini-o3", "qwen3-vl")} <= set(ids)
    assert client.models.retrieve(f"{model}:think-deepeyes").id == f"{model}:think-deepeyes"
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("gpt-4o")
    assert err.value.code == "model_not_found"


def test_lmms_eval_style_request_gets_the_ask_answer_and_its_zoom_steps(live, client, model, item):
    """lmms-eval's openai_compatible pattern: one user message, an image and a question; greedy by default."""
    reply = client.chat.completions.create(model=model, messages=question(item), max_tokens=16)
    ChatCompletion.model_validate(reply.model_dump())
    reference = ask(live, item, max_new_tokens=16)
    assert reply.choices[0].message.content == reference["answer"]
    assert reply.choices[0].finish_reason in ("stop", "length")
    extension = reply.model_extra["qzoom"]
    assert extension["path"] == "qzoom"
    assert extension["zoomed"] == reference["zoomed"] and extension["gate_score"] == pytest.approx(
        reference["gate_score"]
    )
    assert [s["box"] for s in extension["steps"]] == [s["box"] for s in reference["steps"]]
    usage = reply.usage
    assert usage.model_extra["visual_tokens"] == reference["visual_tokens"]
    assert usage.prompt_tokens > usage.model_extra["visual_tokens"] and 1 <= usage.completion_tokens <= 16
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_stream_sends_zoom_steps_then_the_same_answer_then_done(live, client, model, item):
    options = {"force_zoom": True, "crops": True}
    plain = client.chat.completions.create(
        model=model, messages=question(item), max_tokens=8, extra_body={"qzoom": options}
    )
    chunks = list(client.chat.completions.create(
        model=model, messages=question(item), max_tokens=8, stream=True, stream_options={"include_usage": True},
        extra_body={"qzoom": options},
    ))  # fmt: skip
    for c in chunks:
        ChatCompletionChunk.model_validate(c.model_dump())
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == plain.choices[0].message.content
    zooms = [c.model_extra["qzoom"] for c in chunks if (c.model_extra or {}).get("qzoom", {}).get("step") == "zoom"]
    # Each step's every box streams (with multi_box "best", also those answered beside); the report keeps the one read.
    streamed = [b for z in zooms for b in z["boxes"]]
    steps = plain.model_extra["qzoom"]["steps"]
    assert steps and all(s["box"] in streamed for s in steps)
    crop = Image.open(io.BytesIO(base64.b64decode(zooms[0]["crops"][0].split(",", 1)[1])))
    x0, y0, x1, y1 = zooms[0]["boxes"][0]
    assert crop.size == (x1 - x0, y1 - y0)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    raw = httpx.post(live.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=120,
                     json={"model": model, "messages": question(item), "max_tokens": 2, "stream": True})  # fmt: skip
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.text.rstrip().endswith("data: [DONE]")


def test_multi_turn_keeps_history_as_text_and_the_image_once(client, model, item):
    first = question(item)
    one = client.chat.completions.create(model=model, messages=first, max_tokens=4)
    follow = [*first, {"role": "assistant", "content": one.choices[0].message.content or "x"},
              {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(item.image)}},
                                           {"type": "text", "text": "And the colour?"}]}]  # fmt: skip
    two = client.chat.completions.create(model=model, messages=follow, max_tokens=4)
    assert two.model_extra["qzoom"]["path"] == "qzoom"  # the same image twice is one image
    assert two.usage.prompt_tokens > one.usage.prompt_tokens


def test_sampling_is_reproducible_per_seed_and_greedy_at_temperature_zero(client, model, item):
    def answer(**kw: Any) -> str:
        reply = client.chat.completions.create(model=model, messages=question(item), max_tokens=6, **kw)
        return reply.choices[0].message.content or ""

    greedy = answer()
    assert answer(temperature=0) == greedy
    assert answer(temperature=1.5, seed=3) == answer(temperature=1.5, seed=3)
    draws = {answer(temperature=1.5, top_p=0.95, seed=s) for s in range(4)}
    assert len(draws) > 1  # different seeds, different draws


def test_stop_cuts_the_answer_before_the_stop_string(client, model, item):
    full = client.chat.completions.create(model=model, messages=question(item), max_tokens=8).choices[0].message
    assert full.content and len(full.content) > 1
    stop = full.content[1:3]
    cut = client.chat.completions.create(model=model, messages=question(item), max_tokens=8, stop=[stop])
    assert cut.choices[0].message.content == full.content[: full.content.find(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_think_model_runs_its_zoom_calls_server_side(live, client, model, item):
    turns = ['<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [10, 20, 200, 180]}}</tool_call>',
             "<answer>blue</answer>"]  # fmt: skip
    live.set_policy(turns)
    try:
        reply = client.chat.completions.create(
            model=f"{model}:think-deepeyes", messages=question(item), extra_body={"qzoom": {"force_zoom": True}}
        )
        chunks = list(client.chat.completions.create(
            model=f"{model}:think-deepeyes", messages=question(item), stream=True,
            extra_body={"qzoom": {"force_zoom": True}},
        ))  # fmt: skip
    finally:
        live.set_policy(None)
    assert reply.choices[0].message.content == "blue"
    report = reply.model_extra["qzoom"]
    assert report["path"] == "think" and report["finished_by"] == "answer"
    assert [s["box"] for s in report["steps"]] == [[10, 20, 200, 180]]
    assert report["turns"][0]["calls"] == [turns[0]]
    acts = [c.model_extra["qzoom"] for c in chunks if (c.model_extra or {}).get("qzoom", {}).get("step") == "act"]
    assert acts == [{"step": "act", "turn": 1, "boxes": [[10, 20, 200, 180]]}]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "blue"


def test_client_tools_round_trip_with_an_image_in_the_tool_result(live, client, model, item):
    """The model asks for the client's zoom tool; the client runs it (POST /v1/tools/zoom, for real) and sends the
    crop back as an image in a tool message; the next request answers from the conversation holding the crop."""
    from qzoom.tools.schema import openai_tool  # the zoom tool's OpenAI function schema

    tool = openai_tool()
    name = tool["function"]["name"]
    call = {"name": name, "arguments": {"box": {"coords": [0.1, 0.1, 0.6, 0.5], "frame": "unit"}}}
    seen: list[str] = []
    live.set_policy([f"Let me look closer.\n<tool_call>\n{json.dumps(call)}\n</tool_call>"], seen)
    try:
        first = client.chat.completions.create(model=model, messages=question(item), tools=[tool])
        message = first.choices[0].message
        assert first.choices[0].finish_reason == "tool_calls" and message.content == "Let me look closer."
        (tc,) = message.tool_calls
        assert tc.function.name == name and json.loads(tc.function.arguments) == call["arguments"]
        assert "<tools>" in seen[0] and name in seen[0]
        # The client executes the tool.
        zoom = httpx.post(live.url + "/v1/tools/zoom", headers={"X-API-Key": KEY}, timeout=60,
                          json={"image_data": data_url(item.image), **call["arguments"]})  # fmt: skip
        assert zoom.status_code == 200, zoom.text
        zoom = zoom.json()
        crop_url = "data:image/png;base64," + zoom["crop_png_b64"]
        history = [*question(item), message.model_dump(exclude_none=True),
                   {"role": "tool", "tool_call_id": tc.id, "content": [
                       {"type": "text", "text": json.dumps({"box": zoom["box"]})},
                       {"type": "image_url", "image_url": {"url": crop_url}}]}]  # fmt: skip
        live.set_policy(["It is blue."], seen)
        second = client.chat.completions.create(model=model, messages=history, tools=[tool])
    finally:
        live.set_policy(None)
    assert second.choices[0].message.content == "It is blue." and second.choices[0].finish_reason == "stop"
    assert second.model_extra["qzoom"]["path"] == "conversation"
    conversation = seen[-1]
    assert conversation.count("<|vision_start|>") == 2  # the picture and the crop from the tool result
    assert "<tool_response>" in conversation and conversation.index("<tool_call>") < conversation.index(
        "<tool_response>"
    )
    assert second.usage.model_extra["visual_tokens"] > first.usage.model_extra["visual_tokens"]
    # The model itself (no script) answers the same conversation through the engine.
    real = client.chat.completions.create(model=model, messages=history, tools=[tool], max_tokens=4)
    assert real.usage.completion_tokens >= 1


def test_refused_image_url_is_an_openai_error_with_the_service_code(client, model):
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/a.png"}},
                                             {"type": "text", "text": "what?"}]}]  # fmt: skip
    with pytest.raises(openai.PermissionDeniedError) as err:
        client.chat.completions.create(model=model, messages=messages)
    assert err.value.code == "image_urls_disabled" and "QZOOM_IMAGE_URLS" in err.value.message


TINY = data_url(Image.new("RGB", (8, 8), (200, 10, 10)))


@pytest.mark.parametrize(
    ("change", "error", "code", "param"),
    [
        ({"messages": [{"role": "user", "content": "no image"}]}, openai.BadRequestError, "no_image", "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": TINY}}] * 200
                        + [{"type": "text", "text": "?"}]}]}, openai.BadRequestError, "too_many_images", "messages"),
        ({"max_tokens": 100000}, openai.BadRequestError, "invalid_request", "max_tokens"),
        ({"n": 2}, openai.BadRequestError, "invalid_request", "n"),
        ({"logprobs": True}, openai.BadRequestError, "unsupported_field", "logprobs"),
        ({"model": "gpt-4o"}, openai.NotFoundError, "model_not_found", "model"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                        + base64.b64encode(b"not a png").decode()}}, {"type": "text", "text": "?"}]}]},
         openai.APIStatusError, "unsupported_image", None),
    ],
)  # fmt: skip
def test_bad_requests_are_clear_4xx_naming_the_field(client, model, item, change, error, code, param):
    body: dict[str, Any] = {"model": model, "messages": question(item), **change}
    extra = {k: body.pop(k) for k in ("logprobs",) if k in body}
    with pytest.raises(error) as err:
        client.chat.completions.create(**body, extra_body=extra or None)
    assert err.value.code == code and err.value.param == param
    assert err.value.body["type"] and err.value.message
    if param:
        assert param.split(".")[0] in err.value.message


def test_wrong_content_type_and_bad_key(live, model):
    form = httpx.post(
        live.url + "/v1/chat/completions", data={"model": model}, headers={"Authorization": f"Bearer {KEY}"}
    )
    assert form.status_code == 415 and form.json()["error"]["code"] == "unsupported_media_type"
    assert form.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=live.url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_openapi_documents_the_chat_endpoints(live):
    spec = httpx.get(live.url + "/openapi.json").json()
    post = spec["paths"]["/v1/chat/completions"]["post"]
    body = post["requestBody"]["content"]["application/json"]["schema"]
    assert {"model", "messages", "max_tokens", "temperature", "seed", "stream", "stop", "tools", "qzoom"} <= set(
        body["properties"]
    )
    assert "text/event-stream" in post["responses"]["200"]["content"]
    assert "/v1/models" in spec["paths"]


def test_docs_examples_run(live, model):
    """The openai and curl examples of docs/openai.md, run against the live server."""
    from pathlib import Path

    doc = (Path(__file__).parents[1] / "docs" / "openai.md").read_text()
    python = doc.split("```python\n", 1)[1].split("```", 1)[0]
    python = python.replace("http://localhost:8000", live.url).replace('"picture.png"', repr(str(_picture_file())))
    scope: dict[str, Any] = {"QZOOM_API_KEY": KEY}
    exec(compile(python, "docs/openai.md", "exec"), scope)  # the example prints; it must not raise
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    shell = doc.split("```bash\n", 1)[1].split("```", 1)[0].replace("http://localhost:8000", live.url)
    out = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, timeout=120,
                         cwd=_picture_file().parent, env={"QZOOM_API_KEY": KEY, "PATH": "/usr/bin:/bin"})  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["choices"][0]["message"]["content"] is not None


_PICTURE: list[Any] = []


def _picture_file() -> Any:
    import tempfile
    from pathlib import Path

    if not _PICTURE:
        folder = Path(tempfile.mkdtemp(prefix="qzoom-openai-doc-"))
        generate_item("val", 0, min_side=896, max_side=1024).image.save(folder / "picture.png")
        _PICTURE.append(folder / "picture.png")
    return _PICTURE[0]
