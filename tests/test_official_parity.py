"""qzoom against the official Q-Zoom implementation (YuHengsss/Q-Zoom @ f062af7, transformers 4.51.3), end to end.

`tests/fixtures/official_qzoom_tiny/` holds a tiny checkpoint written by the official model class in the released
(pre-4.52) key layout, the two image files, and what the official inference path computed on them the way lmms-eval
drives it, with its fast image processor (`AutoProcessor(..., use_fast=True)`, `Qwen2VLImageProcessorFast`;
`evals/official_reference.py` regenerates it): the pixel values of the global view and of the RoI crop, gate
probability, raw RoI logit map, grid and pixel boxes, the spliced ids and float M-RoPE positions, first-token logits
and greedy tokens. qzoom starts from the image FILE (its own `load_image` and preprocessing, nothing injected) and must
reproduce them: pixel values, ids, boxes, positions and tokens identical; gate p within 1e-5, RoI logits 1e-4,
first-token logits 1e-3 (measured on this machine: pixel values, ids, boxes, positions and tokens identical; gate p
|Δ| <= 2.4e-7, RoI logits <= 5.3e-6, first-token logits <= 2.4e-6).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qzoom.engine import QZoomEngine, SequenceState
from qzoom.images import load_image
from qzoom.schemas import AskOptions

FIXTURE = Path(__file__).parent / "fixtures" / "official_qzoom_tiny"
REFERENCE = json.loads((FIXTURE / "reference.json").read_text())
TENSORS = load_file(str(FIXTURE / "reference.safetensors"))
GATE_ATOL = 1e-5
ROI_LOGITS_ATOL = 1e-4
FIRST_TOKEN_ATOL = 1e-3


@pytest.fixture(scope="module")
def engine() -> QZoomEngine:
    return QZoomEngine.from_pretrained(FIXTURE / "checkpoint")


def start(engine: QZoomEngine, case: str) -> SequenceState:
    meta = REFERENCE["cases"][case]
    image = load_image(FIXTURE / meta["image"])
    opts = AskOptions(gate_thresh=meta["tau_gate"], roi_thresh=meta["tau_roi"], max_new_tokens=8)
    st = engine.new_state(image, meta["question_with_suffix"], opts)
    engine.prepare([st])
    engine.encode([st])
    engine.prefill([st])
    return st


def ref(case: str, name: str) -> torch.Tensor:
    return TENSORS[f"{case}.{name}"]


def assert_pixels(pixel_values: torch.Tensor, case: str, view: str) -> None:
    """The official pixel values, bit for bit: its first rows, and the row and column sums of the rest."""
    assert pixel_values.dtype == torch.float32
    assert torch.equal(pixel_values[:8], ref(case, f"{view}_pixel_values_head"))
    assert torch.equal(pixel_values.sum(dim=1), ref(case, f"{view}_pixel_values_rowsum"))
    assert torch.equal(pixel_values.sum(dim=0), ref(case, f"{view}_pixel_values_colsum"))


def test_fixture_is_in_the_released_key_layout():
    from qzoom.checkpoint import is_legacy_layout, weight_keys

    keys = weight_keys(FIXTURE / "checkpoint")
    assert is_legacy_layout(keys)
    assert any(k.startswith("model.twig_layers.") for k in keys) and any(k.startswith("visual.") for k in keys)


def test_fixture_was_made_with_the_fast_processor():
    assert REFERENCE["run"]["image_processor"].startswith("transformers Qwen2VLImageProcessorFast")
    assert all(case["lmms_pre_resize_is_identity"] for case in REFERENCE["cases"].values())


@pytest.mark.parametrize("case", ["a", "b"])
def test_prompt_pixels_and_positions_match(engine, case):
    st = start(engine, case)
    assert torch.equal(st.input_ids, ref(case, "input_ids"))
    assert torch.equal(st.grid_thw, ref(case, "image_grid_thw")[0])
    assert_pixels(st.pixel_values, case, "global")
    assert torch.equal(st.positions, ref(case, "prompt_position_ids"))


def test_fired_case_matches_gate_map_box_crop_splice_and_answer(engine, monkeypatch):
    st = start(engine, "a")
    meta = REFERENCE["cases"]["a"]

    (p,) = engine.gate([st])
    assert p == pytest.approx(float(ref("a", "gate_p")[0]), abs=GATE_ATOL)
    assert p >= st.gate_thresh

    (proposal,) = engine.propose([st])
    torch.testing.assert_close(proposal.logits, ref("a", "roi_logit_map"), atol=ROI_LOGITS_ATOL, rtol=0)
    (grid_box,) = proposal.grid_boxes
    assert grid_box.as_list() == ref("a", "roi_grid_box_xyxy").tolist() == meta["roi_grid_box_xyxy_end_exclusive"]
    (box,) = proposal.boxes
    assert box.as_list() == ref("a", "roi_pixel_box_xyxy").tolist()

    views: list[tuple[torch.Tensor, torch.Tensor]] = []
    preprocess = engine._preprocess

    def observed(image, min_pixels, max_pixels):
        out = preprocess(image, min_pixels, max_pixels)
        views.append(out)
        return out

    monkeypatch.setattr(engine, "_preprocess", observed)
    engine.zoom([st], [proposal])
    (crop_view,) = views  # the crop of the original image, through the same fast processor path
    assert torch.equal(crop_view[1], ref("a", "roi_image_grid_thw")[0])
    assert_pixels(crop_view[0], "a", "roi")
    assert st.blocks[1].grid_hw == (
        int(ref("a", "roi_image_grid_thw")[0, 1]) // 2,
        int(ref("a", "roi_image_grid_thw")[0, 2]) // 2,
    )
    assert st.blocks[0].end == meta["kv_reuse_prefix_len_P"]
    assert torch.equal(st.input_ids, ref("a", "spliced_input_ids"))
    assert torch.equal(st.positions, ref("a", "spliced_position_ids"))

    engine.finish([st])
    torch.testing.assert_close(st.next_logits, ref("a", "first_token_logits"), atol=FIRST_TOKEN_ATOL, rtol=0)
    engine.decode([st])
    assert st.answer_ids == ref("a", "generated_ids").tolist()


def test_closed_gate_matches_direct_answer(engine):
    st = start(engine, "b")
    (p,) = engine.gate([st])
    assert p == pytest.approx(float(ref("b", "gate_p")[0]), abs=GATE_ATOL)
    assert p < st.gate_thresh
    engine.finish([st])
    engine.decode([st])
    torch.testing.assert_close(st.next_logits, ref("b", "first_token_logits"), atol=FIRST_TOKEN_ATOL, rtol=0)
    assert st.answer_ids == ref("b", "generated_ids").tolist()


def test_fired_gate_without_cells_falls_back_to_direct_answer(engine):
    st = start(engine, "b_fallback")
    (p,) = engine.gate([st])
    assert p >= st.gate_thresh
    (proposal,) = engine.propose([st])
    torch.testing.assert_close(proposal.logits, ref("b_fallback", "roi_logit_map"), atol=ROI_LOGITS_ATOL, rtol=0)
    assert proposal.boxes == []
    engine.zoom([st], [proposal])
    engine.finish([st])
    engine.decode([st])
    assert len(st.blocks) == 1
    torch.testing.assert_close(st.next_logits, ref("b_fallback", "first_token_logits"), atol=FIRST_TOKEN_ATOL, rtol=0)
    assert st.answer_ids == ref("b_fallback", "generated_ids").tolist()
