"""Zoom calls in the syntaxes of RL "thinking-with-images" models (peers.md §3), read per named model profile.

Pure Python (json, ast, re): agents and the tool loop import this without torch.

Contract
--------
* `PROFILES` maps a profile name to a `ModelProfile`: the call syntax the model was trained on, the coordinate
  `Frame` of its boxes, its minimum crop side (28 px Qwen2/2.5-VL, 32 px Qwen3-VL) and aspect cap, how many calls a
  turn and boxes a call it may make, how its crop goes back into the conversation, its stop strings and turn limit,
  and where its system prompt lives. The frame always comes from the profile, never from the values (a tiny box in
  pixels looks like a normalised one; Pixel-Reasoner's "< 1 means normalised" rule fails exactly there).
* ``parse_zoom_calls(text, profile)`` returns the zoom calls of one model turn, in order of appearance; ``[]`` when
  the turn makes none (it answered). Each `ZoomCall` keeps the exact text it was read from, its boxes *as written*
  (in the profile's frame, relative to the image the call names), their labels, and the image selector the syntax
  has (`source`, `target_image`, `img_idx`, or OpenThinkIMG's ``image``) normalised into ``image_index``.
* A call that is there but wrong (malformed JSON, missing key, wrong arity, a non-number, x1 <= x0, a normalised
  value out of range, an unknown tool, too many calls or boxes) raises `ZoomCallError`. Its message quotes the
  offending text and shows the accepted form, so it can go back to the model as the tool's error turn.
* Reasoning is not a call: a ``<think>...</think>`` block (and a turn's leading text up to a ``</think>`` whose
  ``<think>`` was in the prompt) is masked before parsing, so a model that *mentions* ``<tool_call>`` while
  thinking does not swallow the real call after it. Spans still index the original text.
* A wrapper left open at the very end of the text is read as if closed: servers often cut the stop string
  (``</tool_call>``, ``</grounding>``) off the output.
* `ZoomCall.pixel_boxes` converts to original pixels (`frames.to_original`; `RESIZED_PX` profiles compute the
  resized size with the budget the model was run at) and clamps with the profile's minimum side and aspect cap
  (`frames.clamp_box`); a box entirely outside the image raises `ZoomCallError` naming the image size (it would
  otherwise clamp to a corner crop nobody asked for). What to do with the crop afterwards (the per-model box
  enlargement, padding, upscaling, the return turn) is described by the profile and done by the tool loop.

Sources were read at the commits of peers.md §10 (the repository files named in each profile's ``source``); the
system prompts are referenced there, not copied.
"""

from __future__ import annotations

import ast
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from .frames import QWEN_MAX_ASPECT, Box, BoxOutsideImage, Frame, PixelBox, check_inside, clamp_box, to_original
from .frames import resized_wh as _resized_wh

__all__ = [
    "PROFILES",
    "CallForm",
    "CropReturn",
    "FunctionCall",
    "ModelProfile",
    "ZoomCall",
    "ZoomCallError",
    "accepted_forms",
    "get_profile",
    "parse_function_calls",
    "parse_zoom_calls",
]


class CallForm(StrEnum):
    """One textual shape of a zoom call; a profile accepts one or more."""

    # <tool_call>{"name": NAME, "arguments": {...}}</tool_call>  (Hermes/Nous, Qwen's chat template)
    HERMES = "hermes"
    # {"function": "zoom_in", "bbox_2d": [...], "label": ...} in <tool_call> or a ```json fence  (DeepEyes V3/V4)
    ZOOM_IN_FUNCTION = "zoom_in_function"
    # <tool_call>{"bbox_2d": [...]}</tool_call>  (Chain-of-Focus teaser)
    BARE_BBOX = "bare_bbox"
    # <grounding>{"bbox_2d": [...], "source": "original_image"}</grounding>  (Mini-o3)
    GROUNDING = "grounding"
    # <answer>[{"bbox_2d": [...], "label": ...}, ...]</answer>  (Active-o3)
    ANSWER_LIST = "answer_list"
    # {"thought": ..., "actions": [{"name": "Crop", "arguments": {"image": "img_1", "param": "[...]"}}]}
    ACTIONS = "actions"


class CropReturn(StrEnum):
    """How the crop goes back to the model (details in `ModelProfile.crop_turn`)."""

    USER_TOOL_RESPONSE = "user_tool_response"  # new user turn: <tool_response> image(s) </tool_response> + prompt
    USER_IMAGE = "user_image"  # new user turn: the image and a fixed prompt, no tool tags
    USER_OBSERVATION = "user_observation"  # new user turn naming the crop "Observation i"
    TOOL_RESULT = "tool_result"  # the framework's tool/function result message carrying the image
    SEPARATE_PASS = "separate_pass"  # no conversation turn: each crop is answered in its own forward pass
    TOOL_SERVICE = "tool_service"  # a tool-server reply with the crop as base64 (`edited_image`)


@dataclass(frozen=True)
class ModelProfile:
    """Everything the tool loop needs to speak one model's zoom protocol."""

    name: str
    model: str  # the released model(s) and backbone
    forms: frozenset[CallForm]
    tool_name: str | None  # function name in HERMES / ACTIONS forms
    frame: Frame
    min_side: int  # px; 28 on Qwen2/2.5-VL, 32 on Qwen3-VL (peers.md §3 (3))
    max_aspect: float
    accepted_form: str  # shown in every error message
    crop_return: CropReturn
    crop_turn: str  # the return turn, in words and tags
    crop_processing: str  # what the peer does to the box/crop before returning it
    source: str  # repository@commit:path read for this profile
    system_prompt_ref: str  # where the exact prompt lives, and what it says (paraphrase)
    image_arg: str | None = None  # the argument selecting the image: source / target_image / img_idx / image
    image_index_counts_tool_images: bool = True  # False: indexes count user images only (Qwen3-VL img_idx)
    max_calls_per_turn: int | None = 1  # None: no limit
    max_boxes_per_call: int = 1
    stop: tuple[str, ...] = ()
    max_turns: int | None = None  # assistant turns per episode in the peer's own loop; None: not fixed there
    resize_factor: int = 28  # patch factor of the processor the model ran with
    resize_min_pixels: int | None = None  # pixel budget that defines the resized frame (RESIZED_PX profiles)
    resize_max_pixels: int | None = None
    notes: str = ""

    def resized_wh(self, image_wh: tuple[int, int]) -> tuple[int, int]:
        """The size the processor resized ``image_wh`` to for this model (defines `Frame.RESIZED_PX`)."""
        if self.resize_min_pixels is None or self.resize_max_pixels is None:
            raise ValueError(f"profile {self.name!r} has no pixel budget; pass resized_wh explicitly")
        return _resized_wh(
            image_wh, factor=self.resize_factor, min_pixels=self.resize_min_pixels, max_pixels=self.resize_max_pixels
        )


class ZoomCallError(ValueError):
    """A zoom call that is present but unusable. ``str(err)`` is meant to be shown to the model."""

    def __init__(self, problem: str, snippet: str, profile: ModelProfile) -> None:
        self.problem = problem
        self.snippet = snippet
        self.profile = profile.name
        self.accepted_form = profile.accepted_form
        quoted = snippet if len(snippet) <= 300 else snippet[:297] + "..."
        super().__init__(
            f"{problem}\n"
            f"  in: {quoted}\n"
            f"  accepted form ({profile.name}, coordinates in {profile.frame.description}): {profile.accepted_form}"
        )


@dataclass(frozen=True)
class ZoomCall:
    """One zoom call as the model wrote it."""

    raw: str  # the exact text matched, wrapper included
    span: tuple[int, int]  # [start, end) of `raw` in the parsed text
    profile: str
    tool: str  # the function name, or the wrapper for tag syntaxes ("grounding", "answer")
    frame: Frame  # the profile's frame
    boxes: tuple[Box, ...]  # as written, in `frame`, relative to the image the call names
    labels: tuple[str | None, ...]  # one per box
    image_index: int = 0  # 0-based; 0 = the original image (see ModelProfile.image_index_counts_tool_images)
    source: str | None = None  # Mini-o3 "original_image" / "observation_i"; OpenThinkIMG "img_k"
    target_image: int | None = None  # Pixel-Reasoner, 1-based
    img_idx: int | None = None  # Qwen3-VL / Qwen-Agent, 0-based over user images
    action: str = "crop"  # "crop", or "resize" (VisionThink: the whole image at `scale`)
    scale: float | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)  # other arguments, untouched

    def __post_init__(self) -> None:
        if len(self.labels) != len(self.boxes):
            raise ValueError("ZoomCall needs one label (or None) per box")

    @property
    def label(self) -> str | None:
        """The first box's label (most syntaxes have one box)."""
        return self.labels[0] if self.labels else None

    @property
    def model_profile(self) -> ModelProfile:
        return PROFILES[self.profile]

    def original_boxes(self, image_wh: tuple[int, int], resized_wh: tuple[int, int] | None = None) -> tuple[Box, ...]:
        """The boxes in float pixels of the image the call names (size ``image_wh``), unclamped."""
        if self.frame is Frame.RESIZED_PX and resized_wh is None:
            resized_wh = self.model_profile.resized_wh(image_wh)
        return tuple(to_original(b, self.frame, image_wh, resized_wh) for b in self.boxes)

    def pixel_boxes(self, image_wh: tuple[int, int], resized_wh: tuple[int, int] | None = None) -> tuple[PixelBox, ...]:
        """`original_boxes`, clamped to croppable integer boxes with the profile's minimum side and aspect cap.

        A box with no pixel inside the image raises `ZoomCallError` naming the image size (shown to the model)."""
        p = self.model_profile
        boxes = self.original_boxes(image_wh, resized_wh)
        for written, b in zip(self.boxes, boxes, strict=True):
            try:
                check_inside(b, image_wh, shown=f"{list(written)} ({self.frame.description})")
            except BoxOutsideImage as err:
                raise ZoomCallError(str(err), self.raw, p) from None
        return tuple(clamp_box(b, image_wh, min_side=p.min_side, max_aspect=p.max_aspect) for b in boxes)


# ---------------------------------------------------------------------------------------------------------------
# Profiles

_DE_FORM = (
    '<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [x0, y0, x1, y1], "label": "object"}}'
    '</tool_call> (or {"function": "zoom_in", "bbox_2d": [x0, y0, x1, y1], "label": "object"} in <tool_call> '
    "or a ```json block)"
)

PROFILES: dict[str, ModelProfile] = {
    p.name: p
    for p in (
        ModelProfile(
            name="deepeyes",
            model="DeepEyes-7B (Qwen2.5-VL-7B)",
            forms=frozenset({CallForm.HERMES, CallForm.ZOOM_IN_FUNCTION}),
            tool_name="image_zoom_in_tool",
            frame=Frame.ORIGINAL_PX,
            min_side=28,
            max_aspect=100.0,
            accepted_form=_DE_FORM,
            crop_return=CropReturn.USER_TOOL_RESPONSE,
            crop_turn=(
                "new user turn: <tool_response>, one image per call, the turn prompt (think, then call again or "
                "answer in <answer>), </tool_response>"
            ),
            crop_processing="crop the original image; the eval smart-resizes the crop (factor 28) before sending",
            source=(
                "Visual-Agent/DeepEyes@6c5e796:verl/workers/agent/envs/mm_process_engine/visual_toolbox_v2.py, "
                "…/prompt.py, eval/eval_vstar.py"
            ),
            system_prompt_ref=(
                "eval/eval_vstar.py and prompt.py SYSTEM_PROMPT_V5: Hermes tool block declaring image_zoom_in_tool "
                "(bbox_2d, optional label), one or more <tool_call> per turn, with a two-call example"
            ),
            max_calls_per_turn=None,
            stop=("</tool_call>",),
            max_turns=11,
            notes=(
                "Several calls per turn are allowed by prompt V5 (the eval executes the first). The trainer rejects "
                "sides <= 30 px and aspect > 100; we grow to 28 px instead. '</tool_call>' as a stop string is the "
                "users' fix for endless calls (DeepEyes #60); the official eval stops at <|im_end|> and allows 11 "
                "generations."
            ),
        ),
        ModelProfile(
            name="chain-of-focus",
            model="Chain-of-Focus / Adaptive-CoF (Qwen2.5-VL-7B)",
            forms=frozenset({CallForm.HERMES, CallForm.BARE_BBOX}),
            tool_name="image_zoom_in_tool",
            frame=Frame.RESIZED_PX,
            min_side=28,
            max_aspect=QWEN_MAX_ASPECT,
            accepted_form=(
                '<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [x0, y0, x1, y1], '
                '"label": "object"}}</tool_call> (or <tool_call>{"bbox_2d": [x0, y0, x1, y1]}</tool_call>)'
            ),
            crop_return=CropReturn.USER_IMAGE,
            crop_turn="new user turn: the crop image, then the same user prompt as the first turn",
            crop_processing="box enlarged 1.5x about its centre, crop upscaled 2x, then smart-resized (factor 28)",
            source="xtong-zhang/Chain-of-Focus@431ff0d:eval/vstar/vllm_inference.py",
            system_prompt_ref=(
                "vllm_inference.py SYSTEM_PROMPT: Hermes tool block declaring image_zoom_in_tool (bbox_2d, optional "
                "label); USER_PROMPT asks for <think>, then <tool_call>(s) or <answer>"
            ),
            max_calls_per_turn=None,
            max_turns=6,
            resize_min_pixels=112 * 112,
            resize_max_pixels=3840 * 3840,
            notes="Boxes are pixels of the image smart-resized to <= 3840^2 px (min 112^2), the image the model saw.",
        ),
        ModelProfile(
            name="mini-o3",
            model="Mini-o3-7B (Qwen2.5-VL-7B), released recipe (use_relative_coordinates=True)",
            forms=frozenset({CallForm.GROUNDING}),
            tool_name=None,
            frame=Frame.UNIT,
            min_side=28,
            max_aspect=QWEN_MAX_ASPECT,
            accepted_form=(
                '<grounding>{"bbox_2d": [x0, y0, x1, y1], "source": "original_image"}</grounding> '
                '(source: "original_image" or "observation_i")'
            ),
            crop_return=CropReturn.USER_OBSERVATION,
            crop_turn=(
                "new user turn: after Action i, the zoom-in image as 'Observation i', then a prompt to keep "
                "reasoning in <think> and zoom again with <grounding> or answer in <answer>"
            ),
            crop_processing="crop of the source image upsampled up to 4x (bounded by the input size), min 28 px",
            source=(
                "Mini-o3/Mini-o3@8654dbf:verl/trainer/constants.py, verl/workers/rollout/vllm_rollout/function_tools.py"
            ),
            system_prompt_ref=(
                "constants.py TOOL_CROP_SYSTEM_PROMPT: think in <think>, zoom with <grounding>{bbox_2d, source}"
                "</grounding> taking the image as 1.0 x 1.0, answer in <answer>; "
                "turns: TOOL_CALL_CROP_MULTI_TRUN_PROMPT"
            ),
            image_arg="source",
            stop=("</grounding>",),
            max_turns=12,
            notes=(
                "Boxes are relative to the `source` image (an observation is a crop). 6 turns in training, 12 at eval."
            ),
        ),
        ModelProfile(
            name="mini-o3-resized",
            model="Mini-o3 trained with use_relative_coordinates=False (the trainer's default)",
            forms=frozenset({CallForm.GROUNDING}),
            tool_name=None,
            frame=Frame.RESIZED_PX,
            min_side=28,
            max_aspect=QWEN_MAX_ASPECT,
            accepted_form=(
                '<grounding>{"bbox_2d": [x0, y0, x1, y1], "source": "original_image"}</grounding> '
                '(source: "original_image" or "observation_i")'
            ),
            crop_return=CropReturn.USER_OBSERVATION,
            crop_turn="as mini-o3",
            crop_processing="as mini-o3; the box is rescaled from the size the image was fed at",
            source="Mini-o3/Mini-o3@8654dbf:verl/workers/rollout/vllm_rollout/function_tools.py",
            system_prompt_ref="as mini-o3 (the prompt's 1.0 x 1.0 wording does not match this frame)",
            image_arg="source",
            stop=("</grounding>",),
            max_turns=12,
            resize_min_pixels=40000,
            resize_max_pixels=2000000,
            notes="Pixel budget from the demo command (data.min_pixels=40000, data.max_pixels=2000000).",
        ),
        ModelProfile(
            name="pixel-reasoner",
            model="Pixel-Reasoner (Qwen2.5-VL-7B)",
            forms=frozenset({CallForm.HERMES}),
            tool_name="crop_image_normalized",
            frame=Frame.UNIT,
            min_side=28,
            max_aspect=QWEN_MAX_ASPECT,
            accepted_form=(
                '<tool_call>{"name": "crop_image_normalized", "arguments": {"bbox_2d": [x0, y0, x1, y1], '
                '"target_image": 1}}</tool_call> (target_image: 1 = the original image)'
            ),
            crop_return=CropReturn.USER_IMAGE,
            crop_turn="new user turn: 'Here is the cropped image (Image Size: WxH):' and the crop",
            crop_processing="0.1 (of the image size) added on every side, clipped; crop resized to the pixel budget",
            source="TIGER-AI-Lab/Pixel-Reasoner@a3a6c3a:curiosity_driven_rl/openrlhf/trainer/ppo_utils/experience_maker.py",
            system_prompt_ref=(
                "Qwen-Agent Nous function-calling template with crop_image_normalized (bbox_2d in [0, 1], "
                "target_image 1-based) and select_frames; without it the model never crops (Pixel-Reasoner #14)"
            ),
            image_arg="target_image",
            stop=("<|im_end|>",),
            notes=(
                "The peer treats a box with any value >= 1 as pixels; we do not guess and refuse it instead. "
                "Only the last call of a turn is executed there; we accept one."
            ),
        ),
        ModelProfile(
            name="qwen3-vl",
            model="Qwen3-VL with Qwen-Agent's image_zoom_in_tool",
            forms=frozenset({CallForm.HERMES}),
            tool_name="image_zoom_in_tool",
            frame=Frame.PERMILLE,
            min_side=32,
            max_aspect=QWEN_MAX_ASPECT,
            accepted_form=(
                '<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [x0, y0, x1, y1], '
                '"label": "object", "img_idx": 0}}</tool_call> (img_idx: 0-based over the user\'s images)'
            ),
            crop_return=CropReturn.TOOL_RESULT,
            crop_turn=(
                "the tool result carries the crop image (Qwen's template renders it as <tool_response> in a user "
                "turn); over vLLM send it as a user message, tool messages cannot hold images"
            ),
            crop_processing="crop grown to >= 32 px, smart-resized with factor 32 and min 256*32*32 px",
            source="QwenLM/Qwen-Agent:qwen_agent/tools/image_zoom_in_qwen3vl.py",
            system_prompt_ref=(
                "Qwen-Agent qwen_agent/llm/fncall_prompts/nous_fncall_prompt.py renders the tool's JSON schema "
                "(bbox_2d, label, img_idx, all required) into Qwen3-VL's tool block"
            ),
            image_arg="img_idx",
            image_index_counts_tool_images=False,
            max_calls_per_turn=None,
            resize_factor=32,
            notes=(
                "img_idx counts user images only, so consecutive zooms tighten boxes on the original (Qwen3-VL #1667)."
            ),
        ),
        ModelProfile(
            name="active-o3",
            model="Active-o3 (Qwen2.5-VL)",
            forms=frozenset({CallForm.ANSWER_LIST}),
            tool_name=None,
            frame=Frame.RESIZED_PX,
            min_side=28,
            max_aspect=QWEN_MAX_ASPECT,
            accepted_form=(
                '<answer>[{"bbox_2d": [x0, y0, x1, y1], "label": "region"}, ...]</answer> (at most 3 regions)'
            ),
            crop_return=CropReturn.SEPARATE_PASS,
            crop_turn="none: each crop goes to its own grounding/answer pass and boxes are mapped back",
            crop_processing=(
                "boxes scaled from the processor input (grid * 14) to the image; inputs under 1024 px upscaled first"
            ),
            source="aim-uofa/Active-o3@7219a37:demo/activeo3_demo_vstar.py",
            system_prompt_ref=(
                "activeo3_demo_vstar.py QUESTION_TEMPLATE: find up to three distinct regions that help answer the "
                "question, reason in <think>, list them as JSON in <answer>"
            ),
            max_boxes_per_call=3,
            max_turns=1,
            resize_min_pixels=56 * 56,
            resize_max_pixels=12845056,
            notes="Pixel budget: the stock Qwen2.5-VL processor (min 3136, max 12845056 px).",
        ),
        ModelProfile(
            name="openthinkimg",
            model="OpenThinkIMG / V-ToolRL (Qwen2-VL-2B/7B)",
            forms=frozenset({CallForm.ACTIONS}),
            tool_name="Crop",
            frame=Frame.ORIGINAL_PX,
            min_side=28,
            max_aspect=QWEN_MAX_ASPECT,
            accepted_form=(
                '{"thought": "...", "actions": [{"name": "Crop", "arguments": {"image": "img_1", '
                '"param": "[x1, y1, x2, y2]"}}]} (integer pixels)'
            ),
            crop_return=CropReturn.TOOL_SERVICE,
            crop_turn="the Crop worker replies {'text': ..., 'edited_image': base64}; the crop becomes the next img_k",
            crop_processing="plain crop of integer pixels",
            source=(
                "OpenThinkIMG/OpenThinkIMG@765c903:tool_server/tool_workers/online_workers/crop_worker.py, "
                "tool_server/tf_eval/utils/prompts.py"
            ),
            system_prompt_ref=(
                "prompts.py policy_model_system_prompt: strict JSON {thought, actions[{name, arguments}]}, one action "
                "at a time, Terminate to answer; the Crop tool line is from peers.md §3 (not in the file we read)"
            ),
            image_arg="image",
            notes="Only Crop actions are zoom calls; other actions (OCR, Point, Terminate, ...) are left to the loop.",
        ),
        ModelProfile(
            name="visionthink",
            model="VisionThink (Qwen2.5-VL-7B)",
            forms=frozenset({CallForm.HERMES}),
            tool_name="resize_image",
            frame=Frame.UNIT,
            min_side=28,
            max_aspect=QWEN_MAX_ASPECT,
            accepted_form='<tool_call>{"name": "resize_image", "arguments": {"action": "resize"}}</tool_call>',
            crop_return=CropReturn.USER_TOOL_RESPONSE,
            crop_turn=(
                "new user turn: <tool_response>, 'The resized image is shown below:', the image, </tool_response>, "
                "then a prompt to reason in <think> and answer in <answer>"
            ),
            crop_processing="no crop: the whole image at 2x resolution",
            source="dvlab-research/VisionThink@42afd8c:scripts/vllm_tool.py",
            system_prompt_ref=(
                "vllm_tool.py TOOL_CALL_SYSTEM_PROMPT: Hermes tool block declaring resize_image(action: 'resize'), "
                "one function call per step"
            ),
            notes="The call is represented as the box [0, 0, 1, 1] in frame unit with action 'resize', scale 2.",
        ),
    )
}


def get_profile(profile: str | ModelProfile) -> ModelProfile:
    if isinstance(profile, ModelProfile):
        return profile
    try:
        return PROFILES[profile]
    except KeyError:
        raise ValueError(f"unknown zoom profile {profile!r}; known: {', '.join(sorted(PROFILES))}") from None


# ---------------------------------------------------------------------------------------------------------------
# Parsing


@dataclass(frozen=True)
class _Block:
    start: int
    end: int
    body: str

    def raw(self, text: str) -> str:
        return text[self.start : self.end]


def _tagged_blocks(text: str, open_tag: str, close_tag: str) -> list[_Block]:
    """Every ``open ... close`` block; a block still open at the end of the text runs to the end."""
    blocks = []
    pos = 0
    while (start := text.find(open_tag, pos)) != -1:
        body_start = start + len(open_tag)
        end = text.find(close_tag, body_start)
        if end == -1:
            blocks.append(_Block(start, len(text), text[body_start:]))
            break
        blocks.append(_Block(start, end + len(close_tag), text[body_start:end]))
        pos = end + len(close_tag)
    return blocks


_FENCE = re.compile(r"```json\s*(.*?)```", re.DOTALL)
_INNER_FENCE = re.compile(r"^\s*```(?:json)?\s*(.*?)\s*```\s*$", re.DOTALL)


def _load(body: str, raw: str, p: ModelProfile) -> Any:
    """JSON, else a Python literal (some peers eval() the call, so models emit single quotes)."""
    s = body.strip()
    if m := _INNER_FENCE.match(s):
        s = m.group(1)
    if not s:
        raise ZoomCallError("empty call", raw, p)
    try:
        return json.loads(s)
    except json.JSONDecodeError as exc:
        try:
            value = ast.literal_eval(s)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            raise ZoomCallError(f"malformed JSON ({exc.msg} at char {exc.pos})", raw, p) from None
        if isinstance(value, dict | list):
            return value
        raise ZoomCallError(f"malformed JSON ({exc.msg} at char {exc.pos})", raw, p) from None


def _number(v: Any, what: str, raw: str, p: ModelProfile) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ZoomCallError(f"{what}: {json.dumps(v)} is not a number", raw, p)
    f = float(v)
    if not math.isfinite(f):
        raise ZoomCallError(f"{what}: {v} is not a finite number", raw, p)
    return f


def _box(value: Any, key: str, raw: str, p: ModelProfile) -> Box:
    if not isinstance(value, list):
        raise ZoomCallError(f"{key} must be a list [x0, y0, x1, y1], got {json.dumps(value)}", raw, p)
    if len(value) != 4:
        raise ZoomCallError(
            f"{key} must have 4 numbers [x0, y0, x1, y1] (wrong arity: {len(value)}): {json.dumps(value)}", raw, p
        )
    x0, y0, x1, y1 = (_number(v, key, raw, p) for v in value)
    if not x1 > x0:
        raise ZoomCallError(f"{key}: x1 ({x1:g}) must be greater than x0 ({x0:g})", raw, p)
    if not y1 > y0:
        raise ZoomCallError(f"{key}: y1 ({y1:g}) must be greater than y0 ({y0:g})", raw, p)
    rng = p.frame.value_range
    if rng is not None and not all(rng[0] <= v <= rng[1] for v in (x0, y0, x1, y1)):
        raise ZoomCallError(
            f"{key}: {json.dumps(value)} is outside [{rng[0]:g}, {rng[1]:g}]; this model's coordinates are "
            f"{p.frame.description}",
            raw,
            p,
        )
    return (x0, y0, x1, y1)


def _label(args: dict[str, Any], raw: str, p: ModelProfile) -> str | None:
    label = args.get("label")
    if label is None or isinstance(label, str):
        return label
    raise ZoomCallError(f"label must be a string, got {json.dumps(label)}", raw, p)


def _index(v: Any, key: str, lowest: int, raw: str, p: ModelProfile) -> int:
    # Tool schemas declare these as "number", so 0.0 is legal; 0.5 or "0" is not.
    if isinstance(v, bool) or not isinstance(v, int | float) or not float(v).is_integer() or v < lowest:
        raise ZoomCallError(f"{key} must be an integer >= {lowest}, got {json.dumps(v)}", raw, p)
    return int(v)


def _require(args: dict[str, Any], key: str, raw: str, p: ModelProfile) -> Any:
    if key not in args:
        raise ZoomCallError(f"missing key '{key}'", raw, p)
    return args[key]


def _call(
    block: _Block, text: str, p: ModelProfile, tool: str, boxes: list[Box], labels: list[str | None], **kw: Any
) -> ZoomCall:
    return ZoomCall(
        raw=block.raw(text),
        span=(block.start, block.end),
        profile=p.name,
        tool=tool,
        frame=p.frame,
        boxes=tuple(boxes),
        labels=tuple(labels),
        **kw,
    )


_KNOWN_ARGS = {"bbox_2d", "label", "img_idx", "target_image", "source", "function", "action"}


def _from_arguments(block: _Block, text: str, p: ModelProfile, name: str, args: Any) -> ZoomCall:
    """A named call (HERMES): check the arguments of ``name`` for profile ``p``."""
    raw = block.raw(text)
    if not isinstance(args, dict):
        raise ZoomCallError(f"arguments must be a JSON object, got {json.dumps(args)}", raw, p)
    extra = {k: v for k, v in args.items() if k not in _KNOWN_ARGS}
    if name == "resize_image":
        action = _require(args, "action", raw, p)
        if action != "resize":
            raise ZoomCallError(f'unknown action {json.dumps(action)}; the only action is "resize"', raw, p)
        return _call(block, text, p, name, [(0.0, 0.0, 1.0, 1.0)], [None], action="resize", scale=2.0, extra=extra)
    box = _box(_require(args, "bbox_2d", raw, p), "bbox_2d", raw, p)
    kw: dict[str, Any] = {}
    if p.image_arg == "img_idx":
        kw["img_idx"] = kw["image_index"] = _index(_require(args, "img_idx", raw, p), "img_idx", 0, raw, p)
    elif p.image_arg == "target_image":
        kw["target_image"] = _index(_require(args, "target_image", raw, p), "target_image", 1, raw, p)
        kw["image_index"] = kw["target_image"] - 1
    return _call(block, text, p, name, [box], [_label(args, raw, p)], extra=extra, **kw)


def _parse_tool_call_block(block: _Block, text: str, p: ModelProfile) -> ZoomCall:
    raw = block.raw(text)
    obj = _load(block.body, raw, p)
    if not isinstance(obj, dict):
        raise ZoomCallError(f"a tool call must be a JSON object, got {type(obj).__name__}", raw, p)
    if "name" in obj and CallForm.HERMES in p.forms:
        name = obj["name"]
        if name != p.tool_name:
            raise ZoomCallError(f"unknown tool {json.dumps(name)}; this model's zoom tool is '{p.tool_name}'", raw, p)
        args = _require(obj, "arguments", raw, p)
        if isinstance(args, str):  # OpenAI-style: arguments as a JSON string
            args = _load(args, raw, p)
        return _from_arguments(block, text, p, name, args)
    if "function" in obj and CallForm.ZOOM_IN_FUNCTION in p.forms:
        return _zoom_in_function(block, text, p, obj)
    if "bbox_2d" in obj and "name" not in obj and CallForm.BARE_BBOX in p.forms:
        box = _box(obj["bbox_2d"], "bbox_2d", raw, p)
        return _call(block, text, p, "bbox_2d", [box], [_label(obj, raw, p)])
    missing = "name" if CallForm.HERMES in p.forms else "function"
    raise ZoomCallError(f"missing key '{missing}'", raw, p)


def _zoom_in_function(block: _Block, text: str, p: ModelProfile, obj: dict[str, Any]) -> ZoomCall:
    raw = block.raw(text)
    if obj.get("function") != "zoom_in":
        raise ZoomCallError(f'unknown function {json.dumps(obj.get("function"))}; the function is "zoom_in"', raw, p)
    box = _box(_require(obj, "bbox_2d", raw, p), "bbox_2d", raw, p)
    return _call(block, text, p, "zoom_in", [box], [_label(obj, raw, p)])


def _parse_hermes(text: str, p: ModelProfile) -> list[ZoomCall]:
    return [_parse_tool_call_block(b, text, p) for b in _tagged_blocks(text, "<tool_call>", "</tool_call>")]


def _parse_json_fences(text: str, p: ModelProfile) -> list[ZoomCall]:
    """DeepEyes V3: ```json {"function": "zoom_in", ...} ```; other JSON fences are not calls."""
    calls = []
    for m in _FENCE.finditer(text):
        block = _Block(m.start(), m.end(), m.group(1))
        if '"function"' not in block.body and "'function'" not in block.body:
            continue
        obj = _load(block.body, block.raw(text), p)
        for item in obj if isinstance(obj, list) else [obj]:
            if not isinstance(item, dict):
                raise ZoomCallError(f"a zoom_in call must be a JSON object, got {json.dumps(item)}", block.raw(text), p)
            calls.append(_zoom_in_function(block, text, p, item))
    return calls


_OBSERVATION = re.compile(r"observation_(\d+)")


def _parse_grounding(text: str, p: ModelProfile) -> list[ZoomCall]:
    calls = []
    for block in _tagged_blocks(text, "<grounding>", "</grounding>"):
        raw = block.raw(text)
        obj = _load(block.body, raw, p)
        if not isinstance(obj, dict):
            raise ZoomCallError(f"a grounding must be a JSON object, got {type(obj).__name__}", raw, p)
        box = _box(_require(obj, "bbox_2d", raw, p), "bbox_2d", raw, p)
        source = _require(obj, "source", raw, p)
        if source == "original_image":
            index = 0
        elif isinstance(source, str) and (m := _OBSERVATION.fullmatch(source)):
            index = int(m.group(1))
            if index < 1:
                raise ZoomCallError(f"source {json.dumps(source)}: observations are numbered from 1", raw, p)
        else:
            raise ZoomCallError(f'source must be "original_image" or "observation_i", got {json.dumps(source)}', raw, p)
        calls.append(_call(block, text, p, "grounding", [box], [_label(obj, raw, p)], image_index=index, source=source))
    return calls


def _parse_answer_list(text: str, p: ModelProfile) -> list[ZoomCall]:
    blocks = _tagged_blocks(text, "<answer>", "</answer>")
    if not blocks:
        return []
    if len(blocks) > 1:
        raise ZoomCallError("more than one <answer> block", blocks[1].raw(text), p)
    block = blocks[0]
    raw = block.raw(text)
    obj = _load(block.body, raw, p)
    items = obj if isinstance(obj, list) else [obj]
    if len(items) > p.max_boxes_per_call:
        raise ZoomCallError(f"{len(items)} regions; at most {p.max_boxes_per_call} are allowed", raw, p)
    boxes, labels = [], []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ZoomCallError(f"region {i + 1} must be a JSON object, got {json.dumps(item)}", raw, p)
        boxes.append(_box(_require(item, "bbox_2d", raw, p), f"region {i + 1} bbox_2d", raw, p))
        labels.append(_label(item, raw, p))
    return [_call(block, text, p, "answer", boxes, labels)] if boxes else []


_PARAM = re.compile(r"^\s*\[\s*(-?\d+)\s*,\s*(-?\d+)\s*,\s*(-?\d+)\s*,\s*(-?\d+)\s*\]\s*$")
_IMG_REF = re.compile(r"img_(\d+)")


def _json_objects_with(text: str, key: str) -> list[tuple[int, int, Any]]:
    """Top-level JSON objects in free text that have ``key`` (via raw_decode from every '{')."""
    decoder = json.JSONDecoder()
    found = []
    pos = 0
    while (start := text.find("{", pos)) != -1:
        try:
            obj, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            pos = start + 1
            continue
        if isinstance(obj, dict) and key in obj:
            found.append((start, end, obj))
            pos = end
        else:
            pos = start + 1
    return found


def _parse_actions(text: str, p: ModelProfile) -> list[ZoomCall]:
    objects = _json_objects_with(text, "actions")
    if not objects:
        if '"actions"' in text:
            raise ZoomCallError('malformed JSON around "actions"', text.strip(), p)
        return []
    calls = []
    for start, end, obj in objects:
        block = _Block(start, end, text[start:end])
        raw = block.raw(text)
        actions = obj["actions"]
        if not isinstance(actions, list):
            raise ZoomCallError(f"actions must be a list, got {json.dumps(actions)}", raw, p)
        for action in actions:
            if not isinstance(action, dict) or action.get("name") != p.tool_name:
                continue
            args = _require(action, "arguments", raw, p)
            if not isinstance(args, dict):
                raise ZoomCallError(f"arguments must be a JSON object, got {json.dumps(args)}", raw, p)
            image = _require(args, "image", raw, p)
            ref = _IMG_REF.fullmatch(image) if isinstance(image, str) else None
            if ref is None or int(ref.group(1)) < 1:
                raise ZoomCallError(f'image must name an image as "img_k" (k >= 1), got {json.dumps(image)}', raw, p)
            param = _require(args, "param", raw, p)
            if isinstance(param, str):
                pm = _PARAM.match(param)
                if pm is None:
                    raise ZoomCallError(
                        f'param must be a string of 4 integers "[x1, y1, x2, y2]", got {json.dumps(param)}', raw, p
                    )
                coords: Any = [int(g) for g in pm.groups()]
            else:
                coords = param
                if isinstance(coords, list) and any(isinstance(v, float) for v in coords):
                    raise ZoomCallError(f"param must hold integers, got {json.dumps(coords)}", raw, p)
            box = _box(coords, "param", raw, p)
            index = int(ref.group(1)) - 1
            calls.append(_call(block, text, p, p.tool_name or "Crop", [box], [None], image_index=index, source=image))
    return calls


_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"


def _mask_thinking(text: str) -> str:
    """``text`` with every closed ``<think>`` block (and text before a leading unopened ``</think>``) blanked out,
    length kept, so that spans and raw snippets of the calls outside still index the original text."""
    spans: list[tuple[int, int]] = []
    first_close, first_open = text.find(_THINK_CLOSE), text.find(_THINK_OPEN)
    pos = 0
    if first_close != -1 and (first_open == -1 or first_close < first_open):
        # The chat template opened <think> in the prompt: the turn starts inside the reasoning.
        pos = first_close + len(_THINK_CLOSE)
        spans.append((0, pos))
    while (start := text.find(_THINK_OPEN, pos)) != -1:
        end = text.find(_THINK_CLOSE, start)
        if end == -1:
            break  # unclosed: not masked (a call after a forgotten </think> is still a call)
        pos = end + len(_THINK_CLOSE)
        spans.append((start, pos))
    if not spans:
        return text
    out, last = [], 0
    for a, b in spans:
        out += [text[last:a], " " * (b - a)]
        last = b
    out.append(text[last:])
    return "".join(out)


def parse_zoom_calls(text: str, profile: str | ModelProfile) -> list[ZoomCall]:
    """The zoom calls in one model turn ``text``, read with ``profile``'s syntax; raises `ZoomCallError`."""
    p = get_profile(profile)
    text = _mask_thinking(text)
    calls: list[ZoomCall] = []
    if p.forms & {CallForm.HERMES, CallForm.ZOOM_IN_FUNCTION, CallForm.BARE_BBOX}:
        calls += _parse_hermes(text, p)
    if CallForm.ZOOM_IN_FUNCTION in p.forms:
        # A fence inside a <tool_call> was already read with that call.
        taken = [c.span for c in calls]
        calls += [
            c for c in _parse_json_fences(text, p) if not any(a <= c.span[0] and c.span[1] <= b for a, b in taken)
        ]
    if CallForm.GROUNDING in p.forms:
        calls += _parse_grounding(text, p)
    if CallForm.ANSWER_LIST in p.forms:
        calls += _parse_answer_list(text, p)
    if CallForm.ACTIONS in p.forms:
        calls += _parse_actions(text, p)
    calls.sort(key=lambda c: c.span[0])
    if p.max_calls_per_turn is not None and len(calls) > p.max_calls_per_turn:
        extra = calls[p.max_calls_per_turn]
        raise ZoomCallError(
            f"{len(calls)} zoom calls in one turn; this model makes at most {p.max_calls_per_turn} per turn",
            extra.raw,
            p,
        )
    return calls


@dataclass(frozen=True)
class FunctionCall:
    """A Hermes call of any function (the client tools of an OpenAI-style request), as the model wrote it."""

    name: str
    arguments: dict[str, Any]
    raw: str  # the whole <tool_call>...</tool_call> text
    span: tuple[int, int]


def parse_function_calls(text: str, names: Sequence[str]) -> list[FunctionCall]:
    """The ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` calls in ``text`` of the functions in
    ``names``, in order (Qwen2.5/Qwen3 chat templates' tool syntax). A block that is not such a call (malformed JSON,
    no name, an undeclared function, arguments not an object) is not a call: it stays part of the text, as
    OpenAI-compatible servers leave what they cannot parse in the message content."""
    calls = []
    for block in _tagged_blocks(text, "<tool_call>", "</tool_call>"):
        try:  # the profile only words the error, which is dropped here
            obj = _load(block.body, block.raw(text), PROFILES["qwen3-vl"])
        except ZoomCallError:
            continue
        if not isinstance(obj, dict) or obj.get("name") not in names:
            continue
        args = obj.get("arguments", {})
        if isinstance(args, str):  # some models write the arguments as a JSON string, as the OpenAI API sends them
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                continue
        if isinstance(args, dict):
            calls.append(FunctionCall(str(obj["name"]), args, block.raw(text), (block.start, block.end)))
    return calls


def accepted_forms() -> dict[str, str]:
    """Profile name -> the accepted call form (for help texts)."""
    return {name: p.accepted_form for name, p in PROFILES.items()}


def _check_profiles(profiles: Sequence[ModelProfile]) -> None:
    # Catch a mistyped profile at import rather than at the first call.
    for p in profiles:
        if p.frame is Frame.RESIZED_PX and (p.resize_min_pixels is None or p.resize_max_pixels is None):
            raise AssertionError(f"profile {p.name}: frame resized_px needs a pixel budget")
        if (CallForm.HERMES in p.forms or CallForm.ACTIONS in p.forms) and not p.tool_name:
            raise AssertionError(f"profile {p.name}: named-call forms need tool_name")


_check_profiles(list(PROFILES.values()))
