"""Tests for qzoom.roi: sink mask, blur, thresholding, grid boxes and the grid -> source-pixel mapping."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from qzoom.roi import (
    GridBox,
    PixelBox,
    clamp_pixel_box,
    component_boxes,
    corner_sink_mask,
    covering_grid_box,
    gaussian_blur3,
    grid_box_to_pixels,
    propose_grid_boxes,
    roi_probability,
    sub_box_to_pixels,
    tight_box,
)

# 1-D Gaussian, sigma=1, kernel 3, normalised: [e^-1/2, 1, e^-1/2] / (1 + 2 e^-1/2).
_K_SIDE = math.exp(-0.5) / (1 + 2 * math.exp(-0.5))
_K_MID = 1 / (1 + 2 * math.exp(-0.5))
K_CENTER = _K_MID * _K_MID  # 0.20418
K_EDGE = _K_MID * _K_SIDE  # 0.12384
K_CORNER = _K_SIDE * _K_SIDE  # 0.07511


def _zero_cells(mask: torch.Tensor) -> set[tuple[int, int]]:
    return {(int(r), int(c)) for r, c in (mask == 0).nonzero().tolist()}


# ------------------------------------------------------------------------------------------------ corner sink mask


def test_sink_mask_20x27_matches_spec_example() -> None:
    mask = corner_sink_mask(20, 27)
    assert mask.shape == (20, 27)
    assert mask.dtype == torch.float32
    expected = {(r, 0) for r in range(5)} | {(0, c) for c in range(6)}
    assert _zero_cells(mask) == expected
    assert mask.sum().item() == 20 * 27 - 10


@pytest.mark.parametrize("hw", [(16, 16), (1, 256), (256, 1), (8, 32), (2, 2), (1, 1)])
def test_sink_mask_untouched_up_to_256_cells(hw: tuple[int, int]) -> None:
    assert bool((corner_sink_mask(*hw) == 1).all())


@pytest.mark.parametrize(
    ("hw", "expected"),
    [
        ((16, 17), {(r, 0) for r in range(4)} | {(0, c) for c in range(4)}),  # 272 cells: first map over the limit
        ((1, 300), {(0, c) for c in range(75)}),  # h//4 == 0: only the row strip remains
        ((300, 1), {(r, 0) for r in range(75)}),
        ((3, 90), {(0, 0)} | {(0, c) for c in range(22)}),
    ],
)
def test_sink_mask_just_over_256_and_thin_maps(hw: tuple[int, int], expected: set[tuple[int, int]]) -> None:
    assert _zero_cells(corner_sink_mask(*hw)) == expected


def test_sink_mask_rejects_empty_map() -> None:
    with pytest.raises(ValueError):
        corner_sink_mask(0, 5)


# ------------------------------------------------------------------------------------------------ blur


def test_blur_single_hot_cell_gives_kernel_weights() -> None:
    x = torch.zeros(7, 7)
    x[3, 3] = 1.0
    out = gaussian_blur3(x)
    assert out.shape == (7, 7)
    expected = torch.zeros(7, 7, dtype=torch.float64)
    expected[2:5, 2:5] = torch.tensor(
        [[K_CORNER, K_EDGE, K_CORNER], [K_EDGE, K_CENTER, K_EDGE], [K_CORNER, K_EDGE, K_CORNER]]
    )
    torch.testing.assert_close(out.double(), expected, atol=1e-7, rtol=0)
    assert out.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert out[3, 3].item() == pytest.approx(0.2041800, abs=1e-6)


def test_blur_uses_reflect_padding_not_zero_padding() -> None:
    # A hot cell one step in from the corner is mirrored onto all four diagonal neighbours of the corner cell.
    x = torch.zeros(5, 5)
    x[1, 1] = 1.0
    out = gaussian_blur3(x)
    assert out[0, 0].item() == pytest.approx(4 * K_CORNER, abs=1e-6)  # zero padding would give K_CORNER
    assert out[0, 1].item() == pytest.approx(2 * K_EDGE, abs=1e-6)
    # Reflect (not symmetric) padding does not duplicate the edge cell itself.
    y = torch.zeros(5, 5)
    y[0, 0] = 1.0
    out = gaussian_blur3(y)
    assert out[0, 0].item() == pytest.approx(K_CENTER, abs=1e-6)
    assert out[0, 1].item() == pytest.approx(K_EDGE, abs=1e-6)
    assert out[1, 1].item() == pytest.approx(K_CORNER, abs=1e-6)


def test_blur_keeps_a_constant_map_constant() -> None:
    out = gaussian_blur3(torch.full((6, 9), 0.5))
    torch.testing.assert_close(out, torch.full((6, 9), 0.5), atol=1e-6, rtol=0)


@pytest.mark.parametrize("hw", [(2, 2), (2, 7), (5, 3), (20, 27), (37, 11)])
def test_blur_is_bitwise_the_torchvision_recipe(hw: tuple[int, int]) -> None:
    # torchvision's tensor gaussian_blur: float32 kernel from linspace/exp/normalise, reflect pad, one conv2d.
    g = torch.Generator().manual_seed(hw[0] * 100 + hw[1])
    x = torch.rand(hw, generator=g)
    t = torch.linspace(-1.0, 1.0, 3)
    k1 = torch.exp(-0.5 * t.pow(2))
    k1 = k1 / k1.sum()
    k2 = torch.mm(k1[:, None], k1[None, :])
    ref = F.conv2d(F.pad(x[None, None], [1, 1, 1, 1], mode="reflect"), k2[None, None])[0, 0]
    assert torch.equal(gaussian_blur3(x), ref)


def test_blur_on_single_row_and_column_maps_blurs_only_the_long_axis() -> None:
    row = torch.zeros(1, 7)
    row[0, 3] = 1.0
    expected = torch.tensor([[0, 0, _K_SIDE, _K_MID, _K_SIDE, 0, 0]], dtype=torch.float64)
    torch.testing.assert_close(gaussian_blur3(row).double(), expected, atol=1e-6, rtol=0)
    col = row.T.contiguous()
    torch.testing.assert_close(gaussian_blur3(col).double(), expected.T, atol=1e-6, rtol=0)
    one = torch.tensor([[0.7]])
    assert gaussian_blur3(one).item() == pytest.approx(0.7, abs=1e-6)


def test_blur_rejects_non_2d() -> None:
    with pytest.raises(ValueError):
        gaussian_blur3(torch.zeros(1, 4, 4))


# ------------------------------------------------------------------------------------------------ probability map


def test_roi_probability_is_blurred_masked_sigmoid_in_float32() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(20, 27, generator=g)
    prob = roi_probability(logits)
    assert prob.dtype == torch.float32
    assert torch.equal(prob, gaussian_blur3(logits.sigmoid() * corner_sink_mask(20, 27)))
    assert torch.equal(roi_probability(logits, sink_mask=False), gaussian_blur3(logits.sigmoid()))
    assert roi_probability(logits.to(torch.bfloat16)).dtype == torch.float32


def test_roi_probability_accepts_an_explicit_sink_tensor() -> None:
    logits = torch.zeros(4, 4)
    sink = torch.ones(4, 4)
    sink[2, 2] = 0
    assert torch.equal(roi_probability(logits, sink_mask=sink), gaussian_blur3(0.5 * sink))
    with pytest.raises(ValueError):
        roi_probability(logits, sink_mask=torch.ones(3, 3))


def test_sink_suppresses_a_hot_corner() -> None:
    logits = torch.full((20, 27), -20.0)
    logits[0, 0] = 20.0
    boxes, prob = propose_grid_boxes(logits, 0.1)
    assert boxes == []
    assert prob.shape == (20, 27)
    boxes, _ = propose_grid_boxes(logits, 0.1, sink_mask=False)
    # Blurred corner: (0,0)=0.204, (0,1)=(1,0)=0.124 pass 0.1; (1,1)=0.075 does not, but the box spans it.
    assert boxes == [GridBox(0, 0, 2, 2)]


# ------------------------------------------------------------------------------------------------ thresholding


def test_no_cell_above_threshold_gives_no_box() -> None:
    boxes, prob = propose_grid_boxes(torch.full((10, 12), -10.0), 0.1)
    assert boxes == []
    assert prob.shape == (10, 12)
    assert float(prob.max()) < 0.1


def test_threshold_is_strict_and_blur_widens_the_box() -> None:
    logits = torch.full((10, 10), -30.0)
    logits[4, 5] = 30.0  # prob 1.0 at one cell; after the blur its 3x3 neighbourhood has 0.075 .. 0.204
    assert propose_grid_boxes(logits, 0.2, sink_mask=False)[0] == [GridBox(5, 4, 6, 5)]
    assert propose_grid_boxes(logits, 0.1, sink_mask=False)[0] == [GridBox(4, 3, 7, 6)]
    assert propose_grid_boxes(logits, 0.05, sink_mask=False)[0] == [GridBox(4, 3, 7, 6)]
    assert propose_grid_boxes(logits, 0.21, sink_mask=False)[0] == []


def test_two_separated_blobs_make_one_box_by_default() -> None:
    logits = torch.full((12, 16), -30.0)
    logits[2:4, 2:4] = 30.0
    logits[7:10, 11:14] = 30.0
    # At 0.5 the blur keeps each blob's own cells (2x2 interior 0.53) and none of their neighbours (<= 0.45).
    boxes, prob = propose_grid_boxes(logits, 0.5, sink_mask=False)
    assert int((prob > 0.5).sum()) == 4 + 9
    assert boxes == [GridBox(2, 2, 14, 10)]
    two, _ = propose_grid_boxes(logits, 0.5, max_boxes=2, sink_mask=False)
    assert two == [GridBox(11, 7, 14, 10), GridBox(2, 2, 4, 4)]  # the 3x3 blob carries more mass
    assert propose_grid_boxes(logits, 0.5, max_boxes=5, sink_mask=False)[0] == two
    with pytest.raises(ValueError):
        propose_grid_boxes(logits, 0.5, max_boxes=0)


def test_components_mode_keeps_the_heaviest_blob_alone() -> None:
    logits = torch.full((12, 16), -30.0)
    logits[2:4, 2:4] = 30.0
    logits[7:10, 11:14] = 30.0
    heaviest, _ = propose_grid_boxes(logits, 0.5, mode="components", sink_mask=False)
    assert heaviest == [GridBox(11, 7, 14, 10)]
    assert propose_grid_boxes(logits, 0.5, mode="components", max_boxes=2, sink_mask=False)[0] == [
        GridBox(11, 7, 14, 10),
        GridBox(2, 2, 4, 4),
    ]
    with pytest.raises(ValueError, match="union, components"):
        propose_grid_boxes(logits, 0.5, mode="biggest")  # type: ignore[arg-type]


def test_peak_frac_drops_the_cells_below_that_share_of_the_peak() -> None:
    # A strong blob and a faint one that passes τ_roi: the union spans both until the faint one falls below the
    # fraction of the peak; a fraction of 0 is the paper's map.
    logits = torch.full((12, 16), -30.0)
    logits[2:4, 2:4] = 0.0  # sigmoid 0.5, about 0.27 after the blur
    logits[7:10, 11:14] = 30.0  # about 1.0 in the middle after the blur
    (both,), prob = propose_grid_boxes(logits, 0.2, sink_mask=False)
    assert (both.x0, both.y0) == (2, 2) and (both.x1, both.y1) >= (14, 10)  # one box over both blobs and their rims
    assert propose_grid_boxes(logits, 0.2, peak_frac=0.0, sink_mask=False)[0] == [both]
    assert float(prob[2:4, 2:4].max()) < 0.5 * float(prob.max()) < float(prob[7:10, 11:14].min())
    (strong,), _ = propose_grid_boxes(logits, 0.2, peak_frac=0.5, sink_mask=False)
    assert strong.x0 >= 10 and strong.y0 >= 6  # the faint blob is gone
    assert strong.x0 <= 11 and strong.y0 <= 7 and strong.x1 >= 14 and strong.y1 >= 10  # the strong one is whole
    # Every cell at the peak passes, whatever the fraction.
    assert propose_grid_boxes(logits, 0.2, peak_frac=1.0, sink_mask=False)[0] != []
    with pytest.raises(ValueError, match="peak_frac"):
        propose_grid_boxes(logits, 0.2, peak_frac=1.5)


# ------------------------------------------------------------------------------------------------ tight box


def test_tight_box_single_cell_is_end_exclusive() -> None:
    m = torch.zeros(6, 9, dtype=torch.bool)
    m[3, 4] = True
    box = tight_box(m)
    assert box == GridBox(4, 3, 5, 4)
    assert box is not None
    assert (box.width, box.height) == (1, 1)
    assert box.as_list() == [4, 3, 5, 4]


def test_tight_box_edges_and_full_mask() -> None:
    m = torch.zeros(6, 9, dtype=torch.bool)
    m[0, 8] = True
    m[5, 0] = True
    assert tight_box(m) == GridBox(0, 0, 9, 6)
    assert tight_box(torch.ones(6, 9, dtype=torch.bool)) == GridBox(0, 0, 9, 6)
    assert tight_box(torch.zeros(6, 9, dtype=torch.bool)) is None


def test_tight_box_accepts_numeric_masks() -> None:
    m = torch.zeros(4, 5)
    m[1, 2] = 1.0
    m[2, 3] = 1.0
    assert tight_box(m) == GridBox(2, 1, 4, 3)


# ------------------------------------------------------------------------------------------------ components


def _mask(h: int, w: int, cells: list[tuple[int, int]]) -> torch.Tensor:
    m = torch.zeros(h, w, dtype=torch.bool)
    for r, c in cells:
        m[r, c] = True
    return m


def test_components_join_diagonal_neighbours() -> None:
    m = _mask(6, 6, [(0, 0), (1, 1), (2, 2), (3, 3)])
    assert component_boxes(m, 3) == [GridBox(0, 0, 4, 4)]


def test_components_order_by_mass_then_size() -> None:
    m = _mask(8, 10, [(0, 0), (0, 1), (1, 0), (1, 1), (6, 8)])  # a 2x2 blob and a lone cell
    assert component_boxes(m, 2) == [GridBox(0, 0, 2, 2), GridBox(8, 6, 9, 7)]  # by cell count
    prob = torch.full((8, 10), 0.2)
    prob[6, 8] = 0.95  # lone cell 0.95 > blob 4 * 0.2
    assert component_boxes(m, 2, prob=prob) == [GridBox(8, 6, 9, 7), GridBox(0, 0, 2, 2)]
    assert component_boxes(m, 1, prob=prob) == [GridBox(8, 6, 9, 7)]


def test_components_cap_and_tie_break_are_deterministic() -> None:
    cells = [(r, c) for r in (0, 4, 8) for c in (0, 4, 8)]  # nine isolated cells of equal weight
    boxes = component_boxes(_mask(9, 9, cells), 4)
    assert boxes == [GridBox(0, 0, 1, 1), GridBox(4, 0, 5, 1), GridBox(8, 0, 9, 1), GridBox(0, 4, 1, 5)]
    assert component_boxes(_mask(9, 9, []), 4) == []


def test_components_of_an_l_shape_and_a_ring() -> None:
    # 4-connectivity would split the ring at its diagonal corners; 8-connectivity must not.
    ring = _mask(5, 5, [(0, 2), (1, 1), (1, 3), (2, 0), (2, 4), (3, 1), (3, 3), (4, 2)])
    assert component_boxes(ring, 5) == [GridBox(0, 0, 5, 5)]
    ell = _mask(6, 6, [(0, 0), (1, 0), (2, 0), (2, 1), (2, 2), (0, 2)])  # (0,2) is not adjacent to the L
    assert component_boxes(ell, 5) == [GridBox(0, 0, 3, 3), GridBox(2, 0, 3, 1)]


def test_components_validate_inputs() -> None:
    with pytest.raises(ValueError):
        component_boxes(_mask(3, 3, [(1, 1)]), 0)
    with pytest.raises(ValueError):
        component_boxes(_mask(3, 3, [(1, 1)]), 2, prob=torch.zeros(4, 4))


# ------------------------------------------------------------------------------------------------ box types


def test_box_types_validate_and_convert() -> None:
    b = GridBox(np.int64(1), 2, 3, torch.tensor(5))  # type: ignore[arg-type]
    assert b.as_list() == [1, 2, 3, 5]
    assert all(type(v) is int for v in b.as_list())
    assert (b.width, b.height) == (2, 3)
    with pytest.raises(ValueError):
        GridBox(3, 0, 3, 1)  # empty: x1 is exclusive
    with pytest.raises(ValueError):
        PixelBox(0, 5, 4, 2)
    with pytest.raises(ValueError):
        PixelBox(-1, 0, 4, 2)
    with pytest.raises(TypeError):
        PixelBox(0.5, 0, 4, 2)  # type: ignore[arg-type]
    assert GridBox(0, 0, 1, 1) != PixelBox(0, 0, 1, 1)  # type: ignore[comparison-overlap]
    with pytest.raises(AttributeError):
        b.x0 = 0  # type: ignore[misc]


# ------------------------------------------------------------------------------------------------ grid -> pixels


def test_truncation_example_from_spec() -> None:
    # Spec §11.3/§11.4: grid 20x27, grid box x 16..22, y 3..7 on a 896x672 image gives
    # (530.96, 100.8, 730.07, 235.2), which truncates (rounding would give 531 and 101).
    box = grid_box_to_pixels(GridBox(16, 3, 22, 7), (20, 27), (896, 672))
    assert box == PixelBox(530, 100, 730, 235)
    assert (box.width, box.height) == (200, 135)  # the 200x135 crop of §11.7


def test_float32_truncation_quirks_are_the_reference_ones() -> None:
    # Values produced by the reference get_bbox4src: float32 scaling lands just below an integer and truncation then
    # drops a pixel. A full-grid box can lose the last column ...
    assert grid_box_to_pixels(GridBox(0, 0, 63, 37), (37, 63), (1796, 3606)) == PixelBox(0, 0, 1795, 3606)
    # ... and a box grown to 28 px and slid off the top border can come out 27 px tall.
    assert grid_box_to_pixels(GridBox(21, 4, 23, 6), (24, 25), (298, 31)) == PixelBox(248, 0, 276, 27)
    # The patch size of the resized space changes the float32 rounding, not the geometry.
    assert grid_box_to_pixels(GridBox(16, 3, 22, 7), (20, 27), (896, 672), patch_px=32) == PixelBox(530, 100, 730, 235)


def test_min_side_growth_is_symmetric() -> None:
    # 40x40 grid on a 560x560 image: one cell is 14 px and grows by 7 px on each side.
    assert grid_box_to_pixels(GridBox(10, 10, 11, 11), (40, 40), (560, 560)) == PixelBox(133, 133, 161, 161)
    assert grid_box_to_pixels(GridBox(10, 10, 11, 11), (40, 40), (560, 560), min_side=0) == PixelBox(140, 140, 154, 154)
    # Only the short side grows.
    assert grid_box_to_pixels(GridBox(10, 10, 15, 11), (40, 40), (560, 560)) == PixelBox(140, 133, 210, 161)


@pytest.mark.parametrize(
    ("box", "expected"),
    [
        (GridBox(0, 20, 1, 21), PixelBox(0, 273, 28, 301)),  # left border
        (GridBox(39, 20, 40, 21), PixelBox(532, 273, 560, 301)),  # right border
        (GridBox(20, 0, 21, 1), PixelBox(273, 0, 301, 28)),  # top border
        (GridBox(20, 39, 21, 40), PixelBox(273, 532, 301, 560)),  # bottom border
        (GridBox(0, 0, 1, 1), PixelBox(0, 0, 28, 28)),  # corner
        (GridBox(39, 39, 40, 40), PixelBox(532, 532, 560, 560)),
    ],
)
def test_growth_at_borders_slides_back_inside(box: GridBox, expected: PixelBox) -> None:
    assert grid_box_to_pixels(box, (40, 40), (560, 560)) == expected


@pytest.mark.parametrize(
    ("box", "grid_hw", "image_wh", "expected"),
    [
        (GridBox(5, 0, 6, 1), (1, 200), (20000, 30), PixelBox(500, 0, 600, 30)),
        (GridBox(0, 199, 1, 200), (200, 1), (30, 20000), PixelBox(0, 19900, 30, 20000)),
        (GridBox(5, 0, 6, 1), (1, 200), (20000, 10), PixelBox(500, 0, 600, 10)),  # shorter than min side
        (GridBox(0, 0, 200, 1), (1, 200), (20000, 30), PixelBox(0, 0, 20000, 30)),
        (GridBox(50, 0, 51, 1), (1, 100), (2800, 28), PixelBox(1400, 0, 1428, 28)),
        (GridBox(199, 0, 200, 1), (1, 200), (2000, 5), PixelBox(1972, 0, 2000, 5)),  # 10 px cell grows to 28
    ],
)
def test_extreme_aspect_ratios(
    box: GridBox, grid_hw: tuple[int, int], image_wh: tuple[int, int], expected: PixelBox
) -> None:
    assert grid_box_to_pixels(box, grid_hw, image_wh) == expected


@pytest.mark.parametrize(
    ("box", "grid_hw", "image_wh"),
    [
        (GridBox(0, 0, 1, 1), (1, 1), (10, 10)),
        (GridBox(1, 1, 2, 2), (2, 2), (10, 10)),
        (GridBox(0, 0, 1, 1), (2, 2), (10, 10)),
        (GridBox(0, 0, 1, 1), (1, 1), (1, 1)),
    ],
)
def test_images_smaller_than_min_side_give_the_whole_image(
    box: GridBox, grid_hw: tuple[int, int], image_wh: tuple[int, int]
) -> None:
    assert grid_box_to_pixels(box, grid_hw, image_wh) == PixelBox(0, 0, *image_wh)


def test_min_side_zero_still_gives_a_non_empty_box() -> None:
    # 0.1 px cells: x 5.0 .. 5.1 truncates to 5 .. 5, which must not become an empty crop.
    box = grid_box_to_pixels(GridBox(50, 0, 51, 1), (1, 100), (10, 10), min_side=0)
    assert box == PixelBox(5, 0, 6, 10)
    last = grid_box_to_pixels(GridBox(99, 0, 100, 1), (1, 100), (10, 10), min_side=0)
    assert (last.x0, last.x1) == (9, 10)


def test_margin_is_applied_before_min_side() -> None:
    # 10x10 grid on 1000x1000: cell (1, 1) is 100..200 px; a 10 % margin adds 10 px on each side.
    assert grid_box_to_pixels(GridBox(1, 1, 2, 2), (10, 10), (1000, 1000), margin=0.1) == PixelBox(90, 90, 210, 210)
    # At the border the margin slides back in instead of being clipped.
    assert grid_box_to_pixels(GridBox(0, 0, 1, 1), (10, 10), (1000, 1000), margin=0.5) == PixelBox(0, 0, 200, 200)
    # A 14 px cell with 50 % margin is 28 px: min side then has nothing left to add (after it, it would be 56 px).
    assert grid_box_to_pixels(GridBox(10, 10, 11, 11), (40, 40), (560, 560), margin=0.5) == PixelBox(133, 133, 161, 161)
    # Smaller margin: 14 * 1.2 = 16.8 px, then grown to 28.
    box = grid_box_to_pixels(GridBox(10, 10, 11, 11), (40, 40), (560, 560), margin=0.1)
    assert (box.width, box.height) == (28, 28)
    with pytest.raises(ValueError):
        grid_box_to_pixels(GridBox(1, 1, 2, 2), (10, 10), (1000, 1000), margin=-0.1)


def test_grid_box_must_fit_the_grid() -> None:
    with pytest.raises(ValueError):
        grid_box_to_pixels(GridBox(0, 0, 28, 1), (20, 27), (896, 672))
    with pytest.raises(ValueError):
        grid_box_to_pixels(GridBox(0, 0, 1, 1), (20, 27), (0, 672))


def _reference_oracle(
    boxes: torch.Tensor, feat_hw: tuple[int, int], src_wh: tuple[int, int], patch: int
) -> torch.Tensor:
    """Batched float32 restatement of spec §3.4 in the reference's operation order (for parity checks)."""
    fh, fw = feat_hw
    sw, sh = src_wh
    b = boxes.float()
    b[:, 0::2] *= (fw * patch) / fw
    b[:, 1::2] *= (fh * patch) / fh
    b[:, 0::2] = b[:, 0::2] * (sw / (fw * patch))
    b[:, 1::2] = b[:, 1::2] * (sh / (fh * patch))
    need = torch.stack([28 - (b[:, 2] - b[:, 0]), 28 - (b[:, 3] - b[:, 1])], 1).clamp(min=0)
    b[:, 0] -= need[:, 0] / 2
    b[:, 2] += need[:, 0] / 2
    b[:, 1] -= need[:, 1] / 2
    b[:, 3] += need[:, 1] / 2
    for lo, hi, limit in ((0, 2, None), (1, 3, None), (0, 2, sw), (1, 3, sh)):
        off = -b[:, lo].clamp(max=0) if limit is None else -(b[:, hi] - limit).clamp(min=0)
        b[:, lo] += off
        b[:, hi] += off
    b[:, 0::2] = b[:, 0::2].clamp(0, sw)
    b[:, 1::2] = b[:, 1::2].clamp(0, sh)
    return b.long()


@pytest.mark.parametrize("patch", [28, 32])
def test_matches_reference_arithmetic_and_invariants_on_a_sweep(patch: int) -> None:
    rng = random.Random(patch)
    for _ in range(300):
        gh, gw = rng.randint(1, 60), rng.randint(1, 60)
        sw, sh = (
            rng.choice([rng.randint(1, 40), rng.randint(28, 5000)]),
            rng.choice([rng.randint(1, 40), rng.randint(28, 5000)]),
        )
        x0, y0 = rng.randrange(gw), rng.randrange(gh)
        box = GridBox(x0, y0, rng.randint(x0 + 1, gw), rng.randint(y0 + 1, gh))
        got = grid_box_to_pixels(box, (gh, gw), (sw, sh), patch_px=patch)
        want = _reference_oracle(torch.tensor([box.as_list()]), (gh, gw), (sw, sh), patch)[0].tolist()
        assert got.as_list() == want, (box, (gh, gw), (sw, sh))
        assert 0 <= got.x0 < got.x1 <= sw
        assert 0 <= got.y0 < got.y1 <= sh
        assert got.width >= min(28, sw) - 1
        assert got.height >= min(28, sh) - 1


# ------------------------------------------------------------------------------------------------ sub boxes


def test_sub_box_maps_inside_the_parent() -> None:
    parent = PixelBox(100, 200, 300, 300)  # 200x100 px covered by a 10x20 grid: 10x10 px cells
    assert sub_box_to_pixels(GridBox(5, 2, 10, 6), (10, 20), parent, (1000, 800)) == PixelBox(150, 220, 200, 260)
    assert sub_box_to_pixels(GridBox(0, 0, 20, 10), (10, 20), parent, (1000, 800)) == parent
    # Min side is measured in original-image pixels and may leave the parent.
    assert sub_box_to_pixels(GridBox(0, 0, 1, 1), (10, 20), parent, (1000, 800)) == PixelBox(91, 191, 119, 219)


def test_sub_box_slides_against_the_whole_image() -> None:
    parent = PixelBox(0, 0, 50, 50)
    assert sub_box_to_pixels(GridBox(0, 0, 1, 1), (5, 5), parent, (600, 400)) == PixelBox(0, 0, 28, 28)
    corner = PixelBox(550, 350, 600, 400)
    assert sub_box_to_pixels(GridBox(4, 4, 5, 5), (5, 5), corner, (600, 400)) == PixelBox(572, 372, 600, 400)
    with pytest.raises(ValueError):
        sub_box_to_pixels(GridBox(0, 0, 1, 1), (5, 5), PixelBox(0, 0, 700, 50), (600, 400))


def test_sub_box_with_margin() -> None:
    parent = PixelBox(100, 100, 500, 500)  # 4x4 grid: 100 px cells
    box = sub_box_to_pixels(GridBox(1, 1, 2, 2), (4, 4), parent, (1000, 1000), margin=0.25)
    assert box == PixelBox(175, 175, 325, 325)


# ------------------------------------------------------------------------------------------------ external boxes


@pytest.mark.parametrize(
    ("xyxy", "expected"),
    [
        ((-50, -50, 5000, 5000), PixelBox(0, 0, 800, 600)),  # out of range on every side
        ((300, 200, 100, 50), PixelBox(100, 50, 300, 200)),  # inverted corners
        ((10.9, 20.9, 100.9, 120.9), PixelBox(10, 20, 100, 120)),  # floats truncate
        ((900, 100, 1000, 200), PixelBox(772, 100, 800, 200)),  # wholly right of the image
        ((100, -300, 200, -100), PixelBox(100, 0, 200, 28)),  # wholly above
        ((400, 300, 400, 300), PixelBox(386, 286, 414, 314)),  # a point grows to min side
        ((0, 0, 5, 5), PixelBox(0, 0, 28, 28)),
    ],
)
def test_clamp_pixel_box(xyxy: tuple[float, float, float, float], expected: PixelBox) -> None:
    assert clamp_pixel_box(*xyxy, (800, 600), min_side=28) == expected


def test_clamp_pixel_box_aspect_cap() -> None:
    assert clamp_pixel_box(0, 100, 400, 110, (1000, 1000), min_side=28, max_aspect=4) == PixelBox(0, 55, 400, 155)
    assert clamp_pixel_box(100, 0, 110, 400, (1000, 1000), min_side=28, max_aspect=4) == PixelBox(55, 0, 155, 400)
    # Growth past a border slides back.
    assert clamp_pixel_box(0, 0, 400, 10, (1000, 1000), min_side=28, max_aspect=2) == PixelBox(0, 0, 400, 200)
    # Within the cap: untouched.
    assert clamp_pixel_box(0, 0, 300, 100, (1000, 1000), min_side=28, max_aspect=4) == PixelBox(0, 0, 300, 100)
    # An image more elongated than the cap: best effort, the whole height.
    assert clamp_pixel_box(0, 0, 1000, 30, (20000, 30), min_side=28, max_aspect=2) == PixelBox(0, 0, 1000, 30)


def test_clamp_pixel_box_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        clamp_pixel_box(0, 0, 10, 10, (100, 100), min_side=28, max_aspect=0.5)
    with pytest.raises(ValueError):
        clamp_pixel_box(0, float("nan"), 10, 10, (100, 100), min_side=28)
    with pytest.raises(ValueError):
        clamp_pixel_box(0, 0, 10, 10, (100, 0), min_side=28)
    with pytest.raises(ValueError):
        clamp_pixel_box(0, 0, 10, 10, (100, 100), min_side=-1)


def test_clamp_pixel_box_small_image() -> None:
    assert clamp_pixel_box(2, 2, 3, 3, (10, 10), min_side=28) == PixelBox(0, 0, 10, 10)
    assert clamp_pixel_box(5, 5, 5, 5, (10, 10), min_side=0) == PixelBox(5, 5, 6, 6)


# ------------------------------------------------------------------------------------------------ device


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_runs_on_gpu_and_matches_cpu() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(20, 27, generator=g) * 3
    boxes_cpu, prob_cpu = propose_grid_boxes(logits, 0.5, max_boxes=3)
    boxes_gpu, prob_gpu = propose_grid_boxes(logits.cuda(), 0.5, max_boxes=3)
    assert prob_gpu.device.type == "cuda"
    assert boxes_cpu == boxes_gpu
    torch.testing.assert_close(prob_gpu.cpu(), prob_cpu)


def test_covering_grid_box_is_the_smallest_box_of_cells_over_a_pixel_box() -> None:
    # A 16 x 12 grid over a 1600 x 900 image: cells are 100 x 75 px.
    assert covering_grid_box((150, 80, 160, 90), (12, 16), (1600, 900)) == GridBox(1, 1, 2, 2)  # inside one cell
    assert covering_grid_box((100, 75, 300, 150), (12, 16), (1600, 900)) == GridBox(1, 1, 3, 2)  # on cell edges
    assert covering_grid_box((99, 74, 301, 151), (12, 16), (1600, 900)) == GridBox(0, 0, 4, 3)  # a pixel over
    assert covering_grid_box((0, 0, 1600, 900), (12, 16), (1600, 900)) == GridBox(0, 0, 16, 12)
    # Grown per side, clamped to the grid.
    grown = covering_grid_box((150, 80, 160, 90), (12, 16), (1600, 900), grow=(1, 2, 3, 0))
    assert grown == GridBox(0, 0, 5, 2)
    assert covering_grid_box((1590, 890, 1600, 900), (12, 16), (1600, 900), grow=(0, 0, 1, 1)) == GridBox(
        15, 11, 16, 12
    )


@pytest.mark.parametrize("seed", range(20))
def test_covering_grid_box_inverts_grid_box_to_pixels(seed: int) -> None:
    # The pixels of a grid box are covered by that grid box again, except that the reference's float32 truncation
    # (a start that should be an integer lands just below it) can move a near edge into the cell before, never further.
    rng = random.Random(seed)
    gh, gw = rng.randint(4, 20), rng.randint(4, 20)
    x0, y0 = rng.randrange(gw), rng.randrange(gh)
    box = GridBox(x0, y0, rng.randint(x0 + 1, gw), rng.randint(y0 + 1, gh))
    wh = (rng.randint(gw * 28, 5000), rng.randint(gh * 28, 5000))
    back = covering_grid_box(grid_box_to_pixels(box, (gh, gw), wh, min_side=0).as_list(), (gh, gw), wh)
    assert box.x0 - 1 <= back.x0 <= box.x0 and box.y0 - 1 <= back.y0 <= box.y0
    assert (back.x1, back.y1) == (box.x1, box.y1)
