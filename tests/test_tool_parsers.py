"""Zoom-call parsers (qzoom.tools.parsers): each profile reads the literal text its model emits (peers.md §3).

The call texts below are copied in shape from the peers' own prompts, examples and parsers (the files named in each
profile's `source`); the numbers are ours.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from qzoom.tools.frames import Frame, smart_resize
from qzoom.tools.parsers import (
    PROFILES,
    CallForm,
    CropReturn,
    ModelProfile,
    ZoomCall,
    ZoomCallError,
    get_profile,
    parse_zoom_calls,
)


def one(text: str, profile: str) -> ZoomCall:
    calls = parse_zoom_calls(text, profile)
    assert len(calls) == 1, calls
    return calls[0]


# --------------------------------------------------------------------------------------------------------------
# DeepEyes: both forms


def test_deepeyes_hermes_call() -> None:
    text = (
        "<think>The plate is too small to read; I will zoom in on it.</think>\n"
        "<tool_call>\n"
        '{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [1023, 388, 1310, 512], "label": "licence plate"}}\n'
        "</tool_call>"
    )
    call = one(text, "deepeyes")
    assert call.tool == "image_zoom_in_tool"
    assert call.frame is Frame.ORIGINAL_PX
    assert call.boxes == ((1023.0, 388.0, 1310.0, 512.0),)
    assert call.label == "licence plate"
    assert call.raw == text[text.index("<tool_call>") :]
    assert text[call.span[0] : call.span[1]] == call.raw
    assert call.image_index == 0


def test_deepeyes_several_calls_in_one_turn_prompt_v5() -> None:
    # The two-call example of DeepEyes' SYSTEM_PROMPT_V5, whitespace included.
    text = (
        "<think>Two objects matter.</think> <tool_call>  \n"
        '{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [10, 20, 100, 200], "label": "the apple on the desk"}}'
        "  \n</tool_call>\n<tool_call>  \n"
        '{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [8, 40, 50, 150], '
        '"label": "the person under the tree"}}'
        "  \n</tool_call>"
    )
    calls = parse_zoom_calls(text, "deepeyes")
    assert [c.boxes[0] for c in calls] == [(10, 20, 100, 200), (8, 40, 50, 150)]
    assert [c.label for c in calls] == ["the apple on the desk", "the person under the tree"]
    assert calls[0].span[1] <= calls[1].span[0]


def test_deepeyes_zoom_in_function_in_tool_call_prompt_v4() -> None:
    text = (
        "<think>Need a closer look.</think>\n<tool_call>\n"
        '{"function": "zoom_in", "bbox_2d": [412, 96, 655, 240], "label": "clock face"}\n</tool_call>'
    )
    call = one(text, "deepeyes")
    assert call.tool == "zoom_in"
    assert call.boxes == ((412, 96, 655, 240),)
    assert call.label == "clock face"


def test_deepeyes_zoom_in_function_in_json_fence_prompt_v3() -> None:
    text = (
        "The sign is unreadable at this size.\n"
        '```json\n{\n  "function": "zoom_in",\n  "bbox_2d": [140, 60, 380, 170],\n  "label": "street sign"\n}\n```'
    )
    call = one(text, "deepeyes")
    assert call.boxes == ((140, 60, 380, 170),)
    assert call.raw.startswith("```json") and call.raw.endswith("```")


def test_deepeyes_fence_inside_tool_call_is_one_call() -> None:
    text = '<tool_call>\n```json\n{"function": "zoom_in", "bbox_2d": [1, 2, 30, 40]}\n```\n</tool_call>'
    assert len(parse_zoom_calls(text, "deepeyes")) == 1


def test_json_fence_without_function_is_not_a_call() -> None:
    text = 'Here is the data:\n```json\n{"answer": 3}\n```\n<answer>3</answer>'
    assert parse_zoom_calls(text, "deepeyes") == []


def test_stop_string_cut_off_still_parses() -> None:
    # vLLM drops the stop string '</tool_call>' from the output by default.
    text = (
        '<think>zoom</think>\n<tool_call>\n{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [5, 6, 70, 80]}}\n'
    )
    call = one(text, "deepeyes")
    assert call.boxes == ((5, 6, 70, 80),)
    assert call.label is None
    assert call.span[1] == len(text)


def test_answer_without_call_is_empty() -> None:
    assert parse_zoom_calls("<think>It is red.</think> <answer>red</answer>", "deepeyes") == []
    assert parse_zoom_calls("", "qwen3-vl") == []


# --------------------------------------------------------------------------------------------------------------
# Chain-of-Focus


def test_chain_of_focus_named_and_bare_forms() -> None:
    named = (
        "<think>The text on the mug is small.</think> <tool_call>"
        '{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [702, 415, 820, 530], "label": "mug"}}</tool_call>'
    )
    bare = '<tool_call>{"bbox_2d": [702, 415, 820, 530]}</tool_call>'
    a, b = one(named, "chain-of-focus"), one(bare, "chain-of-focus")
    assert a.frame is b.frame is Frame.RESIZED_PX
    assert a.boxes == b.boxes == ((702, 415, 820, 530),)
    assert b.tool == "bbox_2d"


def test_chain_of_focus_boxes_are_in_the_resized_frame() -> None:
    call = one('<tool_call>{"bbox_2d": [100, 100, 300, 200]}</tool_call>', "chain-of-focus")
    image_wh = (5000, 4000)  # 20 Mpx: smart-resized down to <= 3840^2 = 14.7 Mpx
    rh, rw = smart_resize(4000, 5000, factor=28, min_pixels=112 * 112, max_pixels=3840 * 3840)
    assert get_profile("chain-of-focus").resized_wh(image_wh) == (rw, rh)
    (box,) = call.original_boxes(image_wh)
    assert box == pytest.approx((100 * 5000 / rw, 100 * 4000 / rh, 300 * 5000 / rw, 200 * 4000 / rh))
    # An explicit resized size wins over the profile's budget.
    assert call.original_boxes((1000, 1000), (500, 500)) == ((200.0, 200.0, 600.0, 400.0),)


# --------------------------------------------------------------------------------------------------------------
# Mini-o3


def test_mini_o3_grounding_with_source() -> None:
    text = (
        "<think>The small sign on the left might say the store name. Let me zoom in.</think> "
        '<grounding>{"bbox_2d": [0.12, 0.40, 0.31, 0.55], "source": "original_image"}</grounding>'
    )
    call = one(text, "mini-o3")
    assert call.frame is Frame.UNIT
    assert call.source == "original_image" and call.image_index == 0
    assert call.boxes == ((0.12, 0.40, 0.31, 0.55),)
    assert call.original_boxes((2000, 1000))[0] == pytest.approx((240.0, 400.0, 620.0, 550.0))


def test_mini_o3_observation_source_and_cut_stop_string() -> None:
    text = '<think>Closer.</think> <grounding>{"bbox_2d": [0.5, 0.5, 0.9, 0.8], "source": "observation_2"}'
    call = one(text, "mini-o3")
    assert call.source == "observation_2"
    assert call.image_index == 2  # observations list: 0 = original, i = Observation i


def test_mini_o3_python_literal_quotes_accepted() -> None:
    # Mini-o3's own regex takes either quote around the source, and eval()s the box.
    call = one("<grounding>{'bbox_2d': [0.1, 0.1, 0.2, 0.3], 'source': 'observation_1'}</grounding>", "mini-o3")
    assert call.image_index == 1


def test_mini_o3_one_call_per_turn() -> None:
    g = '<grounding>{"bbox_2d": [0.1, 0.1, 0.2, 0.3], "source": "original_image"}</grounding>'
    with pytest.raises(ZoomCallError, match="2 zoom calls in one turn"):
        parse_zoom_calls(g + " " + g, "mini-o3")


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ('{"bbox_2d": [0.1, 0.1, 0.2, 0.3]}', "missing key 'source'"),
        ('{"bbox_2d": [0.1, 0.1, 0.2, 0.3], "source": "image_2"}', "source must be"),
        ('{"bbox_2d": [0.1, 0.1, 0.2, 0.3], "source": "observation_0"}', "numbered from 1"),
        ('{"bbox_2d": [120, 80, 300, 260], "source": "original_image"}', r"outside \[0, 1\]"),
    ],
)
def test_mini_o3_errors(body: str, problem: str) -> None:
    with pytest.raises(ZoomCallError, match=problem):
        parse_zoom_calls(f"<grounding>{body}</grounding>", "mini-o3")


def test_mini_o3_resized_profile_reads_pixels() -> None:
    text = '<grounding>{"bbox_2d": [120, 80, 300, 260], "source": "original_image"}</grounding>'
    call = one(text, "mini-o3-resized")
    assert call.frame is Frame.RESIZED_PX
    rw, rh = get_profile("mini-o3-resized").resized_wh((3000, 2000))
    assert call.original_boxes((3000, 2000))[0] == pytest.approx(
        (120 * 3000 / rw, 80 * 2000 / rh, 300 * 3000 / rw, 260 * 2000 / rh)
    )


# --------------------------------------------------------------------------------------------------------------
# Pixel-Reasoner


def test_pixel_reasoner_crop_image_normalized() -> None:
    # The shape of the example in Pixel-Reasoner's experience_maker.py, spacing included.
    text = (
        "To identify the animal on the sign, I will zoom in on the Woolshops Shopping Centre sign.\n\n"
        "<tool_call>\n"
        '{"name": "crop_image_normalized", "arguments": {"bbox_2d": [0.1, 0.2, 0.3, 0.4], "target_image":1}}\n'
        "</tool_call>"
    )
    call = one(text, "pixel-reasoner")
    assert call.tool == "crop_image_normalized"
    assert call.target_image == 1 and call.image_index == 0
    assert call.frame is Frame.UNIT


def test_pixel_reasoner_target_image_is_one_based() -> None:
    text = (
        '<tool_call>{"name": "crop_image_normalized", "arguments": {"bbox_2d": [0.5, 0.5, 0.7, 0.9], '
        '"target_image": 2}}</tool_call>'
    )
    assert one(text, "pixel-reasoner").image_index == 1


def test_pixel_reasoner_pixels_are_refused_not_guessed() -> None:
    # Their executor would silently reinterpret this as pixels; we never guess the frame from the values.
    text = (
        '<tool_call>{"name": "crop_image_normalized", "arguments": {"bbox_2d": [12, 30, 240, 200], '
        '"target_image": 1}}</tool_call>'
    )
    with pytest.raises(ZoomCallError, match=r"outside \[0, 1\]") as err:
        parse_zoom_calls(text, "pixel-reasoner")
    assert "fractions of the image width/height in [0, 1]" in str(err.value)


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        ('{"bbox_2d": [0.1, 0.2, 0.3, 0.4]}', "missing key 'target_image'"),
        ('{"bbox_2d": [0.1, 0.2, 0.3, 0.4], "target_image": 0}', "target_image must be an integer >= 1"),
        ('{"bbox_2d": [0.1, 0.2, 0.3, 0.4], "target_image": "1"}', "target_image must be an integer >= 1"),
    ],
)
def test_pixel_reasoner_errors(args: str, problem: str) -> None:
    with pytest.raises(ZoomCallError, match=problem):
        parse_zoom_calls(
            f'<tool_call>{{"name": "crop_image_normalized", "arguments": {args}}}</tool_call>', "pixel-reasoner"
        )


# --------------------------------------------------------------------------------------------------------------
# Qwen3-VL / Qwen-Agent


def test_qwen3_image_zoom_in_tool_with_img_idx() -> None:
    text = (
        "<think>\nThe jersey number is tiny; zoom on the player.\n</think>\n\n"
        "<tool_call>\n"
        '{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [612, 220, 748, 515], '
        '"label": "player", "img_idx": 0}}\n'
        "</tool_call>"
    )
    call = one(text, "qwen3-vl")
    assert call.frame is Frame.PERMILLE
    assert call.img_idx == 0 and call.image_index == 0
    assert call.label == "player"
    assert call.original_boxes((2000, 1000))[0] == pytest.approx((1224.0, 220.0, 1496.0, 515.0))
    assert not call.model_profile.image_index_counts_tool_images


def test_qwen3_several_calls_and_float_index() -> None:
    c = '{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [0, 0, 500, 500], "label": "a", "img_idx": %s}}'
    calls = parse_zoom_calls(
        f"<tool_call>\n{c % '0.0'}\n</tool_call>\n<tool_call>\n{c % '1'}\n</tool_call>", "qwen3-vl"
    )
    assert [k.img_idx for k in calls] == [0, 1]


def test_qwen3_arguments_as_json_string() -> None:
    # OpenAI-style tool calls carry the arguments as a JSON string.
    text = (
        '<tool_call>{"name": "image_zoom_in_tool", "arguments": '
        '"{\\"bbox_2d\\": [10, 10, 90, 90], \\"img_idx\\": 0}"}</tool_call>'
    )
    assert one(text, "qwen3-vl").boxes == ((10, 10, 90, 90),)


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        ('{"bbox_2d": [10, 10, 90, 90], "label": "x"}', "missing key 'img_idx'"),
        ('{"bbox_2d": [10, 10, 90, 90], "img_idx": "0"}', "img_idx must be an integer >= 0"),
        ('{"bbox_2d": [10, 10, 1090, 90], "img_idx": 0}', r"outside \[0, 1000\]"),
        ('{"bbox_2d": [10, 10, 90, 90], "img_idx": 0, "label": 7}', "label must be a string"),
    ],
)
def test_qwen3_errors(args: str, problem: str) -> None:
    with pytest.raises(ZoomCallError, match=problem):
        parse_zoom_calls(f'<tool_call>{{"name": "image_zoom_in_tool", "arguments": {args}}}</tool_call>', "qwen3-vl")


# --------------------------------------------------------------------------------------------------------------
# Active-o3


def test_active_o3_up_to_three_boxes() -> None:
    text = (
        "<think> The question asks about the bus; the bus stop, the bus itself and the timetable may help. </think>\n"
        "<answer>\n"
        '[{"bbox_2d": [34, 210, 260, 480], "label": "bus stop"}, '
        '{"bbox_2d": [600, 300, 980, 640], "label": "bus"}, '
        '{"bbox_2d": [1010, 120, 1150, 260], "label": "timetable"}]\n'
        "</answer>"
    )
    call = one(text, "active-o3")
    assert call.frame is Frame.RESIZED_PX
    assert len(call.boxes) == 3
    assert call.labels == ("bus stop", "bus", "timetable")
    assert call.label == "bus stop"
    px = call.pixel_boxes((2400, 1600))
    assert len(px) == 3 and all(0 <= b[0] < b[2] <= 2400 and 0 <= b[1] < b[3] <= 1600 for b in px)


def test_active_o3_fourth_box_refused() -> None:
    regions = ", ".join(f'{{"bbox_2d": [{i * 10}, 0, {i * 10 + 50}, 50], "label": "r{i}"}}' for i in range(4))
    with pytest.raises(ZoomCallError, match="4 regions; at most 3") as err:
        parse_zoom_calls(f"<answer>[{regions}]</answer>", "active-o3")
    assert "<answer>[{" in str(err.value)


def test_active_o3_fenced_single_and_empty() -> None:
    fenced = '<answer>\n```json\n[{"bbox_2d": [1, 2, 60, 70], "label": "sign"}]\n```\n</answer>'
    assert one(fenced, "active-o3").boxes == ((1, 2, 60, 70),)
    assert one('<answer>{"bbox_2d": [1, 2, 60, 70]}</answer>', "active-o3").labels == (None,)
    assert parse_zoom_calls("<answer>[]</answer>", "active-o3") == []
    assert parse_zoom_calls("<think>nothing</think>", "active-o3") == []


def test_active_o3_bad_region() -> None:
    with pytest.raises(ZoomCallError, match="region 2 bbox_2d"):
        parse_zoom_calls('<answer>[{"bbox_2d": [1, 2, 60, 70]}, {"bbox_2d": [1, 2, 60]}]</answer>', "active-o3")


# --------------------------------------------------------------------------------------------------------------
# OpenThinkIMG


def test_openthinkimg_crop_action() -> None:
    text = (
        '{"thought": "The legend is small, crop the top-right corner.", '
        '"actions": [{"name": "Crop", "arguments": {"image": "img_1", "param": "[620, 40, 980, 210]"}}]}'
    )
    call = one(text, "openthinkimg")
    assert call.tool == "Crop"
    assert call.frame is Frame.ORIGINAL_PX
    assert call.boxes == ((620, 40, 980, 210),)
    assert call.source == "img_1" and call.image_index == 0
    assert call.raw == text


def test_openthinkimg_other_actions_are_not_zoom_calls() -> None:
    text = '```json\n{"thought": "done", "actions": [{"name": "Terminate", "arguments": {"ans": "1985"}}]}\n```'
    assert parse_zoom_calls(text, "openthinkimg") == []
    assert parse_zoom_calls("The answer is 4.", "openthinkimg") == []


@pytest.mark.parametrize(
    ("arguments", "problem"),
    [
        ('{"image": "img_1", "param": "[620, 40, 980]"}', "param must be a string of 4 integers"),
        ('{"image": "img_1", "param": "[620.5, 40, 980, 210]"}', "param must be a string of 4 integers"),
        ('{"image": "img_1", "param": [620.5, 40, 980, 210]}', "param must hold integers"),
        ('{"image": "picture", "param": "[620, 40, 980, 210]"}', "image must name an image"),
        ('{"param": "[620, 40, 980, 210]"}', "missing key 'image'"),
        ('{"image": "img_2", "param": "[980, 40, 620, 210]"}', r"x1 \(620\) must be greater than x0 \(980\)"),
    ],
)
def test_openthinkimg_errors(arguments: str, problem: str) -> None:
    text = f'{{"thought": "t", "actions": [{{"name": "Crop", "arguments": {arguments}}}]}}'
    with pytest.raises(ZoomCallError, match=problem):
        parse_zoom_calls(text, "openthinkimg")


def test_openthinkimg_malformed_json() -> None:
    with pytest.raises(ZoomCallError, match="malformed JSON"):
        parse_zoom_calls('{"thought": "t", "actions": [{"name": "Crop", "arguments": {', "openthinkimg")


# --------------------------------------------------------------------------------------------------------------
# VisionThink


def test_visionthink_resize_image() -> None:
    text = (
        "<think>The text is blurry at this resolution, I need the image at a higher resolution.</think>\n"
        '<tool_call>\n{"name": "resize_image", "arguments": {"action": "resize"}}\n</tool_call>'
    )
    call = one(text, "visionthink")
    assert call.action == "resize" and call.scale == 2.0
    assert call.boxes == ((0.0, 0.0, 1.0, 1.0),)
    assert call.pixel_boxes((640, 480)) == ((0, 0, 640, 480),)


def test_visionthink_unknown_action() -> None:
    with pytest.raises(ZoomCallError, match='unknown action "crop"'):
        parse_zoom_calls(
            '<tool_call>{"name": "resize_image", "arguments": {"action": "crop"}}</tool_call>', "visionthink"
        )


# --------------------------------------------------------------------------------------------------------------
# Errors: every message quotes the problem and shows the accepted form


def _zoom(args: str) -> str:
    return f'<tool_call>{{"name": "image_zoom_in_tool", "arguments": {args}}}</tool_call>'


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (
            '<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [1, 2, 3, 4]}</tool_call>',
            "malformed JSON",
        ),
        ("<tool_call>\n</tool_call>", "empty call"),
        ('<tool_call>["image_zoom_in_tool"]</tool_call>', "must be a JSON object"),
        ('<tool_call>{"arguments": {"bbox_2d": [1, 2, 30, 40]}}</tool_call>', "missing key 'name'"),
        ('<tool_call>{"name": "image_zoom_in_tool"}</tool_call>', "missing key 'arguments'"),
        (_zoom('{"label": "cat"}'), "missing key 'bbox_2d'"),
        (_zoom('{"bbox_2d": [1, 2, 30]}'), "wrong arity: 3"),
        (_zoom('{"bbox_2d": [1, 2, 30, 40, 50]}'), "wrong arity: 5"),
        (_zoom('{"bbox_2d": "1, 2, 30, 40"}'), "must be a list"),
        (_zoom('{"bbox_2d": [1, "two", 30, 40]}'), '"two" is not a number'),
        (_zoom('{"bbox_2d": [1, true, 30, 40]}'), "true is not a number"),
        (_zoom('{"bbox_2d": [1, 2, NaN, 40]}'), "not a finite number"),
        (_zoom('{"bbox_2d": [50, 2, 30, 40]}'), r"x1 \(30\) must be greater than x0 \(50\)"),
        (_zoom('{"bbox_2d": [5, 40, 30, 40]}'), r"y1 \(40\) must be greater than y0 \(40\)"),
        (_zoom('{"bbox_2d": [1, 2, 30, 40], "label": ["a"]}'), "label must be a string"),
        (
            '<tool_call>{"name": "image_rotate_tool", "arguments": {"angle": 90}}</tool_call>',
            'unknown tool "image_rotate_tool"',
        ),
        ('<tool_call>{"function": "rotate", "bbox_2d": [1, 2, 30, 40]}</tool_call>', 'unknown function "rotate"'),
    ],
)
def test_malformed_calls_quote_problem_and_accepted_form(text: str, problem: str) -> None:
    with pytest.raises(ZoomCallError, match=problem) as err:
        parse_zoom_calls("<think>zoom</think> " + text, "deepeyes")
    message = str(err.value)
    assert text[:60] in message  # the offending text, quoted
    assert PROFILES["deepeyes"].accepted_form in message
    assert "absolute pixels of the original (source) image" in message
    assert issubclass(ZoomCallError, ValueError)
    assert err.value.profile == "deepeyes"


def test_error_quote_is_truncated() -> None:
    text = _zoom('{"bbox_2d": [1, 2, 3], "label": "%s"}' % ("x" * 1000))
    with pytest.raises(ZoomCallError) as err:
        parse_zoom_calls(text, "deepeyes")
    assert len(str(err.value)) < 1000 and "..." in str(err.value)


def test_bare_bbox_is_only_chain_of_focus() -> None:
    with pytest.raises(ZoomCallError, match="missing key 'name'"):
        parse_zoom_calls('<tool_call>{"bbox_2d": [1, 2, 30, 40]}</tool_call>', "deepeyes")


def test_unknown_profile() -> None:
    with pytest.raises(ValueError, match="unknown zoom profile 'gpt-5'; known: active-o3"):
        parse_zoom_calls("", "gpt-5")


# --------------------------------------------------------------------------------------------------------------
# The frame comes from the profile, never from the values


def test_same_numbers_different_profiles_different_boxes() -> None:
    text = _zoom('{"bbox_2d": [100, 200, 300, 400], "label": "x", "img_idx": 0}')
    image_wh = (4000, 3000)
    got = {p: one(text, p).original_boxes(image_wh)[0] for p in ("deepeyes", "qwen3-vl", "chain-of-focus")}
    assert got["deepeyes"] == (100.0, 200.0, 300.0, 400.0)
    assert got["qwen3-vl"] == pytest.approx((400.0, 600.0, 1200.0, 1200.0))
    rw, rh = get_profile("chain-of-focus").resized_wh(image_wh)
    assert (rw, rh) != image_wh
    assert got["chain-of-focus"] == pytest.approx((100 * 4000 / rw, 200 * 3000 / rh, 300 * 4000 / rw, 400 * 3000 / rh))
    assert len({tuple(round(v, 6) for v in b) for b in got.values()}) == 3


def test_tiny_normalised_looking_pixel_box_stays_pixels() -> None:
    # [0.2, 0.2, 0.8, 0.8] under DeepEyes is a sub-pixel box in pixels, not 60% of the image.
    call = one(_zoom('{"bbox_2d": [0.2, 0.2, 0.8, 0.8]}'), "deepeyes")
    assert call.original_boxes((1000, 1000)) == ((0.2, 0.2, 0.8, 0.8),)
    assert call.pixel_boxes((1000, 1000)) == ((0, 0, 28, 28),)


def test_pixel_boxes_use_profile_min_side_and_aspect() -> None:
    qwen3 = one(_zoom('{"bbox_2d": [500, 500, 501, 501], "img_idx": 0}'), "qwen3-vl")
    (b,) = qwen3.pixel_boxes((1000, 1000))
    assert (b[2] - b[0], b[3] - b[1]) == (32, 32)
    deepeyes = one(_zoom('{"bbox_2d": [500, 500, 501, 501]}'), "deepeyes")
    (b,) = deepeyes.pixel_boxes((1000, 1000))
    assert (b[2] - b[0], b[3] - b[1]) == (28, 28)
    # DeepEyes caps the aspect ratio at 100: a 3000x1 strip becomes 3000x30.
    strip = one(_zoom('{"bbox_2d": [0, 100, 3000, 101]}'), "deepeyes")
    (b,) = strip.pixel_boxes((4000, 4000))
    assert (b[2] - b[0]) / (b[3] - b[1]) <= 100


# --------------------------------------------------------------------------------------------------------------
# The profiles themselves


def test_profiles_table() -> None:
    expected = {
        "deepeyes": (Frame.ORIGINAL_PX, 28),
        "chain-of-focus": (Frame.RESIZED_PX, 28),
        "mini-o3": (Frame.UNIT, 28),
        "mini-o3-resized": (Frame.RESIZED_PX, 28),
        "pixel-reasoner": (Frame.UNIT, 28),
        "qwen3-vl": (Frame.PERMILLE, 32),
        "active-o3": (Frame.RESIZED_PX, 28),
        "openthinkimg": (Frame.ORIGINAL_PX, 28),
        "visionthink": (Frame.UNIT, 28),
    }
    assert {n: (p.frame, p.min_side) for n, p in PROFILES.items()} == expected
    for name, p in PROFILES.items():
        assert isinstance(p, ModelProfile) and p.name == name
        assert p.forms and all(isinstance(f, CallForm) for f in p.forms)
        assert isinstance(p.crop_return, CropReturn)
        assert p.accepted_form and p.crop_turn and p.source and p.system_prompt_ref
        if p.frame is Frame.RESIZED_PX:
            assert p.resized_wh((1920, 1080))[0] % p.resize_factor == 0
    assert PROFILES["deepeyes"].max_aspect == 100
    assert PROFILES["mini-o3"].max_aspect == 200
    assert PROFILES["active-o3"].max_boxes_per_call == 3
    assert PROFILES["mini-o3"].stop == ("</grounding>",)
    assert get_profile(PROFILES["mini-o3"]) is PROFILES["mini-o3"]


def test_profile_without_budget_needs_explicit_resized_size() -> None:
    with pytest.raises(ValueError, match="no pixel budget"):
        PROFILES["deepeyes"].resized_wh((100, 100))


def test_zoom_call_labels_must_match_boxes() -> None:
    with pytest.raises(ValueError, match="one label"):
        ZoomCall(raw="", span=(0, 0), profile="deepeyes", tool="t", frame=Frame.UNIT, boxes=((0, 0, 1, 1),), labels=())


# --------------------------------------------------------------------------------------------------------------
# No torch on the tool client's import path


def test_tool_modules_import_no_torch() -> None:
    code = (
        "import sys\n"
        "import qzoom.tools.parsers, qzoom.tools.schema, qzoom.tools.frames, qzoom.tools.tool_args\n"
        "import qzoom.tools.mcp_server, qzoom.tools.langchain_tool\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'PIL') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    # DESIGN.md: agents use the tool client without torch. A failure here usually means a package on the import path
    # (qzoom/__init__.py included, since qzoom.tools lives inside qzoom) imports torch eagerly.
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_a_tool_call_mentioned_while_thinking_does_not_swallow_the_real_call():
    real = '<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [10, 20, 110, 220]}}</tool_call>'
    text = f"<think>I should write <tool_call> with the box of the sign.</think>{real}"
    (call,) = parse_zoom_calls(text, "deepeyes")
    assert call.boxes == ((10.0, 20.0, 110.0, 220.0),) and call.raw == real
    assert text[call.span[0] : call.span[1]] == real
    # Reasoning opened by the chat template (no <think> in the turn) is masked up to its </think>.
    (call,) = parse_zoom_calls(f"a <tool_call> is due</think>\n{real}", "deepeyes")
    assert call.raw == real
    # Without the mask the mention would open a block that swallows the call: malformed JSON.
    with pytest.raises(ZoomCallError):
        parse_zoom_calls(f"I should write <tool_call> now. {real}", "deepeyes")


def test_a_box_outside_the_image_is_an_error_naming_the_image_size():
    (call,) = parse_zoom_calls(
        '<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [5000, 5000, 6000, 6000]}}</tool_call>',
        "deepeyes",
    )
    with pytest.raises(ZoomCallError, match=r"lies entirely outside the image, which is 2000x1500 pixels"):
        call.pixel_boxes((2000, 1500))
    (edge,) = parse_zoom_calls(
        '<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [1990, 1400, 2100, 1600]}}</tool_call>',
        "deepeyes",
    )
    assert edge.pixel_boxes((2000, 1500)) == ((1972, 1400, 2000, 1500),)  # overlapping: clipped as before
