"""The inference pipeline against the stock model: gate-closed parity, KV reuse, positions, batching, options."""

from __future__ import annotations

import asyncio
import copy
from typing import get_args

import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from conftest import MAX_PIXELS, MIN_PIXELS, make_tiny_model, scene
from qzoom import roi
from qzoom.agent import ask, run
from qzoom.agent.graph import stream_events
from qzoom.engine import Proposal, QZoomEngine, SequenceState
from qzoom.images import padded_to_aspect
from qzoom.modeling import QZoomQwen2_5_VLForConditionalGeneration, QZoomSettings
from qzoom.schemas import AskOptions
from qzoom.worker import Worker

BUDGET = {"min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS}
QUESTIONS = ["What is written in the red box?", "hi", "What colour is the sky?", "How many boxes are there?"]


def run_states(engine: QZoomEngine, images, queries, options) -> list[SequenceState]:
    opts = options if isinstance(options, list) else [options] * len(images)
    states = [engine.new_state(i, q, o) for i, q, o in zip(images, queries, opts, strict=True)]
    run(engine, states)
    return states


def stock_inputs(engine: QZoomEngine, image: Image.Image, query: str) -> dict:
    """The stock processor's inputs, with the pixel values of the official fast processor (qzoom's preprocessing):
    the processor here is the PIL backend, whose Pillow resize the official code does not use."""
    text = engine.prompt_text(query)
    inputs = engine.processor(text=[text], images=[padded_to_aspect(image)], return_tensors="pt")
    size = engine.processor.image_processor.size
    pixels, grid = engine._preprocess(image, size["shortest_edge"], size["longest_edge"])
    assert torch.equal(grid, inputs["image_grid_thw"][0])
    inputs["pixel_values"] = pixels
    return inputs


def full_recompute_logits(model, st: SequenceState) -> torch.Tensor:
    """The stock model run from scratch on the final (spliced) embeddings and positions: no cache, all layers."""
    out = model(inputs_embeds=st.embeds[None], position_ids=st.positions[:, None])
    return out.logits[0, -1].float()


# -- gate closed == stock -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("index", [0, 1])
def test_gate_closed_equals_stock_generate(engine, tiny_model, images, index):
    image, query = images[index], QUESTIONS[index]
    # τ_gate = 1 can never be reached: the gate runs and stays closed.
    (st,) = run_states(engine, [image], [query], AskOptions(gate_thresh=1.0, max_new_tokens=8, **BUDGET))
    assert len(st.gate_scores) == 1 and len(st.blocks) == 1
    inputs = stock_inputs(engine, image, query)
    assert torch.equal(st.input_ids, inputs["input_ids"][0])
    with torch.inference_mode():
        stock_logits = tiny_model(**inputs, logits_to_keep=1).logits[0, -1].float()  # as generate computes it
        generated = tiny_model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert torch.equal(st.next_logits, stock_logits)
    stock_tokens = [t for t in generated[0, inputs["input_ids"].shape[1] :].tolist() if t not in engine.stop_ids]
    assert st.answer_ids == stock_tokens


def test_no_cell_above_threshold_falls_back_to_direct_answer(engine, images):
    # τ_roi = 1 cannot be passed by a sigmoid: the RPN runs, proposes nothing, and the coarse answer is given.
    (forced,) = run_states(engine, [images[0]], [QUESTIONS[0]], AskOptions(force_zoom=True, roi_thresh=1.0, **BUDGET))
    (closed,) = run_states(engine, [images[0]], [QUESTIONS[0]], AskOptions(force_zoom=False, **BUDGET))
    assert len(forced.blocks) == 1 and "propose" in forced.timings_ms
    assert torch.equal(forced.next_logits, closed.next_logits)
    assert forced.answer_ids == closed.answer_ids


# -- KV reuse == full recompute -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("max_steps", "roi_thresh", "which"), [(1, 0.1, [0, 1, 2]), (2, 0.02, [0, 3])])
def test_kv_reuse_equals_full_recompute(engine, tiny_model, images, max_steps, roi_thresh, which):
    opts = AskOptions(force_zoom=True, roi_thresh=roi_thresh, max_steps=max_steps, **BUDGET)
    states = run_states(engine, [images[i] for i in which], [QUESTIONS[i] for i in which], opts)
    for st in states:
        assert st.zoom_steps == max_steps  # every sample really zoomed, max_steps times
        with torch.inference_mode():
            reference = full_recompute_logits(tiny_model, st)
        torch.testing.assert_close(st.next_logits, reference, rtol=1e-5, atol=1e-5)


def test_kv_reuse_keeps_prefix_cache_untouched(engine, images):
    st = engine.new_state(images[0], QUESTIONS[0], AskOptions(force_zoom=True, roi_thresh=0.1, **BUDGET))
    engine.prepare([st])
    engine.encode([st])
    engine.prefill([st])
    before = [(k.clone(), v.clone()) for k, v in st.kv_below_k]
    hidden_before = st.hidden_k.clone()
    prefix = st.blocks[0].end
    engine.zoom([st], engine.propose([st]))
    assert len(st.blocks) == 2
    for (k0, v0), (k1, v1) in zip(before, st.kv_below_k, strict=True):
        assert torch.equal(k0[:, :prefix], k1[:, :prefix]) and torch.equal(v0[:, :prefix], v1[:, :prefix])
        assert k1.shape[1] == st.input_ids.numel()
    assert torch.equal(hidden_before[:prefix], st.hidden_k[:prefix])


# -- positions ------------------------------------------------------------------------------------------------------


def test_plain_positions_equal_get_rope_index_on_two_image_prompt(processor, images):
    engine = QZoomEngine(make_tiny_model(reuse_src_pos=False), processor)
    (st,) = run_states(engine, [images[0]], [QUESTIONS[0]], AskOptions(force_zoom=True, roi_thresh=0.1, **BUDGET))
    assert len(st.blocks) == 2
    box = st.blocks[1].box
    crop = images[0].crop((box.x0, box.y0, box.x1, box.y1))
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": QUESTIONS[0]}]}
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[images[0], crop], return_tensors="pt")
    assert torch.equal(st.input_ids, inputs["input_ids"][0])
    expected, _ = engine.model.model.get_rope_index(
        inputs["input_ids"], inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"]
    )
    assert torch.equal(st.positions, expected[:, 0].float())


def test_aligned_positions_follow_the_spec_table(engine):
    """spec §11.3: grid 20x27, s = 45, grid box x 16..22, y 3..7, RoI grid 14x20."""
    image = scene(756, 560, 7)
    st = engine.new_state(image, "q", AskOptions(min_pixels=16 * 784, max_pixels=540 * 784))
    engine.prepare([st])
    engine.encode([st])
    engine.prefill([st])
    glob = st.blocks[0]
    assert glob.grid_hw == (20, 27) and glob.start == 45
    old_positions = st.positions.clone()
    n_old = st.input_ids.numel()
    grid_box = roi.GridBox(16, 3, 22, 7)
    pixel_box = roi.grid_box_to_pixels(grid_box, glob.grid_hw, image.size)
    proposal = Proposal(glob, torch.zeros(20, 27), torch.zeros(20, 27), [grid_box], [pixel_box])
    features = torch.randn(14 * 20, engine.model.config.text_config.hidden_size)
    prefix = engine.splice(st, proposal, [(features, torch.tensor([1, 28, 40]))])

    assert prefix == 45 + 540  # the kept prefix ends with the last global image token
    pos = st.positions
    ve = 45 + 540  # the global <|vision_end|>
    assert pos[:, ve].tolist() == [72.0, 72.0, 72.0]
    assert pos[:, ve + 1].tolist() == [73.0, 73.0, 73.0]  # RoI <|vision_start|>
    roi_pos = pos[:, ve + 2 : ve + 2 + 280].view(3, 14, 20)
    assert torch.all(roi_pos[0] == 74.0)
    torch.testing.assert_close(roi_pos[1][:, 0], torch.linspace(48, 51, 14))
    torch.testing.assert_close(roi_pos[2][0], torch.linspace(61, 66, 20))
    assert pos[:, ve + 2 + 280].tolist() == [94.0, 94.0, 94.0]  # RoI <|vision_end|>
    # Every later text token is shifted by max(14, 20) + 2 = 22; ids are the old ones with the block inserted.
    assert torch.equal(pos[:, ve + 2 + 281 :], old_positions[:, ve + 1 :] + 22)
    assert st.input_ids.numel() == n_old + 282
    assert st.input_ids[ve + 1] == engine.vision_start_id and st.input_ids[ve + 282] == engine.vision_end_id


def test_decode_positions_continue_from_last(engine, images):
    (st,) = run_states(engine, [images[0]], [QUESTIONS[0]], AskOptions(force_zoom=True, roi_thresh=0.1, **BUDGET))
    # The aligned RoI leaves fractional positions in the sequence, but text positions stay integral and increasing.
    text_mask = st.input_ids != engine.image_token_id
    tail = st.positions[:, text_mask][:, -5:]
    assert torch.all(tail[:, 1:] - tail[:, :-1] == 1)


# -- batches --------------------------------------------------------------------------------------------------------


def test_batch_equals_singles(engine, images):
    options = [
        AskOptions(force_zoom=True, roi_thresh=0.1, max_new_tokens=6, **BUDGET),
        AskOptions(force_zoom=False, max_new_tokens=4, **BUDGET),
        # RPN runs but no cell can pass τ_roi = 1: falls back to the direct answer, with its own budget.
        AskOptions(force_zoom=True, roi_thresh=1.0, max_new_tokens=5, min_pixels=8 * 784, max_pixels=40 * 784),
        AskOptions(gate_thresh=0.0, roi_thresh=0.2, max_steps=2, max_new_tokens=6, **BUDGET),
    ]
    batched = run_states(engine, images, QUESTIONS, options)
    singles = [run_states(engine, [i], [q], o)[0] for i, q, o in zip(images, QUESTIONS, options, strict=True)]
    zoomed = [len(st.blocks) > 1 for st in batched]
    assert zoomed == [True, False, False, True]  # the batch really mixes zooming and non-zooming requests
    for b, s in zip(batched, singles, strict=True):
        assert [blk.box for blk in b.blocks] == [blk.box for blk in s.blocks]
        assert torch.equal(b.input_ids, s.input_ids)
        torch.testing.assert_close(b.next_logits, s.next_logits, rtol=1e-4, atol=1e-4)
        assert b.answer_ids == s.answer_ids
        assert b.gate_scores == pytest.approx(s.gate_scores, abs=1e-5)


def test_eager_attention_matches_sdpa(processor, images):
    sdpa = QZoomEngine(make_tiny_model(attn="sdpa"), processor)
    eager = QZoomEngine(make_tiny_model(attn="eager"), processor)
    opts = AskOptions(force_zoom=True, roi_thresh=0.1, **BUDGET)
    a = run_states(sdpa, images[:2], QUESTIONS[:2], opts)
    b = run_states(eager, images[:2], QUESTIONS[:2], opts)
    for x, y in zip(a, b, strict=True):
        assert [blk.box for blk in x.blocks] == [blk.box for blk in y.blocks]
        torch.testing.assert_close(x.next_logits, y.next_logits, rtol=1e-4, atol=1e-4)


# -- options beyond the paper ---------------------------------------------------------------------------------------


def test_max_steps_bounds_the_loop_and_each_step_takes_the_next_temporal_slot(engine, images):
    (st,) = run_states(
        engine, [images[3]], [QUESTIONS[3]], AskOptions(gate_thresh=0.0, roi_thresh=0.2, max_steps=3, **BUDGET)
    )
    assert st.zoom_steps == 3 and len(st.gate_scores) == 3
    t_slots = [float(st.positions[0, b.start]) for b in st.blocks]
    assert t_slots == sorted(t_slots) and len(set(t_slots)) == 4
    for parent, child in zip(st.blocks[1:], st.blocks[2:], strict=False):
        # A later step's positions lie inside its parent region's frame.
        assert parent.row_pos.min() - 1e-4 <= child.row_pos.min() and child.row_pos.max() <= parent.row_pos.max() + 1e-4
        assert parent.col_pos.min() - 1e-4 <= child.col_pos.min() and child.col_pos.max() <= parent.col_pos.max() + 1e-4


def test_max_steps_zero_never_zooms(engine, images):
    (st,) = run_states(engine, [images[0]], [QUESTIONS[0]], AskOptions(gate_thresh=0.0, max_steps=0, **BUDGET))
    assert len(st.blocks) == 1 and st.gate_scores == []


def test_several_boxes_per_step(engine, images):
    one = run_states(engine, [images[0]], [QUESTIONS[0]], AskOptions(force_zoom=True, roi_thresh=0.05, **BUDGET))[0]
    many = run_states(
        engine, [images[0]], [QUESTIONS[0]], AskOptions(force_zoom=True, roi_thresh=0.05, max_boxes=3, **BUDGET)
    )[0]
    assert len(one.blocks) == 2
    assert 2 <= len(many.blocks) <= 4 and {b.step for b in many.blocks[1:]} == {1}
    # Each component box lies inside the single tight box of the paper.
    outer = one.blocks[1].box
    for b in many.blocks[1:]:
        assert outer.x0 <= b.box.x0 and b.box.x1 <= outer.x1 and outer.y0 <= b.box.y0 and b.box.y1 <= outer.y1


def test_the_checkpoints_box_settings_are_the_default_and_a_request_overrides_them(tiny_model, processor, images):
    """`max_boxes` and `roi_thresh` in config.json (written by `qzoom train boxes`) are what a request gets unless it
    sets its own; a config without `max_boxes` gets the paper's one box."""
    assert QZoomEngine(tiny_model, processor).new_state(images[0], "q").max_boxes == 1
    config = copy.deepcopy(tiny_model.config)
    config.max_boxes, config.roi_thresh = 3, 0.15
    calibrated = QZoomQwen2_5_VLForConditionalGeneration(config).eval()
    calibrated.load_state_dict(tiny_model.state_dict())
    engine = QZoomEngine(calibrated, processor)
    st = engine.new_state(images[0], "q")
    assert (st.max_boxes, st.roi_thresh) == (3, 0.15)
    st = engine.new_state(images[0], "q", AskOptions(max_boxes=1, roi_thresh=0.1))
    assert (st.max_boxes, st.roi_thresh) == (1, 0.1)
    # At τ_roi 0.1 this map has two components: the checkpoint's three boxes zoom on both, the paper's one box spans
    # them.
    (default,) = run_states(engine, [images[0]], [QUESTIONS[0]], AskOptions(force_zoom=True, roi_thresh=0.1, **BUDGET))
    (explicit,) = run_states(
        engine, [images[0]], [QUESTIONS[0]], AskOptions(force_zoom=True, roi_thresh=0.1, max_boxes=3, **BUDGET)
    )
    (paper,) = run_states(
        engine, [images[0]], [QUESTIONS[0]], AskOptions(force_zoom=True, roi_thresh=0.1, max_boxes=1, **BUDGET)
    )
    assert len(default.blocks) == 3 and len(paper.blocks) == 2
    assert [b.box for b in default.blocks] == [b.box for b in explicit.blocks]


def test_the_checkpoints_box_mode_is_the_default_and_a_request_overrides_it(tiny_model, processor, images):
    """`box_mode` and `roi_peak_frac` in config.json (the demo model records them) are what a request gets unless it
    sets its own; a request's "union" is the paper's one box even where the checkpoint makes several."""
    st = QZoomEngine(tiny_model, processor).new_state(images[0], "q")
    assert (st.box_mode, st.roi_peak_frac, st.max_boxes) == ("union", 0.0, 1)
    config = copy.deepcopy(tiny_model.config)
    config.box_mode, config.roi_peak_frac, config.max_boxes = "components", 0.5, 2
    recorded = QZoomQwen2_5_VLForConditionalGeneration(config).eval()
    recorded.load_state_dict(tiny_model.state_dict())
    engine = QZoomEngine(recorded, processor)
    st = engine.new_state(images[0], "q")
    assert (st.box_mode, st.roi_peak_frac, st.max_boxes) == ("components", 0.5, 2)
    st = engine.new_state(images[0], "q", AskOptions(box_mode="union", roi_peak_frac=0.0))
    assert (st.box_mode, st.roi_peak_frac, st.max_boxes) == ("union", 0.0, 1)
    assert engine.new_state(images[0], "q").multi_box == "joint"
    config.multi_box = "best"
    best = QZoomQwen2_5_VLForConditionalGeneration(config).eval()
    best.load_state_dict(tiny_model.state_dict())
    assert QZoomEngine(best, processor).new_state(images[0], "q").multi_box == "best"
    assert QZoomEngine(best, processor).new_state(images[0], "q", AskOptions(multi_box="joint")).multi_box == "joint"
    # The heaviest component alone lies inside the paper's one box over every cell.
    opts = {"force_zoom": True, "roi_thresh": 0.1, **BUDGET}
    (heaviest,) = run_states(engine, [images[0]], [QUESTIONS[0]], AskOptions(max_boxes=1, **opts))
    (paper,) = run_states(engine, [images[0]], [QUESTIONS[0]], AskOptions(box_mode="union", roi_peak_frac=0, **opts))
    assert len(heaviest.blocks) == 2 and len(paper.blocks) == 2
    inner, outer = heaviest.blocks[1].box, paper.blocks[1].box
    assert outer.x0 <= inner.x0 and inner.x1 <= outer.x1 and outer.y0 <= inner.y0 and inner.y1 <= outer.y1
    assert inner.width * inner.height < outer.width * outer.height


def test_box_settings_a_request_or_checkpoint_cannot_combine_are_refused(tiny_model):
    with pytest.raises(ValidationError, match="union' makes one box per step; max_boxes 3"):
        AskOptions(box_mode="union", max_boxes=3)
    with pytest.raises(ValidationError, match="box_mode"):
        AskOptions(box_mode="largest")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="multi_box"):
        AskOptions(multi_box="vote")  # type: ignore[arg-type]
    for key, value, accepted in [("box_mode", "largest", "union, components"), ("multi_box", "vote", "joint, best")]:
        config = copy.deepcopy(tiny_model.config)
        setattr(config, key, value)
        with pytest.raises(ValueError, match=f"{key} must be one of {accepted}; got '{value}'"):
            QZoomSettings.from_config(config)


def _alone(engine: QZoomEngine, image, query: str, options: AskOptions, k: int) -> SequenceState:
    """The request zoomed on the k-th box of its proposal alone (through the engine's steps)."""
    st = engine.new_state(image, query, options)
    engine.prepare([st])
    engine.encode([st])
    engine.prefill([st])
    (proposal,) = engine.propose([st])
    assert len(proposal.boxes) > k
    engine.zoom([st], [engine.proposal_from_grid_boxes(st, [proposal.grid_boxes[k]])])
    engine.finish([st])
    engine.decode([st])
    return st


def _mean_logprob(st: SequenceState) -> float:
    return sum(st.answer_logprobs) / len(st.answer_logprobs)


@pytest.mark.parametrize(("query", "expected_winner"), [(QUESTIONS[0], 0), (QUESTIONS[3], 1)])
def test_multi_box_best_answers_from_the_most_confident_box(engine, images, query, expected_winner):
    """`multi_box` "best": each box of the step in a sequence of its own, and the answer (and sequence) of the one
    whose answer tokens have the highest mean log-probability; "joint" keeps every crop in one sequence. For the
    second question the most confident box is not the heaviest (the first), so the choice is seen."""
    opts = {"force_zoom": True, "roi_thresh": 0.1, "box_mode": "components", "max_boxes": 3, "max_new_tokens": 4}
    joint_opts, best_opts = AskOptions(**opts, **BUDGET), AskOptions(**opts, multi_box="best", **BUDGET)
    (joint,) = run_states(engine, [images[0]], [query], joint_opts)
    boxes = [b.box for b in joint.blocks[1:]]
    assert len(boxes) >= 2  # the map of this image has several components at τ_roi 0.1
    alone = [_alone(engine, images[0], query, best_opts, k) for k in range(len(boxes))]
    winner = max(range(len(alone)), key=lambda k: _mean_logprob(alone[k]))
    assert winner == expected_winner
    (best,) = run_states(engine, [images[0]], [query], best_opts)
    assert len(best.blocks) == 2 and best.blocks[1].box == boxes[winner]
    assert best.answer == alone[winner].answer and best.answer_ids == alone[winner].answer_ids
    assert best.answer_logprobs == pytest.approx(alone[winner].answer_logprobs, abs=1e-4)
    assert best.visual_tokens == alone[winner].visual_tokens < joint.visual_tokens
    assert best.alternatives == []
    # Every candidate's log-probabilities are those of its greedy tokens: at most 0, and the end token is counted.
    assert all(lp <= 0 for st in alone for lp in st.answer_logprobs)
    assert all(len(st.answer_logprobs) >= len(st.answer_ids) for st in alone)


def test_multi_box_best_in_a_batch_matches_each_request_alone(engine, images):
    opts = AskOptions(force_zoom=True, roi_thresh=0.1, box_mode="components", max_boxes=3, multi_box="best",
                      max_new_tokens=4, **BUDGET)  # fmt: skip
    together = run_states(engine, images[:3], QUESTIONS[:3], opts)
    for image, query, st in zip(images[:3], QUESTIONS[:3], together, strict=True):
        (single,) = run_states(engine, [image], [query], opts)
        assert [b.box for b in st.blocks] == [b.box for b in single.blocks]
        assert st.answer_ids == single.answer_ids


def test_multi_box_best_over_several_steps_keeps_one_candidate_per_box(engine, images):
    """Two forced steps: the second continues the heaviest box's sequence, the first step's other boxes stay one-step
    candidates, and the answer is the most confident candidate's."""
    opts = AskOptions(force_zoom=True, roi_thresh=0.1, box_mode="components", max_boxes=3, multi_box="best",
                      max_steps=2, max_new_tokens=4, **BUDGET)  # fmt: skip
    st = engine.new_state(images[0], QUESTIONS[3], opts)
    for _ in range(2):
        if not st.blocks:
            engine.prepare([st])
            engine.encode([st])
            engine.prefill([st])
        (proposal,) = engine.propose([st])
        engine.zoom([st], [proposal])
    steps = sorted(c.zoom_steps for c in (st, *st.alternatives))
    assert steps[-1] == 2 and steps[0] == 1 and all(len(c.newest_blocks) == 1 for c in (st, *st.alternatives))
    alternatives = list(st.alternatives)
    engine.finish([st])
    engine.decode([st])
    assert st.alternatives == [] and all(a.answer_logprobs for a in alternatives)  # decoded beside the state
    assert _mean_logprob(st) >= max(_mean_logprob(a) for a in alternatives)


def test_the_command_line_offers_every_multi_box_mode():
    from qzoom.cli import MultiBoxChoice
    from qzoom.schemas import MULTI_BOX_MODES, MultiBox

    assert get_args(MultiBoxChoice) == get_args(MultiBox) == MULTI_BOX_MODES


def test_the_zoom_event_lists_every_box_of_the_step(engine, images):
    opts = AskOptions(force_zoom=True, roi_thresh=0.1, box_mode="components", max_boxes=3, multi_box="best",
                      max_new_tokens=4, **BUDGET)  # fmt: skip
    st = engine.new_state(images[0], QUESTIONS[0], opts)

    async def events() -> list[dict]:
        async with Worker(engine, inline=True) as worker:
            return [e async for e in stream_events(worker, st, "r1")]

    seen = asyncio.run(events())
    (propose,) = [e for e in seen if e["step"] == "propose"]
    (zoom,) = [e for e in seen if e["step"] == "zoom"]
    assert len(zoom["boxes"]) == len(propose["boxes"]) >= 2
    assert sorted(zoom["boxes"]) == sorted(propose["boxes"])
    (chosen,) = st.blocks[1:]
    assert chosen.box.as_list() in zoom["boxes"]


def test_margin_grows_the_box(engine, images):
    plain = run_states(engine, [images[0]], [QUESTIONS[0]], AskOptions(force_zoom=True, roi_thresh=0.1, **BUDGET))[0]
    wide = run_states(
        engine, [images[0]], [QUESTIONS[0]], AskOptions(force_zoom=True, roi_thresh=0.1, margin=0.25, **BUDGET)
    )[0]
    a, b = plain.blocks[1].box, wide.blocks[1].box
    assert b.x0 <= a.x0 and b.y0 <= a.y0 and b.x1 >= a.x1 and b.y1 >= a.y1 and b.width * b.height > a.width * a.height


def test_ask_returns_the_json_contract(engine, images):
    (res,) = ask(engine, [images[0]], [QUESTIONS[0]], AskOptions(gate_thresh=0.0, roi_thresh=0.1, **BUDGET))
    data = res.model_dump()
    assert set(data) == {"answer", "zoomed", "gate_score", "steps", "visual_tokens", "timings_ms", "model"}
    assert data["zoomed"] is True and isinstance(data["gate_score"], float)
    (step,) = data["steps"]
    x0, y0, x1, y1 = step["box"]
    assert 0 <= x0 < x1 <= images[0].width and 0 <= y0 < y1 <= images[0].height
    assert data["visual_tokens"] > step["visual_tokens"] > 0
    assert {"encode", "prefill", "gate", "propose", "zoom", "finish", "decode"} <= set(data["timings_ms"])


def test_ask_rejects_mismatched_inputs(engine, images):
    with pytest.raises(ValueError, match="one query per image"):
        ask(engine, images[:2], QUESTIONS[:1])


@pytest.mark.parametrize("size", [(1, 1), (10, 10), (27, 500), (1, 20000), (20000, 3)])
def test_any_image_size_and_aspect_zooms_inside_the_image(engine, size):
    image = Image.new("RGB", size, (200, 10, 10))
    opts = AskOptions(force_zoom=True, roi_thresh=0.0, max_steps=2, max_new_tokens=2, **BUDGET)
    (res,) = ask(engine, [image], ["what?"], opts)
    assert res.zoomed and len(res.steps) == 2
    for step in res.steps:
        x0, y0, x1, y1 = step.box
        assert 0 <= x0 < x1 <= size[0] and 0 <= y0 < y1 <= size[1]


def test_patch_embed_as_linear_equals_the_stock_conv3d(tiny_model):
    # The override computes the stock Conv3d as one matrix product; the same weights must give the same embeddings.
    patch_embed = tiny_model.model.visual.patch_embed
    assert patch_embed.forward.__func__ is not type(patch_embed).forward  # the override is what runs
    patches = torch.randn(37, 3 * 2 * 14 * 14)
    with torch.no_grad():
        fast = patch_embed(patches)
        stock = type(patch_embed).forward(patch_embed, patches)
    assert fast.shape == stock.shape == (37, patch_embed.embed_dim)
    torch.testing.assert_close(fast, stock, atol=1e-5, rtol=1e-5)
