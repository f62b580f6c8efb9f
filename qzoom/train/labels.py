"""Label logic of the three Q-Zoom training stages: pure functions, no model, no I/O.

Contract (spec §2.1-§2.2, §5.2, §6, §9.14; reference ``YuHengsss/Q-Zoom`` @ ``f062af7``, cited as ``MU`` =
``qwen_src/mm_utils.py``, ``AU`` = ``qwen_src/ana_utils.py``, ``DQ`` = ``qwen-vl-finetune/qwenvl/data/data_qwen.py``,
``SP`` = ``standardized_pipeline/stage1/make_stage1_pseudo_labels.py``):

Stage 1, attention maps (§2.1)
    :func:`answer_to_image_attention_per_head` / :func:`answer_to_image_attention` turn the attention rows of the
    *decode* steps (the generated answer tokens as queries; the prefill is not a decode step) into ``(H, W)`` maps of
    attention onto the image tokens, averaged over steps and over the chosen ``{layer: [heads]}``.
    :func:`select_heads_by_localisation` replaces the paper's hand-picked head table with a documented automatic
    criterion, using ground-truth boxes only to rank heads.

Stage 1, pseudo-labels (§2.2)
    :func:`stage1_labels` turns a grounding map and a sink map into the tri-state target ``{1, 0, -100}`` exactly as
    ``create_pseudo_labels`` (``MU:221-385``) does with the Stage-1 settings; :func:`padding_cells` gives the padding
    cells of a pad-to-square image with the reference's grid geometry (``MU:149-218``).

Stage 3, gate labels (§5.2)
    :func:`filter_pool` is ``_filter_for_hard_cases`` (``DQ:1039-1094``) and :func:`gate_step_label` is
    ``create_high_res_signal`` (``DQ:1175-1253``), both driven by an explicit :class:`random.Random` so runs are
    reproducible (the reference uses the unseeded global RNG); :func:`prediction_vs_gt_label` is the reference's
    ablation strategy (``DQ:1142-1173``), the label from the answer at a low budget against GT.
    :func:`youden_threshold` is not in the paper (it tunes τ_gate per benchmark): the gate threshold that best
    separates a labelled set's gate scores (Youden's J).

Stage 2, regression mining (§6)
    :data:`JUDGE_PROMPT` (our wording of the LLM-judge criteria), :func:`parse_judge_reply`, :func:`is_regression`.

Grid conventions follow :mod:`qzoom.roi`: maps are ``(H, W)`` row-major over merged tokens, boxes are
:class:`~qzoom.roi.GridBox` (``x`` = column, ``y`` = row, end-exclusive).
"""

from __future__ import annotations

import enum
import itertools
import math
import random
import re
import string
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, Protocol, TypeVar

import torch
import torch.nn.functional as F

from qzoom.roi import GridBox

__all__ = [
    "IGNORE_INDEX",
    "JUDGE_PROMPT",
    "JUDGE_SYSTEM_PROMPT",
    "GateThreshold",
    "HeadSelection",
    "Judge",
    "Ladder",
    "LadderKind",
    "LadderSample",
    "PoolResult",
    "Stage1Labels",
    "answer_right",
    "answer_to_image_attention",
    "answer_to_image_attention_per_head",
    "answers_match",
    "cap_pool",
    "classify_ladder",
    "exact_match_judge",
    "filter_pool",
    "format_judge_prompt",
    "gate_step_label",
    "is_regression",
    "llm_judge",
    "normalize_answer",
    "padding_cells",
    "parse_judge_reply",
    "select_heads_by_localisation",
    "stage1_labels",
    "youden_threshold",
]

IGNORE_INDEX = -100

HeadMap = Mapping[int, Sequence[int]]
"""``{layer: [head, ...]}``, layers and heads 0-indexed, as in the reference head table (spec §2.1)."""


# ---------------------------------------------------------------------------------------------------------------------
# Stage 1: answer -> image attention maps (spec §2.1)
# ---------------------------------------------------------------------------------------------------------------------


def _decode_row(att: torch.Tensor, step: int, layer: int) -> torch.Tensor:
    # Accept the newest token's row as (heads, k) or straight from HF (1, heads, 1, k); anything with more than one
    # query is a prefill (or a batch) and would silently mix question tokens into an *answer* map.
    if att.dim() == 4:
        if att.shape[0] != 1 or att.shape[2] != 1:
            raise ValueError(
                f"step {step}, layer {layer}: expected (1, heads, 1, k) for a decode step, got {tuple(att.shape)};"
                " drop the prefill entry (HF generate's attentions[0]) and use batch size 1"
            )
        return att[0, :, 0, :]
    if att.dim() != 2:
        raise ValueError(f"step {step}, layer {layer}: expected (heads, k) or (1, heads, 1, k), got {tuple(att.shape)}")
    return att


def _image_positions(image_index: torch.Tensor, n_cells: int) -> torch.Tensor:
    if image_index.dtype == torch.bool:
        image_index = image_index.reshape(-1).nonzero().reshape(-1)
    image_index = image_index.reshape(-1).long()
    if image_index.numel() != n_cells:
        raise ValueError(f"image_index selects {image_index.numel()} key positions but the grid has {n_cells} cells")
    return image_index


def answer_to_image_attention_per_head(
    steps: Sequence[Sequence[torch.Tensor]] | torch.Tensor,
    image_index: torch.Tensor,
    grid_hw: tuple[int, int],
    *,
    layers: Sequence[int] | None = None,
) -> torch.Tensor:
    """Per-(layer, head) answer->image attention, averaged over decode steps.

    ``steps``: one entry per **decode** step (the prefill excluded), each indexed by absolute layer number, each a
    tensor ``(heads, k)`` (the attention row of the newest token) or ``(1, heads, 1, k)`` (HF's per-layer output for
    batch size 1). ``k`` may grow from step to step. Equivalently a tensor ``(steps, layers, heads, k)``. With HF
    ``generate(..., output_attentions=True, return_dict_in_generate=True)`` pass ``out.attentions[1:]``.

    ``image_index``: the key positions of the image tokens in row-major grid order, as ``H*W`` integer indices or a
    boolean mask over (a prefix of) the key positions with ``H*W`` True entries.

    ``layers``: the layers to extract (default: all). Returns float32 ``(len(layers), heads, H, W)``.

    Matches ``get_attn_weights_map`` (``AU:67-160``: ``output2images`` = row 0 of every non-prefill chunk, mean over
    chunks) except that we average in float32; the reference casts the weights to float16 first (``AU:110``).
    """
    h, w = grid_hw
    idx = _image_positions(image_index, h * w)
    n_steps = len(steps)
    if n_steps == 0:
        raise ValueError("no decode steps: the answer->image map is the mean over decode steps (prefill excluded)")
    n_layers = len(steps[0])
    chosen = list(range(n_layers)) if layers is None else [int(layer) for layer in layers]
    for layer in chosen:
        if not 0 <= layer < n_layers:
            raise ValueError(f"layer {layer} out of range: the attention has {n_layers} layers")
    total: torch.Tensor | None = None
    for s, per_layer in enumerate(steps):
        if len(per_layer) != n_layers:
            raise ValueError(f"step {s} has {len(per_layer)} layers, step 0 has {n_layers}")
        rows = [_decode_row(per_layer[layer], s, layer) for layer in chosen]
        stacked = torch.stack([r.index_select(-1, idx.to(r.device)).float() for r in rows])  # (L, heads, H*W)
        total = stacked if total is None else total + stacked.to(total.device)
    assert total is not None  # n_steps > 0
    return (total / n_steps).reshape(len(chosen), -1, h, w)


def answer_to_image_attention(
    steps: Sequence[Sequence[torch.Tensor]] | torch.Tensor,
    heads: HeadMap,
    image_index: torch.Tensor,
    grid_hw: tuple[int, int],
) -> torch.Tensor:
    """Mean over the listed ``(layer, head)`` pairs and over decode steps of the answer->image attention, ``(H, W)``.

    Inputs as in :func:`answer_to_image_attention_per_head`. An empty ``heads`` gives zeros (the reference's
    ``sink_attn`` when a backbone has no sink heads, ``SP:190-207``). Unlike the reference, which silently counts a
    missing layer as zeros but still divides by the full head count (``SP:201-207``), a bad layer or head raises.
    """
    h, w = grid_hw
    pairs = [(int(layer), int(head)) for layer, hs in heads.items() for head in hs]
    if not pairs:
        return torch.zeros((h, w), dtype=torch.float32)
    layers = sorted({layer for layer, _ in pairs})
    per_head = answer_to_image_attention_per_head(steps, image_index, grid_hw, layers=layers)
    n_heads = per_head.shape[1]
    picked = []
    for layer, head in pairs:
        if not 0 <= head < n_heads:
            raise ValueError(f"head {head} of layer {layer} out of range: the attention has {n_heads} heads")
        picked.append(per_head[layers.index(layer), head])
    return torch.stack(picked).mean(0)


@dataclass(frozen=True)
class HeadSelection:
    """Result of :func:`select_heads_by_localisation`.

    ``grounding`` / ``sink``: ``{layer: [heads]}`` in the reference's head-table format (layers are the absolute
    numbers passed as ``layers``). ``localisation`` / ``sink_score``: float32 ``(L, heads)`` scores of every head.
    ``ranking``: every non-sink head as ``(layer, head, localisation)``, best first.
    """

    grounding: dict[int, list[int]]
    sink: dict[int, list[int]]
    localisation: torch.Tensor
    sink_score: torch.Tensor
    ranking: list[tuple[int, int, float]]


def _as_head_map(pairs: Sequence[tuple[int, int]]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for layer, head in sorted(pairs):
        out.setdefault(layer, []).append(head)
    return out


def select_heads_by_localisation(
    maps: torch.Tensor,
    boxes: Sequence[GridBox],
    *,
    top_k: int = 4,
    layers: Sequence[int] | None = None,
    sink_cells: int = 2,
    sink_min_mass: float = 0.5,
) -> HeadSelection:
    """Pick grounding heads and sink heads automatically from a calibration set.

    The paper hand-picks both per backbone (spec §2.1 table). We replace that with this criterion:

    * ``maps``: ``(N, L, heads, H, W)`` answer->image attention of every head on N calibration samples (from
      :func:`answer_to_image_attention_per_head`); ``boxes``: one ground-truth grid box per sample. The boxes serve
      *only* to rank heads; Stage-1 labels never see them.
    * Each map is normalised to a distribution over the image cells (a head's total image share varies with the
      text; we care where it looks, not how much). All-zero maps count as no evidence (score 0).
    * **Sink score**: the ``sink_cells`` cells with the most mean normalised mass across samples are the head's
      *fixed* cells; the score is the mean over samples of the mass on those fixed cells that lie *outside* that
      sample's box. A sink piles attention onto the same few cells whatever the sample; a head that follows the
      object moves with the box, so its fixed cells carry little mass, and what they do carry is mostly inside the
      box. Heads with ``sink_score >= sink_min_mass`` are sink heads.
    * **Localisation score**: the mean over samples of the normalised mass inside the box. Under a uniform head it
      equals the mean box-area fraction, the same for every head, so ranking by it equals ranking by the lift over
      chance. The ``top_k`` non-sink heads are the grounding heads (ties: lower layer, then lower head first).

    ``layers``: the absolute layer numbers of the L entries of ``maps`` (default ``0..L-1``). Needs N >= 2: "the
    same cells regardless of the sample" is undefined for one sample.
    """
    if maps.dim() != 5:
        raise ValueError(f"maps must be (N, L, heads, H, W), got {tuple(maps.shape)}")
    n, n_layers, n_heads, h, w = maps.shape
    if n < 2:
        raise ValueError("head selection needs at least two calibration samples")
    if len(boxes) != n:
        raise ValueError(f"{len(boxes)} boxes for {n} samples")
    if top_k < 1 or not 1 <= sink_cells <= h * w:
        raise ValueError(f"need top_k >= 1 and 1 <= sink_cells <= {h * w}")
    layer_ids = list(range(n_layers)) if layers is None else [int(layer) for layer in layers]
    if len(layer_ids) != n_layers:
        raise ValueError(f"{len(layer_ids)} layer ids for {n_layers} layers")

    flat = maps.detach().float().clamp_min(0).reshape(n, n_layers, n_heads, h * w)
    mass = flat.sum(-1, keepdim=True)
    dist = torch.where(mass > 0, flat / mass.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(flat))

    inside = torch.zeros((n, h * w), dtype=torch.float32)
    for i, box in enumerate(boxes):
        if box.x1 > w or box.y1 > h:
            raise ValueError(f"box {i} {box.as_list()} exceeds the {h}x{w} grid")
        cell = torch.zeros((h, w), dtype=torch.float32)
        cell[box.y0 : box.y1, box.x0 : box.x1] = 1.0
        inside[i] = cell.reshape(-1)

    localisation = (dist * inside[:, None, None, :]).sum(-1).mean(0)  # (L, heads)

    fixed = dist.mean(0).topk(sink_cells, dim=-1).indices  # (L, heads, sink_cells)
    fixed_mask = torch.zeros((n_layers, n_heads, h * w), dtype=torch.float32).scatter_(-1, fixed, 1.0)
    outside = 1.0 - inside
    sink_score = (dist * fixed_mask[None] * outside[:, None, None, :]).sum(-1).mean(0)  # (L, heads)

    is_sink = sink_score >= sink_min_mass
    sink_pairs = [(layer_ids[li], hi) for li, hi in is_sink.nonzero().tolist()]
    candidates = [
        (layer_ids[li], hi, float(localisation[li, hi]))
        for li in range(n_layers)
        for hi in range(n_heads)
        if not bool(is_sink[li, hi])
    ]
    ranking = sorted(candidates, key=lambda c: (-c[2], c[0], c[1]))
    grounding = [(layer, head) for layer, head, _ in ranking[:top_k]]
    return HeadSelection(
        grounding=_as_head_map(grounding),
        sink=_as_head_map(sink_pairs),
        localisation=localisation,
        sink_score=sink_score,
        ranking=ranking,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Stage 1: tri-state pseudo-labels (spec §2.2)
# ---------------------------------------------------------------------------------------------------------------------


def padding_cells(image_wh: tuple[int, int], grid_hw: tuple[int, int]) -> torch.Tensor:
    """Bool ``(H, W)``: True where a cell of the pad-to-square image's grid is padding, not image.

    Reproduces ``get_foreground_mask(image_wh, H, min_dimension_size=1)`` (``MU:149-218``), which the reference calls
    with the *grid* side as the target size (``MU:264``): the long side spans the grid, the short side becomes
    ``max(int(short / long * H), 1)`` cells starting at ``(H - short_cells) // 2``. The end is
    ``short_cells + ceil((H - short_cells) / 2)`` (``MU:197``, ``MU:201``), so with an odd padding the image region is
    one cell longer than ``short_cells``: the cell the image only partly covers counts as image. Equal cell counts
    (square or nearly square images) mean no padding.

    ``image_wh``: (width, height) of the original image (PIL's ``size``). The grid must be square, as it is for a
    padded-to-square image.
    """
    width, height = image_wh
    gh, gw = grid_hw
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {image_wh}")
    if gh != gw or gh < 1:
        raise ValueError(f"a pad-to-square image has a square grid, got {grid_hw}")
    side = gh
    longest = max(width, height)
    # Same float expression as the reference so int() truncates identically.
    cells_h = max(int(height / longest * side), 1)
    cells_w = max(int(width / longest * side), 1)
    if cells_w > cells_h:
        x0, x1 = 0, cells_w
        y0, y1 = (side - cells_h) // 2, cells_h + math.ceil((side - cells_h) / 2)
    elif cells_h > cells_w:
        x0, x1 = (side - cells_w) // 2, cells_w + math.ceil((side - cells_w) / 2)
        y0, y1 = 0, cells_h
    else:
        x0, y0, x1, y1 = 0, 0, side, side
    pad = torch.ones((side, side), dtype=torch.bool)
    pad[y0 : min(y1, side), x0 : min(x1, side)] = False
    return pad


def _reflect_indices(n: int, pad: int) -> torch.Tensor:
    # Mirror without repeating the edge (torch/torchvision "reflect"); clamped so that a grid axis shorter than the
    # padding (where torch's reflect pad would raise) still gets in-range, non-negative values. Only the blur's
    # support matters for the box, and any padding made of in-grid values leaves it unchanged.
    i = torch.arange(-pad, n + pad)
    i = torch.where(i < 0, -i, i)
    i = torch.where(i > n - 1, 2 * (n - 1) - i, i)
    return i.clamp(0, n - 1)


def _gaussian_blur(x: torch.Tensor, kernel_size: int, sigma: float = 1.0) -> torch.Tensor:
    """torchvision ``gaussian_blur(x, kernel_size, sigma)`` on an ``(H, W)`` map: normalised separable kernel."""
    half = (kernel_size - 1) / 2
    t = torch.linspace(-half, half, steps=kernel_size, dtype=x.dtype)
    pdf = torch.exp(-0.5 * (t / sigma) ** 2)
    k1 = pdf / pdf.sum()
    pad = kernel_size // 2
    h, w = x.shape
    padded = x.index_select(0, _reflect_indices(h, pad)).index_select(1, _reflect_indices(w, pad))
    kernel = torch.outer(k1, k1)
    return F.conv2d(padded[None, None], kernel[None, None])[0, 0]


RejectReason = Literal["weak_peak", "box_too_large"]


@dataclass(frozen=True)
class Stage1Labels:
    """Result of :func:`stage1_labels`.

    ``labels``: int64 ``(H, W)`` with 1 = foreground, 0 = background, -100 = ignore; all -100 when ``rejected``.
    ``sink_mask``: attention sinks plus padding (step 1). ``fg_mask`` / ``bg_mask``: steps 2 and 4 *before* the
    rejection (kept for debugging; the reference zeroes them on rejection). ``box``: the blurred foreground box, the
    whole grid when nothing is foreground. ``peak``: ``max(g)``. ``reason``: why the sample was rejected
    (``"weak_peak"`` wins when both apply: a flat map has no box worth measuring).
    """

    labels: torch.Tensor
    sink_mask: torch.Tensor
    fg_mask: torch.Tensor
    bg_mask: torch.Tensor
    box: GridBox
    peak: float
    rejected: bool
    reason: RejectReason | None


def stage1_labels(
    grounding: torch.Tensor,
    sink: torch.Tensor | None,
    valid: torch.Tensor | None = None,
    *,
    sink_thresh: float = 1e-2,
    fg_coeff: float = 0.25,
    bg_coeff: float = 0.05,
    blur_kernel: int = 3,
    max_box_frac: float = 0.5,
    min_peak: float = 5e-3,
) -> Stage1Labels:
    """Tri-state SD-RPN target from a grounding map (spec §2.2; ``create_pseudo_labels``, ``MU:221-385``).

    ``grounding``: ``(H, W)`` answer->image attention of the grounding heads. ``sink``: ``(H, W)`` attention of the
    sink heads, or None for a backbone without sink heads (zeros, ``DQ:812``). ``valid``: bool ``(H, W)``, False on
    padding cells of a pad-to-square image (see :func:`padding_cells`); None = no padding (the reference's
    ``mask_known_bg=False``). Defaults are the Stage-1 settings (``DQ:770``, ``02_train_stage1_model.sh:72-76``).

    1. sink = ``sink >= sink_thresh`` or padding; ``g = grounding * (1 - sink)``.
    2. foreground = ``g > fg_coeff * max(g)`` (and ``g > 0``: a flat zero map has no foreground).
    3. box = bounding box of the non-zero cells of ``gaussian_blur(g * foreground, blur_kernel, sigma=1)``, i.e. the
       foreground's bounding box grown by ``blur_kernel // 2`` cells and clipped to the grid; the whole grid when
       there is no foreground (``MU:139``).
    4. background = outside the box with ``grounding * (sink < sink_thresh) < bg_coeff * max(g)``, plus padding.
    5. every other cell is ignore.
    6. rejected (all ignore) when ``max(g) < min_peak`` or the box area is ``>= max_box_frac * H * W``.
    """
    if grounding.dim() != 2:
        raise ValueError(f"grounding must be (H, W), got {tuple(grounding.shape)}")
    h, w = grounding.shape
    # float64 like the reference, where g = float32 map * float64 mask (MU:271): the fg/bg thresholds and the peak test
    # see the same numbers (a float32 5e-3 peak is just below 5e-3 and is rejected there too).
    raw = grounding.detach().to(torch.float64).cpu()
    if not bool(torch.isfinite(raw).all()):
        raise ValueError("grounding map has non-finite values")
    if sink is None:
        attn_sink = torch.zeros((h, w), dtype=torch.bool)
    else:
        if sink.shape != grounding.shape:
            raise ValueError(f"sink shape {tuple(sink.shape)} != grounding shape {tuple(grounding.shape)}")
        # Compared in the sink map's own dtype, as numpy does for a float32 array against a Python float (MU:262):
        # a float32 0.01 counts as reaching the 1e-2 threshold.
        attn_sink = sink.detach().cpu() >= sink_thresh
    if valid is None:
        padding = torch.zeros((h, w), dtype=torch.bool)
    else:
        if valid.shape != grounding.shape:
            raise ValueError(f"valid shape {tuple(valid.shape)} != grounding shape {tuple(grounding.shape)}")
        padding = ~valid.detach().cpu().bool()

    # 1. Sinks (MU:262-271).
    sink_mask = attn_sink | padding
    g = raw * (~sink_mask)
    peak = float(g.max())

    # 2. Foreground (MU:283-287): the reference zeroes g below the threshold and calls the non-zero cells foreground.
    fg_mask = (g > peak * fg_coeff) & (g > 0)

    # 3. Box (MU:289-301): the *thresholded* g is blurred (not the raw map, not the binary mask), and the box is taken
    # over blurred > 0. The kernel size is forced odd and >= 1 as in MU:290-294.
    k = max(int(blur_kernel), 1)
    if k % 2 == 0:
        k += 1
    support = _gaussian_blur(g * fg_mask, k) > 0
    rows = support.any(1).nonzero().reshape(-1)
    cols = support.any(0).nonzero().reshape(-1)
    if rows.numel() == 0:
        box = GridBox(0, 0, w, h)
    else:
        box = GridBox(int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)
    in_box = torch.zeros((h, w), dtype=torch.bool)
    in_box[box.y0 : box.y1, box.x0 : box.x1] = True

    # 4. Background (MU:319-342). The value tested is the raw grounding with only the *attention* sinks zeroed
    # (MU:322), so a sink outside the box is background; padding cells join unconditionally (MU:341-342). The
    # threshold is relative to max(g), i.e. the map with padding removed too (MU:334).
    bg_value = raw * (~attn_sink)
    bg_mask = (~in_box & (bg_value < peak * bg_coeff)) | padding

    # 6. Rejection (MU:358): keep only if area < max_box_frac * H * W and max(g) >= min_peak.
    reason: RejectReason | None = None
    if peak < min_peak:
        reason = "weak_peak"
    elif box.width * box.height >= max_box_frac * h * w:
        reason = "box_too_large"

    # 5. Labels: foreground overrides background (they are disjoint anyway: foreground lies inside the box and is
    # never padding).
    labels = torch.full((h, w), IGNORE_INDEX, dtype=torch.int64)
    if reason is None:
        labels[bg_mask] = 0
        labels[fg_mask] = 1
    return Stage1Labels(
        labels=labels,
        sink_mask=sink_mask,
        fg_mask=fg_mask,
        bg_mask=bg_mask,
        box=box,
        peak=peak,
        rejected=reason is not None,
        reason=reason,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Stage 3: consistency-aware gate labels (spec §5.2)
# ---------------------------------------------------------------------------------------------------------------------

TOP_GROUP = 2
"""How many of the highest budgets form the consensus ("oracle") group (``high_res_group_num``, ``DQ:1044``)."""

_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lowercase, strip surrounding whitespace, then delete ASCII punctuation (``DQ:1031-1037``).

    The order is the reference's: whitespace is stripped *before* punctuation is removed, so ``"yes ."`` becomes
    ``"yes "``. That matters only for the exact-equality consensus of the top budgets; matching is by substring.
    """
    return str(text).lower().strip().translate(_PUNCT)


def _contains_either(a: str, b: str) -> bool:
    return a in b or b in a


def answers_match(a: str, b: str) -> bool:
    """The reference's notion of "same answer": after :func:`normalize_answer`, either is a substring of the other.

    Known fragility kept for parity (spec §9.14): ``"1"`` matches ``"10"``, and an answer that normalises to the
    empty string (e.g. ``"?"``) matches everything.
    """
    return _contains_either(normalize_answer(a), normalize_answer(b))


def _gt_matches(target: str, gt: str, *, strip_gt_punctuation: bool) -> bool:
    # The reference normalises GT only with lower().strip(), keeping its punctuation (DQ:1050, DQ:1236), while the
    # target has its punctuation removed: a GT "3.5" never matches a target "35". Spec §5.2 says answers are
    # normalised; the code does not do it for GT. Default = the code.
    g = normalize_answer(gt) if strip_gt_punctuation else str(gt).lower().strip()
    return _contains_either(target, g)


class Ladder(Protocol):
    """One Stage-3 question: the model's answer at each token budget (``res`` ascending) and the ground truth."""

    @property
    def res(self) -> Sequence[int]: ...

    @property
    def answers(self) -> Sequence[str]: ...

    @property
    def gt(self) -> str: ...


@dataclass(frozen=True)
class LadderSample:
    """A plain :class:`Ladder`; ``payload`` carries whatever the caller needs back (image path, question, ...)."""

    res: list[int]
    answers: list[str]
    gt: str
    payload: Any = field(default=None, compare=False)

    @classmethod
    def from_official(cls, record: Mapping[str, Any]) -> LadderSample:
        """From a record of the released ``qwen*_stage3.pkl`` (keys ``res``, ``ms_answers``, ``text``)."""
        return cls(
            res=[int(r) for r in record["res"]],
            answers=[str(a) for a in record["ms_answers"]],
            gt=str(record["text"]),
            payload=record,
        )


class LadderKind(enum.StrEnum):
    """Pool-filter category of a ladder, in the order the reference tests them (``DQ:1046-1088``)."""

    UNSTABLE = "unstable"  # the two highest budgets disagree
    HALLUCINATED = "hallucinated"  # the top-budget consensus contradicts GT
    TRANSITION = "transition"  # wrong at a contiguous prefix of low budgets, right above
    NON_MONOTONE = "non_monotone"  # some wrong budget lies above a right one
    EASY = "easy"  # right at every budget


@dataclass(frozen=True)
class _Analysis:
    target: str | None  # None when unstable
    correct: list[int]
    wrong: list[int]


def _check_ladder(sample: Ladder) -> None:
    res, answers = list(sample.res), list(sample.answers)
    if not res:
        raise ValueError("a ladder needs at least one budget")
    if len(res) != len(answers):
        raise ValueError(f"{len(res)} budgets but {len(answers)} answers")
    if any(b <= a for a, b in itertools.pairwise(res)):
        raise ValueError(f"budgets must be strictly ascending, got {res}")


def _analyse(sample: Ladder) -> _Analysis:
    _check_ladder(sample)
    norm = [normalize_answer(a) for a in sample.answers]
    group = norm[-TOP_GROUP:]
    # Consensus is exact equality of the normalised strings (a Counter, DQ:1060), not the substring match: "red"
    # and "red car" at the top two budgets are unstable. With a single budget there is no vote (DQ:1064).
    target, freq = Counter(group).most_common(1)[0]
    if len(group) >= TOP_GROUP and freq < TOP_GROUP:
        return _Analysis(target=None, correct=[], wrong=[])
    correct = [i for i, a in enumerate(norm) if _contains_either(target, a)]
    wrong = [i for i, a in enumerate(norm) if not _contains_either(target, a)]
    return _Analysis(target=target, correct=correct, wrong=wrong)


def _is_prefix(indices: list[int]) -> bool:
    # DQ:1082 / DQ:1224: the wrong budgets are exactly 0..n-1 iff there are as many of them as the last one + 1.
    return not indices or len(indices) == indices[-1] + 1


def classify_ladder(sample: Ladder, *, strip_gt_punctuation: bool = False) -> LadderKind:
    """The pool-filter category of ``sample`` (``_filter_for_hard_cases``, ``DQ:1039-1094``).

    Raises ValueError for an empty ladder, mismatched lengths or budgets that are not strictly ascending.
    """
    a = _analyse(sample)
    if a.target is None:
        return LadderKind.UNSTABLE
    if not _gt_matches(a.target, sample.gt, strip_gt_punctuation=strip_gt_punctuation):
        return LadderKind.HALLUCINATED
    # "has_right" (DQ:1077) always holds: the target itself is one of the answers.
    if not a.wrong:
        return LadderKind.EASY
    return LadderKind.TRANSITION if _is_prefix(a.wrong) else LadderKind.NON_MONOTONE


S = TypeVar("S", bound=Ladder)


@dataclass(frozen=True)
class PoolResult(Generic[S]):
    """Result of :func:`filter_pool`.

    ``kept`` = ``transitions`` followed by ``easy`` (the sampled all-correct ladders), as the reference builds it.
    ``counts``: how many input ladders fell in each :class:`LadderKind`; dropped = unstable + hallucinated +
    non-monotone + the easy ladders not sampled.
    """

    kept: list[S]
    transitions: list[S]
    easy: list[S]
    counts: dict[LadderKind, int]


def filter_pool(samples: Sequence[S], *, seed: int = 0, strip_gt_punctuation: bool = False) -> PoolResult[S]:
    """Stage-3 training pool (``_filter_for_hard_cases``, ``DQ:1039-1094``; spec §5.2 steps 1-4).

    Keeps every monotone *transition* ladder (see :func:`classify_ladder`), then adds
    ``min(#transitions, #easy)`` all-correct ladders drawn without replacement by ``random.Random(seed).sample``
    (the reference uses the unseeded global RNG, ``DQ:1092``). With no transitions no easy ladder is added
    (``DQ:1091``). Unstable, hallucinated and non-monotone ladders are dropped.

    ``strip_gt_punctuation``: False (default) matches GT the reference's way (lowercase + strip only, see
    :func:`answers_match`); True also removes GT punctuation, as spec §5.2's prose implies.
    """
    transitions: list[S] = []
    easy_pool: list[S] = []
    counts = dict.fromkeys(LadderKind, 0)
    for sample in samples:
        kind = classify_ladder(sample, strip_gt_punctuation=strip_gt_punctuation)
        counts[kind] += 1
        if kind is LadderKind.TRANSITION:
            transitions.append(sample)
        elif kind is LadderKind.EASY:
            easy_pool.append(sample)
    easy: list[S] = []
    if transitions and easy_pool:
        easy = random.Random(seed).sample(easy_pool, min(len(transitions), len(easy_pool)))
    return PoolResult(kept=transitions + easy, transitions=transitions, easy=easy, counts=counts)


T = TypeVar("T")


def cap_pool(items: Sequence[T], limit: int | None, *, seed: int = 42) -> list[T]:
    """Spec §5.2 step 5: shuffle with ``random.Random(seed)`` and keep the first ``limit`` (None or -1 = all).

    Same order as the reference's ``random.seed(42); random.shuffle(...)`` (``DQ:1027-1029``).
    """
    out = list(items)
    if limit is None or limit == -1:
        return out
    if limit < 0:
        raise ValueError(f"limit must be >= 0, None or -1, got {limit}")
    random.Random(seed).shuffle(out)
    return out[:limit]


def gate_step_label(
    sample: Ladder,
    rng: random.Random,
    *,
    p_refine: float = 0.9,
    strip_gt_punctuation: bool = False,
) -> tuple[int, int]:
    """One gate training example: ``(budget, label)`` with label 1 = needs zoom, 0 = sufficient, -100 = ignore.

    ``create_high_res_signal`` (``DQ:1175-1253``), drawing from ``rng`` in the reference's order (``rng.random()``
    then ``rng.choice`` for a transition, ``rng.choice`` alone for an all-correct ladder):

    * unstable top budgets -> ignore;
    * all correct -> a random budget except the top two, label 0;
    * non-monotone -> ignore;
    * transition -> with probability ``p_refine`` one of the last two wrong budgets, label 1, but ignore if the
      consensus contradicts GT (the re-check of ``DQ:1236-1238``); otherwise a random correct budget below the top
      two, label 0, or ignore if there is none (``DQ:1244-1248``).

    An ignored example reports the lowest budget, as the reference does. Edge case (spec §9.14): an all-correct
    ladder with at most two budgets has no budget below the top two; the reference calls ``random.choice([])`` there
    and crashes with IndexError (``DQ:1222``). We return ``(res[0], -100)`` instead and draw nothing from ``rng``.
    """
    a = _analyse(sample)
    res = list(sample.res)
    ignore = (res[0], IGNORE_INDEX)
    if a.target is None:
        return ignore
    if not a.wrong:
        below_top = a.correct[:-TOP_GROUP]
        if not below_top:
            return ignore
        return res[rng.choice(below_top)], 0
    if not _is_prefix(a.wrong):
        return ignore
    if rng.random() < p_refine:
        if not _gt_matches(a.target, sample.gt, strip_gt_punctuation=strip_gt_punctuation):
            return ignore
        return res[rng.choice(a.wrong[-2:])], 1
    if len(a.correct) > TOP_GROUP:
        return res[rng.choice(a.correct[:-TOP_GROUP])], 0
    return ignore


def prediction_vs_gt_range(n_budgets: int) -> int:
    """How many of a ladder's lowest budgets :func:`prediction_vs_gt_label` draws from: all but the top two, and at
    least the lowest (``range(max(len(resolutions) - 2, 1))`` in the reference)."""
    return max(n_budgets - TOP_GROUP, 1)


def prediction_vs_gt_label(sample: Ladder, rng: random.Random) -> tuple[int, int]:
    """One gate example by the reference's ablation strategy ``high_res_signal_strategy=prediction_vs_gt``
    (``_create_high_res_signal_prediction_vs_gt``, ``DQ:1142-1173``; spec §5.2): ``(budget, label)`` with the budget
    drawn by ``rng.choice`` below the top two (the lowest alone on a ladder of at most two), and label 0 when the
    model's answer there matches GT (both :func:`normalize_answer`-ed, a substring either way, neither empty), else 1.

    Unlike :func:`gate_step_label` it needs no consensus of the top budgets: the label says whether *this* view was
    enough, judged against the annotation. Only the answers below the top two are read (the others may be ``None``).
    """
    res = list(sample.res)
    if not res:
        return 0, IGNORE_INDEX
    index = rng.choice(range(prediction_vs_gt_range(len(res))))
    return res[index], 0 if answer_right(sample.answers[index], sample.gt) else 1


def answer_right(answer: str | None, gt: str) -> bool:
    """Whether an answer counts as right against GT for the ``prediction_vs_gt`` gate labels: after
    :func:`normalize_answer` either contains the other and neither is empty (as in ``DQ:1142-1173``)."""
    pred, ref = normalize_answer(answer or ""), normalize_answer(gt)
    return bool(pred and ref) and _contains_either(pred, ref)


@dataclass(frozen=True)
class GateThreshold:
    """A gate threshold chosen on labelled scores: fire (zoom) when ``score >= value``."""

    value: float
    tpr: float  # share of the positives (label 1: the view was not enough) the gate fires on at ``value``
    fpr: float  # share of the negatives it fires on
    positives: int
    negatives: int

    @property
    def youden_j(self) -> float:
        return self.tpr - self.fpr


def _separable(scores: Sequence[float], labels: Sequence[int]) -> tuple[int, int, list[float]] | None:
    """``(positives, negatives, distinct scores ascending)``, or None when there is nothing to separate (one class
    only, or one score); ValueError on malformed input."""
    if len(scores) != len(labels):
        raise ValueError(f"{len(scores)} scores for {len(labels)} labels")
    if any(label not in (0, 1) for label in labels):
        raise ValueError("labels must be 0 (the view was enough) or 1 (it was not)")
    positives = sum(labels)
    negatives = len(labels) - positives
    distinct = sorted(set(float(s) for s in scores))
    if positives == 0 or negatives == 0 or len(distinct) < 2:
        return None
    return positives, negatives, distinct


def _rated(scores: Sequence[float], labels: Sequence[int], values: Sequence[float]) -> list[GateThreshold]:
    """Each threshold of ``values`` with the shares of the positives and of the negatives it fires on (score >= value);
    the labels hold both classes (:func:`_separable`)."""
    positives = sum(labels)
    negatives = len(labels) - positives
    rated = []
    for value in values:
        fired = [label for s, label in zip(scores, labels, strict=True) if s >= value]
        tpr, fpr = sum(fired) / positives, (len(fired) - sum(fired)) / negatives
        rated.append(GateThreshold(value=value, tpr=tpr, fpr=fpr, positives=positives, negatives=negatives))
    return rated


def youden_threshold(scores: Sequence[float], labels: Sequence[int]) -> GateThreshold | None:
    """The threshold on gate probabilities that maximises Youden's J = TPR - FPR on ``(score, label)`` pairs.

    Candidates are the midpoints between consecutive distinct scores (each splits the set exactly where a value
    between them would, and leaves the most room on either side for scores not seen here), so the result lies strictly
    inside ``(0, 1)`` for probabilities. Ties in J go to the lowest candidate: when two thresholds separate the set
    equally well, zooming more often costs time, skipping costs answers. None when the labels hold one class only
    or every score is the same (nothing to separate).
    """
    checked = _separable(scores, labels)
    if checked is None:
        return None
    _, _, distinct = checked
    midpoints = [(low + high) / 2 for low, high in itertools.pairwise(distinct)]
    return max(_rated(scores, labels, midpoints), key=lambda t: t.youden_j)  # max keeps the first (lowest) of ties


def recall_threshold(
    scores: Sequence[float], labels: Sequence[int], min_tpr: float, max_fpr: float | None = None
) -> GateThreshold | None:
    """The highest threshold on gate probabilities that still fires on at least ``min_tpr`` of the positives.

    The gate's job is asymmetric: a missed zoom costs an answer, a needless one costs time. Youden's J weighs both
    alike; this rule fixes the share of wrong views the gate must catch (the recall a deployment promises) and then
    zooms as little as that allows (the highest such threshold has the lowest FPR). Candidates are the midpoints of
    :func:`youden_threshold`, plus half the lowest score (fire on everything), so ``min_tpr=1`` always has an answer.
    None when the labels hold one class only or every score is the same.

    ``max_fpr`` bounds the other rate too (the share of right views zoomed on, i.e. one minus the skip rate). Where
    the threshold above fires on at most that share of the negatives it is the answer, as without the bound. Where it
    fires on more, no threshold meets both bounds (a higher one catches fewer positives), and the rule takes the one
    that misses them least: the smallest ``max(min_tpr - TPR, FPR - max_fpr)``, ties to the lowest threshold. Why:
    the recall alone holds the fire rate from run to run but lets the skip rate fall wherever the right views score
    high (a rerun of the demo recipe skipped 66.7% at FPR 0.35, docs/demo_model.md); splitting the shortfall keeps
    both near their bounds.
    """
    if not 0.0 < min_tpr <= 1.0:
        raise ValueError(f"min_tpr is a share of the positives in (0, 1]; got {min_tpr}")
    if max_fpr is not None and not 0.0 <= max_fpr < 1.0:
        raise ValueError(f"max_fpr is a share of the negatives in [0, 1); got {max_fpr}")
    checked = _separable(scores, labels)
    if checked is None:
        return None
    _, _, distinct = checked
    candidates = [distinct[0] / 2] + [(low + high) / 2 for low, high in itertools.pairwise(distinct)]
    rated = _rated(scores, labels, candidates)  # ascending by value: TPR and FPR fall as the threshold rises
    recall_met = [t for t in rated if t.tpr >= min_tpr]  # never empty: the lowest candidate fires on every score
    chosen = recall_met[-1]  # the highest: the first that reaches min_tpr from above zooms least
    if max_fpr is None or chosen.fpr <= max_fpr:
        return chosen
    return min(rated, key=lambda t: max(min_tpr - t.tpr, t.fpr - max_fpr))  # min keeps the first (lowest) of ties


# ---------------------------------------------------------------------------------------------------------------------
# Stage 2: regression mining with a judge (spec §6)
# ---------------------------------------------------------------------------------------------------------------------

JUDGE_SYSTEM_PROMPT = (
    "You grade answers to visual questions. Judge whether the meaning is right; do not insist on an exact string."
)

JUDGE_PROMPT = """\
Two models answered the same question about an image. Decide, for each, whether its answer is correct when compared \
with the reference answer.

Question: {question}
Reference answer: {ground_truth}
Answer of model A: {answer_a}
Answer of model B: {answer_b}

How to judge:
1. An answer that states the reference value inside a longer sentence is correct (reference "6000", answer \
"It costs 6000 dollars").
2. Usual synonyms and equivalent forms are correct ("Yes" and "True"; "10%" and "0.1").
3. Differences in punctuation, capitalisation or formatting do not matter ("april" and "April").
4. Say No only when the answer is factually wrong or leaves out the key information.

Reply with exactly these two lines and nothing else:
A: Yes/No
B: Yes/No"""
"""User prompt of the text-only LLM judge (our wording of ``qwen_src/README.md:111-149``); fill it with
:func:`format_judge_prompt`. Model A = the base model on the global image, model B = the zoomed (RoI) model."""


def format_judge_prompt(question: str, ground_truth: str, answer_a: str, answer_b: str) -> str:
    """:data:`JUDGE_PROMPT` with its four fields filled (the values are inserted verbatim, braces included)."""
    return JUDGE_PROMPT.format(question=question, ground_truth=ground_truth, answer_a=answer_a, answer_b=answer_b)


# A label (A or B, not glued to a preceding letter or digit), a colon, optional markdown/brackets, then one word;
# the slash is part of the word so that an echoed template "A: [Yes/No]" is rejected rather than read as Yes.
_VERDICT = re.compile(r"(?<![A-Za-z0-9])([AB])\s*\**\s*[:：]\s*[*_\[(\s]*([A-Za-z/]*)", re.IGNORECASE)


def parse_judge_reply(text: str) -> tuple[bool, bool]:
    """``(A correct, B correct)`` from a judge reply in the ``A: Yes/No`` / ``B: Yes/No`` format.

    Tolerant of case, whitespace, markdown emphasis, brackets and trailing punctuation (``"**a:** [YES]."``), and of
    both verdicts on one line. Raises ValueError when a verdict is missing, is not Yes/No, or is given twice with
    different values.
    """
    verdicts: dict[str, set[bool]] = {"A": set(), "B": set()}
    for match in _VERDICT.finditer(text):
        label, word = match.group(1).upper(), match.group(2).lower()
        if word not in ("yes", "no"):
            raise ValueError(f"judge verdict for {label} must be Yes or No, got {word or '(nothing)'!r} in {text!r}")
        verdicts[label].add(word == "yes")
    for label, values in verdicts.items():
        if not values:
            raise ValueError(f"judge reply has no '{label}: Yes/No' line: {text!r}")
        if len(values) > 1:
            raise ValueError(f"judge reply gives {label} both Yes and No: {text!r}")
    return verdicts["A"].pop(), verdicts["B"].pop()


Judge = Callable[[str, str, str, str], tuple[bool, bool]]
"""``judge(question, ground_truth, answer_a, answer_b) -> (a_correct, b_correct)``."""


def _canonical(text: str) -> str:
    return " ".join(normalize_answer(text).split())


def exact_match_judge(question: str, ground_truth: str, answer_a: str, answer_b: str) -> tuple[bool, bool]:
    """Offline judge: an answer is correct iff it equals GT after normalisation and whitespace collapsing.

    Stricter than the LLM judge (no containment, no synonyms), for both answers: its "A right" is reliable, but its
    "B wrong" also fires on a correct paraphrase, so mined regressions need the LLM judge (or a check) before
    training. Meant for tests and offline dry runs. ``question`` is unused.
    """
    del question
    gt = _canonical(ground_truth)
    return _canonical(answer_a) == gt, _canonical(answer_b) == gt


def llm_judge(generate: Callable[[str, str], str]) -> Judge:
    """A :data:`Judge` backed by a chat model: ``generate(system_prompt, user_prompt) -> reply``.

    The reply goes through :func:`parse_judge_reply`, so a malformed reply raises ValueError (callers mining a large
    pool typically catch it and skip the sample).
    """

    def judge(question: str, ground_truth: str, answer_a: str, answer_b: str) -> tuple[bool, bool]:
        reply = generate(JUDGE_SYSTEM_PROMPT, format_judge_prompt(question, ground_truth, answer_a, answer_b))
        return parse_judge_reply(reply)

    return judge


def is_regression(
    coarse_answer: str,
    zoom_answer: str,
    gt: str,
    judge: Judge = exact_match_judge,
    *,
    question: str = "",
) -> bool:
    """True for a Stage-2 *regression* sample: the coarse (global-only) answer is right and the zoomed one wrong.

    That is the judge's ``A: Yes, B: No`` (spec §6), with A = ``coarse_answer`` and B = ``zoom_answer``.
    """
    coarse_ok, zoom_ok = judge(question, gt, coarse_answer, zoom_answer)
    return coarse_ok and not zoom_ok
