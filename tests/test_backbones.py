"""Both backbones through one suite: Qwen2.5-VL and Qwen3-VL tiny models built in code (no hub, no network).

For each: the gate closed equals stock `generate`; plain positions equal stock `get_rope_index`; KV reuse (several
steps and boxes, a batch) equals a full recompute, DeepStack rows of every image included; a batch equals its
singles; the released and stock checkpoint layouts load; cache keys name the backbone. Then a Qwen3-VL checkpoint
in the released layout end to end: `qzoom ask`, `/ask`, the tool endpoints and the thinking loop's Qwen3-VL profile.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import scene
from qzoom import roi
from qzoom.agent import run
from qzoom.backbones import BACKBONE_NAMES, backbone_named
from qzoom.checkpoint import load_model, save_checkpoint
from qzoom.cli import app
from qzoom.engine import QZoomEngine, SequenceState
from qzoom.modeling import enable_qzoom
from qzoom.offline import build_tokenizer
from qzoom.schemas import AskOptions
from test_checkpoint import to_released_layout

IMAGES = [scene(320, 240, 1), scene(200, 330, 2), scene(400, 180, 3)]
QUESTIONS = ["What is written in the red box?", "hi", "How many boxes are there?"]


def budget(name: str) -> dict[str, int]:
    cell = backbone_named(name).cell
    return {"min_pixels": 16 * cell * cell, "max_pixels": 48 * cell * cell}


def make_model(name: str, *, seed: int = 0, reuse_src_pos: bool = True, twig_K: int = 2, **sizes: int):
    """A 4-layer model of the backbone with gate and SD-RPN; RPN logits sharpened so thresholds pick sub-regions."""
    bb = backbone_named(name)
    torch.manual_seed(seed)
    config = enable_qzoom(
        bb.tiny_config(build_tokenizer(), **sizes), twig_K=twig_K, twig_T=2, reuse_src_pos=reuse_src_pos
    )
    model = bb.model_class(config).eval()
    with torch.no_grad():
        last = model.model.language_model.twig_layers[-1].self_attn
        last.q_proj.weight.mul_(-40.0)
        last.k_proj.weight.mul_(40.0)
    return model


@pytest.fixture(scope="module", params=BACKBONE_NAMES)
def name(request) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def model(name):
    return make_model(name)


@pytest.fixture
def engine(name, model) -> QZoomEngine:
    return QZoomEngine(model, backbone_named(name).build_processor(build_tokenizer()), name="tiny")


def run_states(engine: QZoomEngine, images, queries, options: AskOptions) -> list[SequenceState]:
    states = [engine.new_state(i, q, options) for i, q in zip(images, queries, strict=True)]
    run(engine, states)
    return states


def full_recompute_logits(model, st: SequenceState) -> torch.Tensor:
    """The stock text model from scratch on the final sequence: all layers, no cache, the stock DeepStack adds."""
    lm = model.model.language_model
    extra = {}
    blocks = sorted(st.blocks, key=lambda b: b.start)
    if blocks[0].deepstack:
        mask = torch.zeros(st.input_ids.numel(), dtype=torch.bool)
        for b in blocks:
            mask[b.start : b.end] = True
        levels = len(blocks[0].deepstack)
        extra = {
            "visual_pos_masks": mask[None],
            "deepstack_visual_embeds": [torch.cat([b.deepstack[lv] for b in blocks]) for lv in range(levels)],
        }
    with torch.inference_mode():
        out = lm(inputs_embeds=st.embeds[None], position_ids=st.positions[:, None], **extra)
        return model.lm_head(out.last_hidden_state[0, -1]).float()


def stock_generate(model, engine: QZoomEngine, st: SequenceState, max_new_tokens: int) -> tuple[torch.Tensor, list]:
    """Stock forward + `generate` on the engine's prompt ids and pixels (the preprocessing is tested elsewhere)."""
    pixels, grid = engine._preprocess_global(st.image, st.min_pixels, st.max_pixels)
    prompt = st.input_ids[None]  # a state that did not zoom holds exactly the prompt
    inputs = {
        "input_ids": prompt,
        "attention_mask": torch.ones_like(prompt),
        "mm_token_type_ids": (prompt == engine.image_token_id).int(),
        "pixel_values": pixels,
        "image_grid_thw": grid[None],
    }
    with torch.inference_mode():
        logits = model(**inputs, logits_to_keep=1).logits[0, -1].float()
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return logits, [t for t in out[0, prompt.shape[1] :].tolist() if t not in engine.stop_ids]


# -- the engine against the stock model -----------------------------------------------------------------------------


def test_gate_closed_equals_stock_generate(name, model, engine):
    (st,) = run_states(engine, IMAGES[:1], QUESTIONS[:1], AskOptions(gate_thresh=1.0, max_new_tokens=4, **budget(name)))
    assert len(st.gate_scores) == 1 and len(st.blocks) == 1
    levels = len(getattr(model.config.vision_config, "deepstack_visual_indexes", []) or [])
    assert len(st.blocks[0].deepstack) == levels  # Qwen3-VL: one level per DeepStack merger; Qwen2.5-VL: none
    logits, tokens = stock_generate(model, engine, st, 4)
    assert torch.equal(st.next_logits, logits)
    assert st.answer_ids == tokens


def test_plain_positions_equal_get_rope_index(name):
    bb = backbone_named(name)
    engine = QZoomEngine(make_model(name, reuse_src_pos=False), bb.build_processor(build_tokenizer()))
    opts = AskOptions(force_zoom=True, roi_thresh=0.02, max_new_tokens=1, **budget(name))
    (st,) = run_states(engine, IMAGES[:1], QUESTIONS[:1], opts)
    assert len(st.blocks) == 2
    grids = torch.stack([st.grid_thw, engine._block_grid_thw(st.blocks[1])])
    ids = st.input_ids[None]
    expected, _ = engine.model.model.get_rope_index(ids, (ids == engine.image_token_id).int(), image_grid_thw=grids)
    assert torch.equal(st.positions, expected[:, 0].float())


def corner_boxes(grid_hw: tuple[int, int], n: int) -> list[roi.GridBox]:
    h, w = grid_hw
    return [roi.GridBox(0, 0, max(1, w // 2), max(1, h // 2)), roi.GridBox(w // 2, h // 2, w, h)][:n]


@pytest.mark.parametrize(("steps", "boxes", "deepstack", "twig_k"), [(2, 1, 1, 2), (1, 2, 2, 1)])
def test_kv_reuse_equals_full_recompute(name, steps, boxes, deepstack, twig_k):
    # (1, 2, 2, 1): two DeepStack levels (Qwen3-VL) with K = 1, so the level-1 add runs above the reuse split.
    sizes = {"deepstack_levels": deepstack} if name == "qwen3-vl" else {}
    model = make_model(name, twig_K=twig_k, **sizes)
    engine = QZoomEngine(model, backbone_named(name).build_processor(build_tokenizer()))
    states = [
        engine.new_state(i, q, AskOptions(**budget(name))) for i, q in zip(IMAGES[:2], QUESTIONS[:2], strict=True)
    ]
    engine.prepare(states)
    engine.encode(states)
    engine.prefill(states)
    for _ in range(steps):  # boxes given on the newest image's grid: several steps and boxes, whatever the RPN says
        engine.zoom(states, [engine.proposal_from_grid_boxes(st, corner_boxes(st.newest_blocks[0].grid_hw, boxes))
                             for st in states])  # fmt: skip
    engine.finish(states)
    for st in states:
        assert st.zoom_steps == steps and len(st.blocks) == 1 + steps * boxes
        torch.testing.assert_close(st.next_logits, full_recompute_logits(model, st), rtol=1e-5, atol=1e-5)


def test_roi_deepstack_rows_are_injected(name, model, engine):
    opts = AskOptions(force_zoom=True, roi_thresh=0.02, max_new_tokens=1, **budget(name))
    (st,) = run_states(engine, IMAGES[:1], QUESTIONS[:1], opts)
    roi_block = st.blocks[1]
    if not roi_block.deepstack:
        pytest.skip(f"{name} has no DeepStack")
    # The RoI's own features at every level: dropping them changes the answer logits, so they were added.
    ref = full_recompute_logits(model, st)
    roi_block.deepstack = [torch.zeros_like(d) for d in roi_block.deepstack]
    assert not torch.allclose(full_recompute_logits(model, st), ref, atol=1e-4)


def test_batch_equals_singles(name, engine):
    opts = AskOptions(force_zoom=True, roi_thresh=0.02, max_new_tokens=2, **budget(name))
    batch = run_states(engine, IMAGES, QUESTIONS, opts)
    assert any(st.zoom_steps == 1 for st in batch)
    for image, query, together in zip(IMAGES, QUESTIONS, batch, strict=True):
        (alone,) = run_states(engine, [image], [query], opts)
        assert [b.box for b in alone.blocks] == [b.box for b in together.blocks]
        assert alone.answer_ids == together.answer_ids
        torch.testing.assert_close(alone.next_logits, together.next_logits, rtol=1e-4, atol=1e-4)


def test_cache_keys_name_the_backbone(engine):
    st = engine.new_state(IMAGES[0], "q")
    st.digest = "00" * 16
    other = QZoomEngine(engine.model, engine.processor, name=engine.name)
    other.backbone = backbone_named(next(n for n in BACKBONE_NAMES if n != engine.backbone.name))
    assert engine._key("vision", st) != other._key("vision", st)


# -- checkpoints ----------------------------------------------------------------------------------------------------


def to_released_qwen3_layout(directory: Path) -> None:
    """The official Qwen3-VL classes' save: weights already under model.language_model / model.visual; the Q-Zoom
    flags at the top level and copied into text_config, which also carries a nested vision config."""
    config = json.loads((directory / "config.json").read_text())
    flags = ("enable_twig", "twig_K", "twig_T", "roi_source", "roi_loss", "enable_high_res", "high_res_K",
             "high_res_T", "high_res_thresh", "reuse_src_pos")  # fmt: skip
    config["text_config"].update({k: config[k] for k in flags})
    config["text_config"]["vision_config"] = dict(config["vision_config"])
    config["text_config"]["image_token_id"] = config["image_token_id"]
    config.pop("roi_thresh", None)  # not an official key
    (directory / "config.json").write_text(json.dumps(config))


RELEASED = {"qwen2.5-vl": to_released_layout, "qwen3-vl": to_released_qwen3_layout}


def test_released_layout_loads_to_the_same_weights_and_answers(name, model, engine, tmp_path):
    opts = AskOptions(force_zoom=True, roi_thresh=0.02, max_new_tokens=2, **budget(name))
    directory = save_checkpoint(model, engine.processor, tmp_path / "ckpt")
    RELEASED[name](directory)
    released = QZoomEngine.from_pretrained(directory)
    assert released.backbone.name == name and released.has_gate and released.has_rpn
    reference = model.state_dict()
    for key, tensor in released.model.state_dict().items():
        assert torch.equal(tensor, reference[key]), key
    (a,) = run_states(engine, IMAGES[:1], QUESTIONS[:1], opts)
    (b,) = run_states(released, IMAGES[:1], QUESTIONS[:1], opts)
    assert [x.box for x in a.blocks] == [x.box for x in b.blocks] and a.answer_ids == b.answer_ids


def test_stock_directory_without_qzoom_heads_answers_like_stock_generate(name, tmp_path):
    bb = backbone_named(name)
    tok = build_tokenizer()
    torch.manual_seed(1)
    stock = bb.model_class(bb.tiny_config(tok)).eval()  # no Q-Zoom fields: the stock architecture
    directory = save_checkpoint(stock, bb.build_processor(tok), tmp_path / "stock")
    assert not any("twig" in k or "high_res" in k for k in json.loads((directory / "config.json").read_text()))
    engine = QZoomEngine(load_model(directory), bb.load_processor(directory))
    assert not engine.has_gate and not engine.has_rpn and engine.split == 0
    (st,) = run_states(engine, IMAGES[1:2], QUESTIONS[1:2], AskOptions(max_new_tokens=3, **budget(name)))
    logits, tokens = stock_generate(engine.model, engine, st, 3)
    assert torch.equal(st.next_logits, logits) and st.answer_ids == tokens


# -- a Qwen3-VL checkpoint in the released layout, end to end --------------------------------------------------------


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("qwen3") / "tiny"
    result = CliRunner().invoke(app, ["init-tiny", str(out), "--backbone", "qwen3-vl"])
    assert result.exit_code == 0, result.output
    to_released_qwen3_layout(out)
    return out


def test_init_tiny_refuses_an_unknown_backbone(tmp_path):
    result = CliRunner().invoke(app, ["init-tiny", str(tmp_path / "x"), "--backbone", "llava"])
    assert result.exit_code == 2 and "qwen3-vl" in result.output


def test_cli_ask_on_a_released_qwen3_checkpoint(qwen3_dir, tmp_path):
    picture = tmp_path / "pic.png"
    IMAGES[0].save(picture)
    args = ["ask", str(picture), "What is written?", "--model", str(qwen3_dir), "--json", "--zoom",
            "--roi-thresh", "0.02", "--max-new-tokens", "2"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["zoomed"] is True and data["model"] == qwen3_dir.name
    x0, y0, x1, y1 = data["steps"][0]["box"]
    assert 0 <= x0 < x1 <= 320 and 0 <= y0 < y1 <= 240 and min(x1 - x0, y1 - y0) >= 32  # 32-px minimum side


def test_service_tools_and_thinking_loop_accept_a_qwen3_engine(qwen3_dir):
    from fastapi.testclient import TestClient

    from qzoom.service.app import create_app
    from test_service import settings, wait_ready

    engine = QZoomEngine.from_pretrained(qwen3_dir)
    image = io.BytesIO()
    IMAGES[0].save(image, format="PNG")
    data = base64.b64encode(image.getvalue()).decode()
    with TestClient(create_app(lambda s, cache: engine, settings())) as client:
        wait_ready(client)
        r = client.post(
            "/ask",
            json={
                "image": data,
                "query": "What is written?",
                "force_zoom": True,
                "roi_thresh": 0.02,
                "max_new_tokens": 2,
            },
        )
        assert r.status_code == 200, r.text
        assert r.json()["zoomed"] is True
        r = client.post("/v1/tools/zoom", json={"image_data": data, "query": "What is written?"})
        assert r.status_code == 200, r.text
        x0, y0, x1, y1 = r.json()["box"]
        assert min(x1 - x0, y1 - y0) >= 32
        turns = [
            '<tool_call>\n{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [0, 0, 500, 500], "img_idx": 0}}'
            "\n</tool_call>",
            "<answer>K7X</answer>",
        ]
        client.app.state.qzoom.think_policy = lambda turn, conversation: turns[min(turn, 2) - 1]
        body = {"image": data, "query": "What is written?", "profile": "qwen3-vl", "force_zoom": True}
        r = client.post("/v1/think", json=body)
        assert r.status_code == 200, r.text
        res = r.json()
        assert res["answer"] == "K7X" and res["zooms"] == [[0, 0, 160, 120]]


def test_thinking_loop_keeps_deepstack_rows_of_appended_crops(qwen3_dir):
    import asyncio

    from qzoom.agent.thinking import think_with_images
    from qzoom.worker import Worker

    engine = QZoomEngine.from_pretrained(qwen3_dir)
    call = '{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [500, 500, 1000, 1000], "img_idx": 0}}'
    turns = [f"<tool_call>\n{call}\n</tool_call>", "<answer>K7X</answer>"]

    async def go():
        async with Worker(engine) as worker:
            return await think_with_images(
                worker, IMAGES[0], "What is written?", "qwen3-vl", policy=lambda t, c: turns[t - 1],
                options=AskOptions(force_zoom=True, **budget("qwen3-vl")),
            )  # fmt: skip

    res = asyncio.run(go())
    st = res.state
    assert res.zooms == [[160, 120, 320, 240]] and all(b.deepstack for b in st.blocks)
    torch.testing.assert_close(st.next_logits, full_recompute_logits(engine.model, st), rtol=1e-4, atol=1e-4)


def test_released_qwen3_config_reads_its_flags(qwen3_dir):
    model = load_model(qwen3_dir)
    assert model.qzoom.enable_twig and model.qzoom.twig_K == 2 and model.qzoom.enable_high_res
    engine = QZoomEngine(model, backbone_named("qwen3-vl").load_processor(qwen3_dir))
    # roi_thresh is not an official key: the Qwen3-VL default (the Doc/OCR evaluation setting) applies.
    assert engine.settings.roi_thresh == 0.15 and engine.backbone.min_box_side == 32
