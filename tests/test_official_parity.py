"""qzoom against the official Q-Zoom implementation (YuHengsss/Q-Zoom @ f062af7, transformers 4.51.3).

`tests/fixtures/official_qzoom_tiny/` holds a tiny checkpoint written by the official model class in the released
(pre-4.52) key layout, and what the official inference path computed on it (`evals/official_reference.py`
regenerates it): gate probability, raw RoI logit map, grid and pixel boxes, the spliced ids and float M-RoPE
positions, first-token logits and greedy tokens. Given the same weights, image, question and thresholds, qzoom must
reproduce all of them up to float noise.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from qzoom.engine import QZoomEngine, SequenceState
from qzoom.schemas import AskOptions

FIXTURE = Path(__file__).parent / "fixtures" / "official_qzoom_tiny"
REFERENCE = json.loads((FIXTURE / "reference.json").read_text())
TENSORS = load_file(str(FIXTURE / "reference.safetensors"))
ATOL = 1e-5  # stock 5.23 vs the official 4.51.3 fork differ by 1-2 float32 ulps (max 9.5e-7 on these logits)


@pytest.fixture(scope="module")
def engine() -> QZoomEngine:
    return QZoomEngine.from_pretrained(FIXTURE / "checkpoint")


def start(engine: QZoomEngine, case: str) -> SequenceState:
    meta = REFERENCE["cases"][case]
    image = Image.open(FIXTURE / meta["image"]).convert("RGB")
    opts = AskOptions(gate_thresh=meta["tau_gate"], roi_thresh=meta["tau_roi"], max_new_tokens=8)
    st = engine.new_state(image, meta["question_with_suffix"], opts)
    engine.prepare([st])
    engine.encode([st])
    engine.prefill([st])
    return st


def ref(case: str, name: str) -> torch.Tensor:
    return TENSORS[f"{case}.{name}"]


def test_fixture_is_in_the_released_key_layout():
    from qzoom.checkpoint import is_legacy_layout, weight_keys

    keys = weight_keys(FIXTURE / "checkpoint")
    assert is_legacy_layout(keys)
    assert any(k.startswith("model.twig_layers.") for k in keys) and any(k.startswith("visual.") for k in keys)


@pytest.mark.parametrize("case", ["a", "b"])
def test_prompt_pixels_and_positions_match(engine, case):
    st = start(engine, case)
    assert torch.equal(st.input_ids, ref(case, "input_ids"))
    assert torch.equal(st.grid_thw, ref(case, "image_grid_thw")[0])
    torch.testing.assert_close(
        st.pixel_values.sum(dim=1), ref(case, "global_pixel_values_rowsum"), atol=1e-3, rtol=1e-5
    )
    torch.testing.assert_close(
        st.pixel_values.sum(dim=0), ref(case, "global_pixel_values_colsum"), atol=1e-3, rtol=1e-5
    )
    torch.testing.assert_close(st.pixel_values[:8], ref(case, "global_pixel_values_head"), atol=1e-6, rtol=0)
    assert torch.equal(st.positions, ref(case, "prompt_position_ids"))


def test_fired_case_matches_gate_map_box_splice_and_answer(engine):
    st = start(engine, "a")
    meta = REFERENCE["cases"]["a"]

    (p,) = engine.gate([st])
    assert p == pytest.approx(float(ref("a", "gate_p")[0]), abs=ATOL)
    assert p >= st.gate_thresh

    (proposal,) = engine.propose([st])
    torch.testing.assert_close(proposal.logits, ref("a", "roi_logit_map"), atol=1e-4, rtol=1e-5)
    (grid_box,) = proposal.grid_boxes
    assert grid_box.as_list() == ref("a", "roi_grid_box_xyxy").tolist() == meta["roi_grid_box_xyxy_end_exclusive"]
    (box,) = proposal.boxes
    assert box.as_list() == ref("a", "roi_pixel_box_xyxy").tolist()

    engine.zoom([st], [proposal])
    assert st.blocks[1].grid_hw == (
        int(ref("a", "roi_image_grid_thw")[0, 1]) // 2,
        int(ref("a", "roi_image_grid_thw")[0, 2]) // 2,
    )
    assert st.blocks[0].end == meta["kv_reuse_prefix_len_P"]
    assert torch.equal(st.input_ids, ref("a", "spliced_input_ids"))
    torch.testing.assert_close(st.positions, ref("a", "spliced_position_ids"), atol=1e-5, rtol=0)

    engine.finish([st])
    torch.testing.assert_close(st.next_logits, ref("a", "first_token_logits"), atol=ATOL, rtol=0)
    engine.decode([st])
    assert st.answer_ids == ref("a", "generated_ids").tolist()


def test_closed_gate_matches_direct_answer(engine):
    st = start(engine, "b")
    (p,) = engine.gate([st])
    assert p == pytest.approx(float(ref("b", "gate_p")[0]), abs=ATOL)
    assert p < st.gate_thresh
    engine.finish([st])
    engine.decode([st])
    torch.testing.assert_close(st.next_logits, ref("b", "first_token_logits"), atol=ATOL, rtol=0)
    assert st.answer_ids == ref("b", "generated_ids").tolist()


def test_fired_gate_without_cells_falls_back_to_direct_answer(engine):
    st = start(engine, "b_fallback")
    (p,) = engine.gate([st])
    assert p >= st.gate_thresh
    (proposal,) = engine.propose([st])
    torch.testing.assert_close(proposal.logits, ref("b_fallback", "roi_logit_map"), atol=1e-4, rtol=1e-5)
    assert proposal.boxes == []
    engine.zoom([st], [proposal])
    engine.finish([st])
    engine.decode([st])
    assert len(st.blocks) == 1
    torch.testing.assert_close(st.next_logits, ref("b_fallback", "first_token_logits"), atol=ATOL, rtol=0)
    assert st.answer_ids == ref("b_fallback", "generated_ids").tolist()
