"""The thinking-with-images tool loop: each profile's real call text, crops from the original image, the turn
format its model was trained on, one append-only KV cache per request, features from the cache."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch

from conftest import MAX_PIXELS, MIN_PIXELS, scene
from qzoom.agent.thinking import think_with_images
from qzoom.engine import ImagePiece
from qzoom.roi import PixelBox
from qzoom.schemas import AskOptions
from qzoom.tools.frames import Frame, to_original
from qzoom.tools.parsers import PROFILES
from qzoom.worker import Worker

OPTS = AskOptions(force_zoom=True, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
IMAGE = scene(640, 480, 11)
QUESTION = "What is written in the red box?"


def call(profile: str, box, **extra) -> str:
    """The literal text each model emits for one zoom call."""
    if profile == "deepeyes":
        return f'<think>zoom</think>\n<tool_call>{{"name": "image_zoom_in_tool", "arguments": {{"bbox_2d": {box}, "label": "box"}}}}</tool_call>'  # noqa: E501 (literal model output)
    if profile == "chain-of-focus":
        return f'<think>closer</think><tool_call>{{"name": "image_zoom_in_tool", "arguments": {{"bbox_2d": {box}}}}}</tool_call>'  # noqa: E501 (literal model output)
    if profile == "mini-o3":
        return f'<think>look</think>\n<grounding>{{"bbox_2d": {box}, "source": "{extra["source"]}"}}</grounding>'
    if profile == "pixel-reasoner":
        return f'<tool_call>{{"name": "crop_image_normalized", "arguments": {{"bbox_2d": {box}, "target_image": {extra["target"]}}}}}</tool_call>'  # noqa: E501 (literal model output)
    if profile == "qwen3-vl":
        return f'<tool_call>\n{{"name": "image_zoom_in_tool", "arguments": {{"bbox_2d": {box}, "label": "box", "img_idx": 0}}}}\n</tool_call>'  # noqa: E501 (literal model output)
    raise AssertionError(profile)


def resized(box):
    """Chain-of-Focus speaks pixels of the image as its processor resized it; crops round outward."""
    wh = PROFILES["chain-of-focus"].resized_wh(IMAGE.size)
    x0, y0, x1, y1 = to_original(tuple(box), Frame.RESIZED_PX, IMAGE.size, wh)
    return [math.floor(x0), math.floor(y0), math.ceil(x1), math.ceil(y1)]


# profile -> (first call, second call, the two crops expected in original pixels, a marker of its turn format)
TRAJECTORIES = {
    "deepeyes": (call("deepeyes", [100, 80, 300, 240]), call("deepeyes", [150, 100, 250, 200]),
                 [[100, 80, 300, 240], [150, 100, 250, 200]], "<tool_response>"),
    "chain-of-focus": (call("chain-of-focus", [100, 80, 300, 240]), call("chain-of-focus", [120, 90, 200, 170]),
                       [resized([100, 80, 300, 240]), resized([120, 90, 200, 170])], QUESTION + "<|im_end|>"),
    "mini-o3": (call("mini-o3", [0.5, 0.5, 1.0, 1.0], source="original_image"),
                call("mini-o3", [0.0, 0.0, 0.5, 0.5], source="observation_1"),
                [[320, 240, 640, 480], [320, 240, 480, 360]], "Observation 1:"),
    "pixel-reasoner": (call("pixel-reasoner", [0.25, 0.25, 0.75, 0.75], target=1),
                       call("pixel-reasoner", [0.0, 0.0, 0.5, 0.5], target=2),
                       [[160, 120, 480, 360], [160, 120, 320, 240]], "Here is the cropped image (Image Size: 320x240)"),
    "qwen3-vl": (call("qwen3-vl", [500, 500, 1000, 1000]), call("qwen3-vl", [0, 0, 500, 500]),
                 [[320, 240, 640, 480], [0, 0, 320, 240]], "<tool_response>\n<|vision_start|>"),
}  # fmt: skip


def scripted(first: str, second: str):
    turns = {1: first, 2: second, 3: "<think>I can read it now.</think> <answer>K7X</answer>"}
    return lambda turn, conversation: turns[turn]


def run_loop(engine, profile, policy, **kw):
    async def go():
        async with Worker(engine) as worker:
            return await think_with_images(worker, IMAGE, QUESTION, profile, options=kw.pop("options", OPTS),
                                           policy=policy, **kw)  # fmt: skip

    return asyncio.run(go())


@pytest.mark.parametrize("profile", sorted(TRAJECTORIES))
def test_two_zoom_trajectory_end_to_end(engine, tiny_model, profile):
    first, second, expected, marker = TRAJECTORIES[profile]
    res = run_loop(engine, profile, scripted(first, second))
    assert res.answer == "K7X" and res.finished_by == "answer"
    assert res.zooms == expected
    # Each zoom turn's call is recorded as the literal text the model wrote; the answer turn has none.
    assert [len(t.calls) for t in res.turns] == [1, 1, 0]
    assert res.turns[0].calls[0] in first and res.turns[1].calls[0] in second
    assert marker in res.conversation
    assert res.conversation.count("<|vision_start|>") == 3  # the original and the two crops
    assert res.conversation.count("<|im_start|>assistant\n") == 3
    # One append-only cache: the last logits equal a recompute of the whole conversation from scratch.
    st = res.state
    with torch.inference_mode():
        full = tiny_model(inputs_embeds=st.embeds[None], position_ids=st.positions[:, None]).logits[0, -1].float()
    torch.testing.assert_close(st.next_logits, full, rtol=1e-4, atol=1e-4)
    assert st.kv_all[0][0].shape[1] == st.input_ids.numel() == st.hidden_k.shape[0]


def test_second_run_takes_image_and_crop_features_from_the_cache(engine):
    first, second, expected, _ = TRAJECTORIES["deepeyes"]
    run_loop(engine, "deepeyes", scripted(first, second))
    again = run_loop(engine, "deepeyes", scripted(first, second))
    assert again.zooms == expected
    assert again.cache_hits.count("crop") == 2 and "vision" in again.cache_hits and "prefix" in again.cache_hits


def test_malformed_call_is_answered_with_the_accepted_form_and_the_model_retries(engine):
    bad = '<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [10, 20, 30]}}</tool_call>'
    good = call("deepeyes", [100, 80, 300, 240])
    res = run_loop(engine, "deepeyes", scripted(bad, good))
    assert res.turns[0].error is not None and "accepted form" in res.turns[0].error
    assert "accepted form" in res.conversation  # the model was shown the problem
    assert res.zooms == [[100, 80, 300, 240]] and res.answer == "K7X"


def test_box_outside_the_named_image_is_refused_naming_its_size_and_the_model_retries(engine):
    outside = call("deepeyes", [5000, 5000, 6000, 6000])  # the image is 640x480: no pixel in common
    good = call("deepeyes", [100, 80, 300, 240])
    res = run_loop(engine, "deepeyes", scripted(outside, good))
    assert res.turns[0].error is not None and "640x480" in res.turns[0].error
    assert "outside the image" in res.conversation  # shown to the model, not clamped to a corner crop
    assert res.zooms == [[100, 80, 300, 240]] and res.answer == "K7X"


def test_call_without_a_box_and_auto_mode_take_the_sd_rpn_box(engine):
    boxless = '<tool_call>{"name": "image_zoom_in_tool", "arguments": {"label": "the red box"}}</tool_call>'
    res = run_loop(engine, "deepeyes", scripted(boxless, "<answer>x</answer>"), options=AskOptions(
        force_zoom=True, roi_thresh=0.1, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS))  # fmt: skip
    proposal = res.state.proposals[0]
    assert res.zooms == [proposal.boxes[0].as_list()] and len(res.turns) == 2
    first, _, _, _ = TRAJECTORIES["deepeyes"]
    auto = run_loop(engine, "deepeyes", scripted(first, "<answer>x</answer>"), box_source="sd_rpn")
    assert auto.zooms != [[100, 80, 300, 240]] and len(auto.state.proposals) == 1


def test_closed_gate_answers_without_any_tool_turn(engine):
    opts = AskOptions(gate_thresh=1.0, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, max_new_tokens=3)
    never = lambda turn, conv: pytest.fail("the policy must not be asked when the gate is closed")  # noqa: E731
    res = run_loop(engine, "deepeyes", never, options=opts)
    assert res.finished_by == "gate" and res.turns == [] and res.zooms == [] and res.gate_score is not None


def test_turn_limit_stops_an_endless_zoomer(engine):
    forever = lambda turn, conv: call("deepeyes", [0, 0, 200, 200])  # noqa: E731
    res = run_loop(engine, "deepeyes", forever, max_turns=3)
    assert res.finished_by == "turn_limit" and len(res.turns) == 3 and len(res.zooms) == 2


def test_model_generation_drives_the_loop(engine):
    res = run_loop(engine, "qwen3-vl", None, max_turns=2, max_new_tokens=6)
    assert res.finished_by in {"answer", "turn_limit"} and 1 <= len(res.turns) <= 2
    assert res.state.kv_all[0][0].shape[1] == res.state.input_ids.numel()


def test_unknown_profile_is_refused(engine):
    with pytest.raises(ValueError, match="expected one of"):
        run_loop(engine, "active-o3", None)


def test_appended_images_take_stock_positions(engine, tiny_model):
    st = engine.new_state(IMAGE, QUESTION, OPTS)
    engine.prepare([st])
    engine.encode([st])
    engine.prefill([st])
    engine.finish([st])
    crop = ImagePiece(IMAGE.crop((0, 0, 200, 150)), PixelBox(0, 0, 200, 150))
    engine.append([st], [["<|im_start|>user\nLook:", crop, "again<|im_end|>\n<|im_start|>assistant\n"]])
    grids = torch.stack([st.grid_thw, torch.tensor([1, st.blocks[1].grid_hw[0] * 2, st.blocks[1].grid_hw[1] * 2])])
    ids = st.input_ids[None]
    expected, _ = tiny_model.model.get_rope_index(ids, (ids == engine.image_token_id).int(), image_grid_thw=grids)
    assert torch.equal(st.positions, expected[:, 0].float())
    with torch.inference_mode():
        full = tiny_model(inputs_embeds=st.embeds[None], position_ids=st.positions[:, None]).logits[0, -1].float()
    torch.testing.assert_close(st.next_logits, full, rtol=1e-4, atol=1e-4)
