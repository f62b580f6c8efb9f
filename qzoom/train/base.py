"""Training the demo model's backbone from scratch on the synthetic high-res benchmark (spec/offline_stack.md §4).

Contract:

* :func:`build_demo_model` makes a randomly initialised Qwen2.5-VL of a few million parameters (the stock
  architecture: windowed ViT, 2x2 merger, M-RoPE, GQA) with the byte tokenizer and the offline processor, and the
  Q-Zoom branch fields in its config (the branches are copied from the backbone after training; Stages 1-3 train
  them). Its pixel budget is the benchmark's small one: at most :data:`~qzoom.evals.synthetic.COARSE_TOKENS` merged
  tokens per view, and as few as :data:`MIN_VIEW_TOKENS` so that a small zoom crop is not upsampled.
* :func:`train_base` trains it on the benchmark's *train* split with a curriculum and writes an HF checkpoint.
  Phase 0 trains the vision tower alone to read: small :func:`reading_drill` images (one plate detail drawn as on
  a plate, 56-84 px) with a per-token cross-entropy through a linear head that is dropped afterwards (which glyph,
  shape or pattern each merged token shows, which glyph of a code it is, and the colour of the plate it is on); a
  quarter of its steps are whole coarse views of benchmark items, each token labelled with the colour and kind
  (plate, large region, large frame) of the object under it, so that a question's colour word can find its plate.
  With the answer loss alone a from-scratch model of this size sat at the answer priors for 900+ steps (the ViT
  gets its signal only through decoder attention that is itself untrained), and a 14 px-patch ViT needs many
  samples to see a glyph at every offset inside a patch, so cheap samples come first. The tower then stays as
  phase 0 left it (``freeze_vision``). *Drills* train the decoder on :func:`answer_drill` images: one or two
  plates alone on a grey ground, 8-30 tokens, with the family's question (the answer characters from the glyph
  tokens, in a code's order, and the plate by the question's colour word). *Crops* follow: native-resolution crops
  around the target with the answer loss (short sequences first, the §4 finding that this is what gets a
  from-scratch model off the ground; with the tower unfrozen the reading loss on :func:`reading_targets` of the
  crop rides along). The *mixed* phase mixes those crops with the coarse view of the coarse families (colour,
  count), a few coarse views of detail questions, and the fused sequence Q-Zoom feeds (coarse view + a native crop
  spliced after it with the engine's aligned M-RoPE positions) for every family. In the crop and mixed phases a
  share of the steps are whole views: *scenes* (detail items on small canvases, seen whole 1-3x below native
  scale, several plates in view, so the question's colour or position word has to pick the plate) and coarse
  views of the coarse families; scenes are what teach the model to look at the named plate, which Stage 1 distils.
  A *codes* phase (``code_steps``) then trains on crops and fused sequences of codes alone.
  The last phase, *ground*, shows coarse views at the benchmark's canvas sizes, detail questions and the coarse
  families', with the grounding loss weighted up and the answer loss down: the view Stage 1 mines its labels on;
  half of its steps are mixed-phase batches, so that reading is not lost meanwhile.
  The loss is on the answer tokens and ``<|im_end|>`` only. Seeded: the same recipe gives the same weights as far
  as torch's CPU kernels are deterministic.
* :func:`view_accuracy` is the quick teacher-forced check used between phases: greedy decoding reproduces the answer
  exactly when the argmax at every answer position is the answer's token, so one forward pass scores a batch.

Every sequence is built by the inference engine's own steps (``prepare``, ``embed``, ``splice``), so training sees
exactly the token layout and positions that ``qzoom ask`` produces.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from qzoom import roi
from qzoom.checkpoint import save_checkpoint
from qzoom.engine import MIN_BOX_SIDE, ImageBlock, Proposal, QZoomEngine, SequenceState
from qzoom.evals.synthetic import (
    ANSWER_VOCAB,
    COARSE_FAMILIES,
    COARSE_TOKENS,
    CODE_ALPHABET,
    CODE_FAMILIES,
    CODE_LENGTH,
    COLOURS,
    DETAIL_FAMILIES,
    FAMILIES,
    PATCH_PX,
    PATTERNS,
    POSITIONS,
    SHAPES,
    TEMPLATES,
    PlateKind,
    SyntheticItem,
    boxes_overlap,
    crop_box_around,
    crop_with_answer,
    detail_size,
    detail_value,
    generate_item,
    iterate,
    plate_fill,
    render_detail,
    render_plate,
)
from qzoom.modeling import QZoomQwen2_5_VLForConditionalGeneration, enable_qzoom
from qzoom.offline import (
    NO_DEFAULT_SYSTEM_CHAT_TEMPLATE,
    OfflineQwen2_5_VLProcessor,
    build_processor,
    build_tokenizer,
    tiny_qwen25vl_config,
)
from qzoom.schemas import AskOptions

MIN_VIEW_TOKENS = 4  # a 56x56 crop stays at native resolution instead of being upsampled to the coarse budget
View = Literal["crop", "coarse", "fused"]


@dataclass(frozen=True)
class BaseRecipe:
    """Everything that determines the base model; the defaults are the shipped ``qzoom-tiny``."""

    seed: int = 0
    families: tuple[str, ...] = FAMILIES  # benchmark families trained on
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    vision_hidden_size: int = 128
    vision_depth: int = 2
    vision_heads: int = 2
    twig_k: int = 2  # the SD-RPN and the gate branch after layer K (KV reuse below it)
    twig_t: int = 2
    lr: float = 1e-3  # side by side: 5e-4 learned the pattern family more slowly; 2e-3 stalled at the answer priors
    weight_decay: float = 0.01
    warmup_steps: int = 30
    batch_size: int = 24  # crops: the per-step overhead dominates small crops, so samples are cheap
    mixed_batch_size: int = 8  # mixed: sequences of 300-600 tokens
    crop_steps: int = 800  # native crops (and whole views, see `scene_frac`); after the drills (see `drill_steps`)
    # The first crop steps: crops of letters, shapes and patterns only, no whole views. Without drills (from a
    # phase-0 tower) letters alone reached 80% in 250 steps, while mixed with codes and shapes they stayed at chance
    # for 400 (one glyph to find before a code's three in order); the drills now teach that first.
    single_steps: int = 0
    mixed_steps: int = 150  # crops, coarse views of coarse families, fused sequences
    pool_size: int = 128  # benchmark items held at once; `refresh` of them are replaced by new ones every step
    refresh: int = 1
    crop_min: int = 112  # side of the native crops, pixels: up to `crop_max_phase1` in the crop phase (short
    crop_max_phase1: int = 168  # sequences first), up to `crop_max` later (the largest zoom boxes of a 4096 px canvas)
    crop_max: int = 448
    # Mixed-phase batch mix: detail crops, fused sequences (detail and coarse families), coarse views (coarse families)
    mix_crop: float = 0.25
    mix_fused: float = 0.5  # the rest: coarse views
    coarse_detail_frac: float = 0.25  # of the coarse views, detail questions (see `_draw_batch`)
    # Of the fused sequences of detail questions, this share has two crops: the target's and a look-alike's, in either
    # order (`ExampleBuilder.fused`). Why: the shipped boxes are the SD-RPN's two heaviest blobs, and on r12 (val,
    # forced zoom) a second crop beside the target's took the codes read from 38% to 20% (`code`) and from 29% to 4%
    # (`code_at`): the model had only ever seen one crop after the coarse view (docs/demo_model.md). 0: none (r12).
    fused_decoy_frac: float = 0.0
    # Phase 0: the vision tower alone on the reading loss, large batches of `reading_drill` images (no decoder: about
    # 280 a second on 2 cores); if the tower is not frozen afterwards, the loss rides along on crops at `read_weight`.
    # The frozen tower is what bounds reading: a linear probe of the tower's tokens named a code glyph on 74% of
    # held-out crops after 1500 steps, 83% after 3000 and 89-91% after 6000 (patterns 62% -> 88% -> 100%), and the whole
    # recipe read 35.8%, 52.6% and 61.4% of the card's detail questions through the true box, Q-Zoom 22.8%, 32.6%
    # (40.9% with the later boxes) and 54.9% (docs/demo_model.md). A phase-0 step costs about a tenth of a later one;
    # 6000 of them are about 14 minutes of the recipe on a slow 2-core machine.
    read_steps: int = 6000
    read_lr: float = 2e-3
    read_batch_size: int = 64
    read_side_max: int = 84  # phase-0 images are 56 or 84 px (see `reading_drill`)
    read_weight: float = 1.0  # only while the tower trains after phase 0 (see `freeze_vision`)
    # A share `read_coarse_frac` of phase 0's steps are `read_coarse_batch` whole coarse views of pooled benchmark
    # items instead, each token labelled with the colour and kind of the object it lies on (`coarse_reading_targets`):
    # the tower learns colours where the question's colour word has to find its plate, not only on native cards.
    read_coarse_frac: float = 0.25
    read_coarse_batch: int = 4
    # After phase 0 the vision tower stays as it is: side by side over 400 crop steps from the same phase-0 tower,
    # shapes reached 76% exact match with it frozen and 35% with it trained on the answer loss (which at first
    # pulls the tower's reading apart before the decoder knows where to look).
    freeze_vision: bool = True
    # Drills: the decoder (tower frozen) on `answer_drill` images: one plate, or two of different colours, alone on a
    # grey ground (8-30 tokens), with the family's question and the answer loss. From one phase-0 tower, 800 drill
    # steps of single plates (batch 48, 400 s) read 61% of whole codes and 89% of letters on drills and transferred
    # to plate-sized crops (a benchmark crop costs several drills). Whole recipes side by side (README "The demo
    # model"): 600 drills + 800 crop steps read letters on 100% of crops and fused sequences, shapes and patterns on
    # 71%, where 1200 crop steps without drills read 71% / 57% (letters) and 43-71% (shapes, patterns).
    drill_steps: int = 600
    drill_batch_size: int = 48
    drill_pair_frac: float = 0.5  # two plates: the question's colour word picks the one to read
    # Of the pair drills of codes, this share puts the two plates in different quadrants of the drill and names the
    # one to read by its quadrant (the `code_at` question). Why: r12's SD-RPN held a `code_at` target in its heaviest
    # box on 30 of 69 val questions against 63 of 69 for colour-named codes: the quadrant word was bound far less, and
    # the drills had only ever named plates by colour (docs/demo_model.md). 0: none (r12).
    drill_position_frac: float = 0.0
    # Grounding: the answer->image attention of `ground_heads` ((layer, head) pairs) is taught to rest on the plate
    # the question names (`_grounding_loss`, weight `ground_weight`), in every view where the target is in sight:
    # drills, crops, scenes, coarse views of detail questions (where it cannot be read, only found by its colour or
    # quadrant) and the coarse part of fused sequences. Why: Q-Zoom assumes a base model that looks where the answer
    # is, as a pretrained VLM does after its grounding data; from the answer loss alone this model's heads stayed
    # flat over the coarse view (localisation 0.08-0.14 on every head, docs/demo_model.md). Only base training
    # items carry boxes here; Stage 1 still distils from the attention alone, on items it never sees a box of.
    ground_weight: float = 0.3
    ground_heads: tuple[tuple[int, int], ...] = ((2, 0), (3, 0))
    # Referent: a linear head on the input of layer K (where the SD-RPN and the gate branch, and where the grounding
    # heads' queries start) is taught which colour or quadrant the question names, at the positions that predict the
    # answer (`_referent_loss`, weight `referent_weight`; the head is dropped afterwards). The text alone sets the
    # label, never a box. Why: the grounding heads found *a* plate but the named one only 60% of the time, and a
    # linear probe there named the question's colour on 75% of coarse views (93% on drills), while the plates'
    # colour was 100% linearly readable on the image side: the question's word did not reach the query. With 256
    # image tokens in view the word's few bytes are hard to find at first; on short sequences the layers below K
    # learn it in 50 steps. So `referent_steps` steps of tiny sequences (a blank 56 px image, a detail question with
    # a random colour or quadrant) come first, right after phase 0, and the loss then rides along everywhere. Side by
    # side from one phase-0 tower, 400 steps of coarse views with the grounding loss: the heads' peak on the named
    # plate 40-55% without, 92% with it (colour-named questions 48 of 48; quadrants 7 of 12) (docs/demo_model.md).
    referent_steps: int = 100
    referent_batch_size: int = 64
    referent_weight: float = 1.0
    # Pointer: at the position that predicts each answer character, the attention of `pointer_heads` is taught to rest
    # on the image token that shows that character (a code's glyph in order; the one token of a letter, shape or
    # pattern), wherever the example knows it (`answer_pointers`: drills, crops and the crop of fused sequences; weight
    # `pointer_weight`). Why: codes were read with the first glyph right and the rest repeated ("XKX" for "XKR"): the
    # decoder found the plate but did not step along it, and the answer loss alone teaches that slowly.
    pointer_weight: float = 0.3
    pointer_heads: tuple[tuple[int, int], ...] = ((3, 2),)
    # Scenes: whole detail items on small canvases (`scene_min_side`..`scene_max_side`), seen whole at the budget (1x to
    # 3x below native scale, several plates in view). To answer, the model has to find the plate the question names and
    # read it in one view; that habit is what puts its answer->image attention on the named plate in the coarse view of
    # a large canvas too, where Stage 1 distils the SD-RPN from it. A step is a batch of whole views with probability
    # `scene_frac`: half scenes, half coarse views of the coarse families (its own batch: 256-token sequences beside
    # 16-token crops would be mostly padding).
    # Side by side (1200 crop steps): 448-1344 px canvases gave the best crops and Stage-1 labels; 336-448 px (all
    # native) and 256-672 px at scene_frac 0.5 did worse on both (docs/demo_model.md).
    scene_frac: float = 0.3
    scene_batch_size: int = 6
    scene_min_side: int = 448
    scene_max_side: int = 1344
    # Ground: the last phase, coarse views at the benchmark's canvas sizes, `ground_detail_frac` of them detail
    # questions, with the grounding loss at `ground_phase_weight` and the answer loss at `ground_answer_weight` (the
    # plate can be found there by its colour or quadrant, not read). Why: the earlier phases teach the grounding
    # heads mostly on crops and fused sequences, where the answer is in sight; in the coarse view (what Stage 1
    # distils) the taught heads put 0.21 of their image attention on the named plate's cells after them, and more
    # on the other plates; 300 steps of this phase (lr 5e-4, batch 8) raised it to 0.40 (docs/demo_model.md).
    # Half of its views are the coarse families': 500 steps so took the coarse view's colour answers from 14% to 57%
    # (the 48 val checks; no other phase shows them as often), at a cost to reading (crop letters 86% -> 57%, fused
    # letters 57% -> 29%). Hence `ground_mixed_frac`: that share of its steps are mixed-phase batches (crops, fused
    # sequences, coarse views) at the ordinary loss weights. Side by side from the same mixed-phase model, 500 own
    # steps vs 750 steps half mixed: crops letter 57% vs 86%, pattern 29% vs 71%; fused letter 29% vs 57%, shape
    # 43% vs 100%; coarse colour 57% vs 71%; with the target's own box the pipeline read 30% vs 45% of 60 val detail
    # items (docs/demo_model.md). The heads' aim did not change (the SD-RPN's peak on the target 33% vs 32%).
    # Codes: a phase of codes alone between the mixed and ground phases, `code_steps` batches of `mixed_batch_size`,
    # half native crops, half fused sequences of the detail pool's `code` and `code_at` items (a fresh code drawn on the
    # target each time, so the pool need not refresh), on its own cosine schedule peaking at `code_lr` and its own
    # random stream (so the ground phase's batches stay as they were without it). Why: the decoder read a whole code
    # through the true box on 30-45% of r12's questions where the tower's glyph tokens allow about 65%, the middle glyph
    # worst (per-position 74% / 49% / 79% on 80 val `code` questions, often the first glyph again), and the other phases
    # show it about 400 fused code sequences in all (the mixed batches of the mixed and ground phases). 400 such steps
    # from r12's weights took whole codes through the true box from 24 to 41 of 80 (`code_at` 36 to 40). In the whole
    # recipe (r14, shipped) Q-Zoom read 47% of the card's `code` questions against 30% for r12 and 19% for its rerun,
    # and 58.1% of the detail questions against 54.9% and 51.6%, for about 4.5 more minutes (docs/demo_model.md). 0:
    # none (r12's recipe).
    code_steps: int = 400
    code_lr: float = 3e-4
    ground_steps: int = 750
    ground_lr: float = 5e-4
    ground_detail_frac: float = 0.5
    ground_mixed_frac: float = 0.5
    ground_phase_weight: float = 1.0
    ground_answer_weight: float = 0.3
    # The answer loss of coarse views of detail questions at the benchmark's sizes (mixed and ground phases), where
    # the detail cannot be read (that is the benchmark's design): 1 trains the answer there like any other; 0 keeps
    # those views for the grounding and referent losses only, so the decoder is not taught to answer unread details
    # from the answer prior.
    unreadable_answer_weight: float = 1.0
    # Downscaled details: a share `zoom_frac` of the reading drills and the crops is drawn up to `zoom_max` times
    # larger and resized down to its side. Why: a plate's card is 1.6 coarse cells a side (evals.synthetic), so the
    # SD-RPN's box on a large canvas spans 2-4 cells, up to 1000 px, which the processor resizes to the 448 px budget.
    zoom_frac: float = 0.35
    zoom_max: float = 2.0

    @property
    def max_pixels(self) -> int:
        return COARSE_TOKENS * PATCH_PX * PATCH_PX

    @property
    def min_pixels(self) -> int:
        return MIN_VIEW_TOKENS * PATCH_PX * PATCH_PX


def build_demo_model(recipe: BaseRecipe) -> tuple[QZoomQwen2_5_VLForConditionalGeneration, OfflineQwen2_5_VLProcessor]:
    """A randomly initialised (seeded) demo model and its processor, at the benchmark's small pixel budget; its chat
    template has no default system prompt (:data:`~qzoom.offline.NO_DEFAULT_SYSTEM_CHAT_TEMPLATE`)."""
    tok = build_tokenizer()
    tok.chat_template = NO_DEFAULT_SYSTEM_CHAT_TEMPLATE
    config = tiny_qwen25vl_config(
        tok,
        hidden_size=recipe.hidden_size,
        num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_kv_heads,
        vision_hidden_size=recipe.vision_hidden_size,
        vision_depth=recipe.vision_depth,
        vision_heads=recipe.vision_heads,
    )
    enable_qzoom(config, twig_K=recipe.twig_k, twig_T=recipe.twig_t)
    config.min_pixels = recipe.min_pixels
    config.max_pixels = recipe.max_pixels
    torch.manual_seed(recipe.seed)
    model = QZoomQwen2_5_VLForConditionalGeneration(config)
    processor = build_processor(tok, min_pixels=recipe.min_pixels, max_pixels=recipe.max_pixels)
    return model, processor


# ---------------------------------------------------------------------------------------------------- examples


@dataclass
class Example:
    """One teacher-forced sequence: prompt + answer + <|im_end|>, its positions, its images' pixels."""

    input_ids: torch.Tensor  # (n,)
    positions: torch.Tensor  # (3, n) float32 M-RoPE
    labels: torch.Tensor  # (n,) -100 except the answer tokens and <|im_end|>
    pixel_values: list[torch.Tensor]  # per image (patches, dim), in sequence order
    grids: list[torch.Tensor]  # per image (3,)
    family: str
    view: View
    reading: torch.Tensor | None = None  # (merged tokens of the one image, len(READ_CLASSES)) for crops
    target: torch.Tensor | None = None  # sequence indices of the image tokens that show the target (grounding)
    referent: int | None = None  # index in REFERENTS of the colour or quadrant the question names (text only)
    answer_weight: float = 1.0  # of this sample's answer loss (see `BaseRecipe.unreadable_answer_weight`)
    # (sequence position that predicts an answer character, sequence indices of the image tokens that show it)
    pointer: list[tuple[int, torch.Tensor]] | None = None
    # Per image: a key under which its vision features may be kept while the tower is frozen (the same pixels every
    # time: a pooled item's coarse view or its fixed zoom crop), or None (drawn afresh: crops, drills).
    image_keys: list[str | None] | None = None


@dataclass
class PoolItem:
    """What training keeps of a benchmark item: its coarse view and, for detail items, the target's neighbourhood at
    native resolution (a 4096 px canvas is 50 MB; this is a few).

    ``item.image`` is the neighbourhood, whose top-left pixel sits at ``origin`` on the canvas; ``item.canvas``,
    ``item.box`` and ``item.scene`` keep canvas coordinates. Coarse items carry ``zoom``: the crop of their ground-truth
    region at the view budget, and its grid box (what a zoom on them would show). Detail items pooled with
    ``decoy`` carry one (where another plate's cells stay clear of the target's): the crop of that plate's coarse cells
    at the view budget, and its grid box (what a zoom on a look-alike shows: the second box of an SD-RPN that lit
    both, see :meth:`ExampleBuilder.fused`).
    """

    item: SyntheticItem
    origin: tuple[int, int]
    coarse: Image.Image  # the whole canvas at the budget, resized exactly as the processor would
    grid_hw: tuple[int, int]
    zoom: tuple[Image.Image, roi.GridBox] | None = None
    decoy: tuple[Image.Image, roi.GridBox] | None = None
    # The processor's output for ``coarse`` and the zoom crop, made on first use: an item is drawn many times.
    pixels: dict[str, tuple[torch.Tensor, torch.Tensor]] = dataclasses.field(default_factory=dict)


def _budget_size(wh: tuple[int, int], min_pixels: int, max_pixels: int) -> tuple[int, int]:
    h, w = smart_resize(wh[1], wh[0], factor=PATCH_PX, min_pixels=min_pixels, max_pixels=max_pixels)
    return w, h


def pool_item(item: SyntheticItem, min_pixels: int, max_pixels: int, reach: int, decoy: bool = False) -> PoolItem:
    """Shrink ``item`` to what the examples need; crops reach at most ``reach`` pixels beyond the target's box. With
    ``decoy``, a detail item also keeps a look-alike's crop (:attr:`PoolItem.decoy`)."""
    coarse_wh = _budget_size(item.canvas, min_pixels, max_pixels)
    coarse = item.image.resize(coarse_wh, Image.Resampling.BICUBIC)  # the PIL processor's resample
    grid_hw = (coarse_wh[1] // PATCH_PX, coarse_wh[0] // PATCH_PX)
    width, height = item.canvas
    if item.needs_detail:
        # A fused example's box is the target's cells grown by up to one cell per side, each cell up to this big.
        cell = max(width / grid_hw[1], height / grid_hw[0])
        pad = max(reach, math.ceil(2 * cell) + PATCH_PX)
        x0, y0, x1, y1 = item.box
        region = (max(0, x0 - pad), max(0, y0 - pad), min(width, x1 + pad), min(height, y1 + pad))
        kept = dataclasses.replace(item, image=item.image.crop(region))
        decoy_view = _decoy_crop(item, grid_hw, min_pixels, max_pixels) if decoy else None
        return PoolItem(kept, (region[0], region[1]), coarse, grid_hw, decoy=decoy_view)
    grid_box = _grid_box_around(item.box, grid_hw, item.canvas, None)
    zoom = _budget_crop(item, grid_box, grid_hw, min_pixels, max_pixels)
    kept = dataclasses.replace(item, image=Image.new("RGB", (1, 1)))
    return PoolItem(kept, (0, 0), coarse, grid_hw, (zoom, grid_box))


def _budget_crop(
    item: SyntheticItem, grid_box: roi.GridBox, grid_hw: tuple[int, int], min_pixels: int, max_pixels: int
) -> Image.Image:
    """The crop of ``item``'s whole canvas that a zoom on ``grid_box`` cuts, resized to the view budget exactly as the
    processor would: fixed once per pooled item, its features can be kept."""
    pb = roi.grid_box_to_pixels(grid_box, grid_hw, item.canvas, min_side=MIN_BOX_SIDE)
    crop = item.image.crop((pb.x0, pb.y0, pb.x1, pb.y1))
    return crop.resize(_budget_size(crop.size, min_pixels, max_pixels), Image.Resampling.BICUBIC)


def _decoy_crop(
    item: SyntheticItem, grid_hw: tuple[int, int], min_pixels: int, max_pixels: int
) -> tuple[Image.Image, roi.GridBox] | None:
    """The crop of the coarse cells covering a plate other than the target (one of the target's kind if there is one:
    a look-alike), at the view budget, and its grid box; None when no other plate's cells stay clear of the
    target's."""
    scene = item.scene
    if scene.target is None:
        return None
    target = scene.plates[scene.target]
    aim = roi.covering_grid_box(item.box, grid_hw, item.canvas)
    others = [plate for i, plate in enumerate(scene.plates) if i != scene.target]
    for plate in sorted(others, key=lambda plate: plate.kind != target.kind):  # look-alikes first
        grid_box = roi.covering_grid_box(plate.box, grid_hw, item.canvas)
        if not boxes_overlap(grid_box.as_list(), aim.as_list()):
            return _budget_crop(item, grid_box, grid_hw, min_pixels, max_pixels), grid_box
    return None


def _grid_box_around(
    box: Sequence[float], grid_hw: tuple[int, int], wh: tuple[int, int], rng: random.Random | None
) -> roi.GridBox:
    """The coarse-grid cells covering ``box``, grown by 0-1 cells per side at random (``rng``), or not at all: what
    an SD-RPN that found the target proposes (its thresholded blob is rarely tight)."""
    grow = (0, 0, 0, 0) if rng is None else (rng.randint(0, 1), rng.randint(0, 1), rng.randint(0, 1), rng.randint(0, 1))
    return roi.covering_grid_box(box, grid_hw, wh, grow=grow)


# The reading head's classes, in groups that are each a softmax with one more class, "nothing" (see `_reading_loss`):
# what a token shows (letters are a subset of the code alphabet), which glyph of a code it is, the colour of the
# object it is on, and what kind of object that is.
READ_GROUPS: tuple[tuple[str, ...], ...] = (
    (*CODE_ALPHABET, *SHAPES, *PATTERNS),
    tuple(f"glyph {i + 1}" for i in range(CODE_LENGTH)),
    tuple(f"on {colour}" for colour in COLOURS),
    ("is plate", "is region", "is frame"),
)
READ_CLASSES: tuple[str, ...] = tuple(name for group in READ_GROUPS for name in group)
READ_LOGITS = len(READ_CLASSES) + len(READ_GROUPS)  # the reading head's outputs: each group and its "nothing"
COARSE_READ_GROUPS = (2, 3)  # what the coarse view's tokens are labelled with: colour and kind of object, no glyphs
# A coarse token is labelled with the object that covers at least this share of it: a plate's 44 px card covers at
# least 60% of some token wherever it lies; a large frame's ring is 3-8 coarse pixels wide, a tenth to a third.
_COARSE_COVER = {"plate": 0.3, "region": 0.3, "frame": 0.12}


# What a detail question can name its plate by: a colour word or a quadrant (the referent head's classes).
REFERENTS: tuple[str, ...] = (*COLOURS, *POSITIONS)


def referent_of(question: str) -> int | None:
    """Index in :data:`REFERENTS` of the colour or quadrant ``question`` names ("the blue frame", "the top left
    frame"), or None: read from the words alone, the label of the referent head (:func:`_referent_loss`)."""
    words = f" {question.lower()} "
    found = [i for i, name in enumerate(REFERENTS) if f" {name} " in words]
    return found[0] if len(found) == 1 else None


def _mark(targets: torch.Tensor, token: int, name: str) -> None:
    targets[token, READ_CLASSES.index(name)] = 1.0


def reading_targets(
    crop: Image.Image,
    plate_box: tuple[int, int, int, int],
    border: int,
    family: str,
    answer: str,
    grid_hw: tuple[int, int],
    colour: str | None,
) -> torch.Tensor:
    """What each merged token of a native crop shows: (gh * gw, len(READ_CLASSES)) multi-hot, row-major.

    A token is marked with a character when that glyph's centre lies in it (codes: the ink's columns split into one
    run per glyph, or into equal thirds where glyphs touch) and, for a code, with the glyph's place in it; with a
    shape or pattern when the ink's centre does; and with the plate's ``colour`` and "is plate" when its centre lies on
    the card inside the border (not when ``colour`` is None). Found from the crop's own pixels (dark ink on the light
    plate inside its border), so it holds for any answer drawn.

    Why: from scratch, the answer loss alone reaches the vision tower only through the decoder's attention to the
    right tokens, which is itself untrained, and both sit at the answer priors for thousands of samples. This dense
    per-token loss (a linear head on the merger's output, dropped after training) teaches the ViT to see glyphs
    directly, in order and on which plate; the decoder then only has to learn where to look.
    """
    gh, gw = grid_hw
    targets = torch.zeros(gh * gw, len(READ_CLASSES))
    sx, sy = gw * PATCH_PX / crop.width, gh * PATCH_PX / crop.height  # the processor's resize, if any
    x0, y0, x1, y1 = (plate_box[0] + border, plate_box[1] + border, plate_box[2] - border, plate_box[3] - border)
    x0, y0, x1, y1 = max(0, x0), max(0, y0), min(crop.width, x1), min(crop.height, y1)
    if x1 <= x0 or y1 <= y0:
        return targets
    for row in range(gh if colour is not None else 0):
        for col in range(gw):
            if x0 <= (col + 0.5) * PATCH_PX / sx < x1 and y0 <= (row + 0.5) * PATCH_PX / sy < y1:
                _mark(targets, row * gw + col, f"on {colour}")
                _mark(targets, row * gw + col, "is plate")
    ink = np.asarray(crop.convert("L"))[y0:y1, x0:x1] < 128
    if not ink.any():
        return targets
    ys, xs = np.nonzero(ink)
    cy = y0 + (ys.min() + ys.max() + 1) / 2
    if family in ("shape", "pattern"):
        centres = [(x0 + (xs.min() + xs.max() + 1) / 2, answer)]
    else:
        columns = ink.any(axis=0)
        edges = np.flatnonzero(np.diff(np.concatenate([[0], columns.astype(np.int8), [0]])))
        runs = list(zip(edges[::2], edges[1::2], strict=True))  # [start, end) of each inked column run
        if len(runs) != len(answer):
            lo, hi = xs.min(), xs.max() + 1
            step = (hi - lo) / len(answer)
            runs = [(lo + i * step, lo + (i + 1) * step) for i in range(len(answer))]
        centres = [(x0 + (a + b) / 2, char) for (a, b), char in zip(runs, answer, strict=True)]
    row = min(gh - 1, int(cy * sy // PATCH_PX))
    is_code = family in CODE_FAMILIES
    for place, (cx, value) in enumerate(centres):
        token = row * gw + min(gw - 1, int(cx * sx // PATCH_PX))
        _mark(targets, token, value)
        if is_code:
            _mark(targets, token, f"glyph {place + 1}")
    return targets


def coarse_reading_targets(p: PoolItem) -> torch.Tensor:
    """What each merged token of ``p``'s coarse view lies on: (gh * gw, len(READ_CLASSES)) multi-hot, row-major, with
    only :data:`COARSE_READ_GROUPS` marked: the colour and kind of the coloured object (plate, large region, large
    frame's ring) that covers most of the token, if it covers at least its kind's share in :data:`_COARSE_COVER`.

    Found from the scene (every object's box on the canvas, scaled to the view), so it holds at any downscale. Why:
    a question names its plate by colour ("the blue frame"), and the attention Stage 1 distils can only find it there
    if the coarse tokens say which colour they lie on; phase 0 taught the tower colours on native cards only, and a
    linear probe then named the colour of only 53-69% of plates in the coarse view (docs/demo_model.md).
    """
    gh, gw = p.grid_hw
    scene = p.item.scene
    labels: list[tuple[str, str]] = [("", "")]  # index 0: nothing
    mask = Image.new("L", (gw * PATCH_PX, gh * PATCH_PX), 0)
    draw = ImageDraw.Draw(mask)

    def scaled(box: Sequence[int]) -> tuple[float, float, float, float]:
        x0, y0, x1, y1 = _scaled(box, scene.canvas, mask.size)
        return (x0, y0, x1 - 1, y1 - 1)  # PIL draws the right and bottom edges inclusive

    # Large objects first: a plate never overlaps them (a quadrant holds one object), but drawing order settles ties.
    for region in scene.regions:
        labels.append((region.colour, "region"))
        (draw.ellipse if region.ellipse else draw.rectangle)(scaled(region.box), fill=len(labels) - 1)
    for frame in scene.frames:
        labels.append((frame.colour, "frame"))
        width = max(1, round(frame.border * min(mask.width / scene.canvas[0], mask.height / scene.canvas[1])))
        draw.rectangle(scaled(frame.box), outline=len(labels) - 1, width=width)
    for plate in scene.plates:
        labels.append((plate.colour, "plate"))
        draw.rectangle(scaled(plate.box), fill=len(labels) - 1)
    ids = np.asarray(mask).reshape(gh, PATCH_PX, gw, PATCH_PX).transpose(0, 2, 1, 3).reshape(gh * gw, -1)
    # cover[t, k]: the share of token t's pixels that object k covers
    cover = np.stack([(ids == k).mean(axis=1) for k in range(len(labels))], axis=1)
    cover[:, 0] = 0.0
    best = cover.argmax(axis=1)
    targets = torch.zeros(gh * gw, len(READ_CLASSES))
    for token in np.flatnonzero(cover[np.arange(gh * gw), best] > 0):
        colour, kind = labels[best[token]]
        if cover[token, best[token]] < _COARSE_COVER[kind]:
            continue
        _mark(targets, int(token), f"on {colour}")
        _mark(targets, int(token), f"is {kind}")
    return targets


def answer_pointers(reading: torch.Tensor, answer: str, family: str) -> list[torch.Tensor]:
    """For each character of ``answer``, the tokens of one image (indices into ``reading``'s rows, as
    :func:`reading_targets` marks them) that show it: a code's ``i``-th glyph for its ``i``-th character, the token of
    the letter, shape or pattern for every character of a one-thing answer. Empty where the mark is missing (a glyph
    whose centre is off the image); no pointers for the families without a detail."""
    if family in CODE_FAMILIES:
        columns = [READ_CLASSES.index(f"glyph {i + 1}") for i in range(len(answer))]
    elif family in DETAIL_FAMILIES:
        columns = [READ_CLASSES.index(answer)] * len(answer)
    else:
        return []
    return [torch.nonzero(reading[:, column] > 0).flatten() for column in columns]


def target_tokens(block: ImageBlock, image_wh: tuple[int, int], box: Sequence[float]) -> torch.Tensor:
    """Sequence indices of the tokens of image ``block`` whose cells overlap ``box`` (pixels of that image)."""
    cells = _grid_box_around(box, block.grid_hw, image_wh, None)
    rows, cols = torch.arange(cells.y0, cells.y1), torch.arange(cells.x0, cells.x1)
    return block.start + (rows[:, None] * block.grid_hw[1] + cols[None, :]).reshape(-1)


def _scaled(box: Sequence[int], src_wh: tuple[int, int], dst_wh: tuple[int, int]) -> tuple[float, ...]:
    sx, sy = dst_wh[0] / src_wh[0], dst_wh[1] / src_wh[1]
    return (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)


# Crops hold the detail's ink box grown by this much (within the card): another answer drawn on the plate (a wider
# letter, a code of other glyphs) inks a few pixels more or less than the scene's own.
_DETAIL_MARGIN = 8


class ExampleBuilder:
    """Builds teacher-forced examples with the engine's own prompt, splice and positions."""

    def __init__(self, engine: QZoomEngine, min_pixels: int, max_pixels: int, decoy_frac: float = 0.0) -> None:
        self.engine = engine
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.decoy_frac = decoy_frac  # share of :meth:`make`'s fused examples with a decoy crop (where there is one)
        self.options = AskOptions(min_pixels=min_pixels, max_pixels=max_pixels)
        tok = engine.processor.tokenizer
        self.tokenizer = tok
        self.end_id = int(tok.convert_tokens_to_ids("<|im_end|>"))
        self.hidden = int(engine.model.config.text_config.hidden_size)
        self.merge = int(engine.model.config.vision_config.spatial_merge_size)

    def _state(self, image: Image.Image, question: str) -> SequenceState:
        """prepare + layout: ids, positions and image blocks, no weights, no ViT or decoder layer.

        ``image`` may be the coarse view instead of the canvas: it has the same grid, which is all that matters here.
        The embeddings are a zero placeholder that ``engine.splice`` cuts and joins like real ones; the training step
        embeds the ids itself.
        """
        st = self.engine.new_state(image, question, self.options)
        st.digest = "training"  # no cache is consulted; skips hashing the pixels
        self.engine.prepare([st])
        self.engine.layout([st])
        st.embeds = torch.zeros(int(st.input_ids.shape[0]), self.hidden)
        return st

    def _finish(
        self,
        st: SequenceState,
        answer: str,
        pixels: list[torch.Tensor],
        grids: list[torch.Tensor],
        family: str,
        view: View,
    ) -> Example:
        answer_ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"] + [self.end_id]
        n_prompt = int(st.input_ids.shape[0])
        ids = torch.cat([st.input_ids, torch.tensor(answer_ids, dtype=torch.long)])
        # Text after the prompt advances all three M-RoPE axes together, one per token (as decoding does).
        last = st.positions[:, -1:].clone()
        tail = last + torch.arange(1, len(answer_ids) + 1, dtype=torch.float32)[None, :]
        positions = torch.cat([st.positions.clone(), tail], dim=1)
        labels = torch.full_like(ids, -100)
        labels[n_prompt:] = ids[n_prompt:]
        return Example(ids, positions, labels, pixels, grids, family, view, referent=referent_of(st.query))

    @staticmethod
    def _point(example: Example, start: int, reading: torch.Tensor, answer: str) -> None:
        """Set ``example.pointer`` from ``reading`` (the marks of the image whose first token is at ``start``): the
        position that predicts answer character ``j`` (one byte token each) points at the tokens showing it."""
        first = int(torch.nonzero(example.labels != -100)[0, 0])  # the first answer token
        example.pointer = [
            (first - 1 + j, start + tokens)
            for j, tokens in enumerate(answer_pointers(reading, answer, example.family))
            if tokens.numel()
        ]

    def drill(
        self, image: Image.Image, question: str, answer: str, family: str, box: tuple[int, int, int, int]
    ) -> Example:
        """An :func:`answer_drill` example: the asked-about plate (``box``) marked for grounding, and its detail's
        tokens for the pointer loss (found from the drill's ink; the border is at most 6 px, the detail further in)."""
        example = self.single(image, question, answer, family, "crop", box)
        grid = example.grids[0]
        grid_hw = (int(grid[1]) // self.merge, int(grid[2]) // self.merge)
        reading = reading_targets(image, box, _DRILL_BORDER_MAX, family, answer, grid_hw, None)
        start = int(torch.nonzero(example.input_ids == self.engine.image_token_id)[0, 0])
        self._point(example, start, reading, answer)
        return example

    def pooled_view(
        self, p: PoolItem, which: Literal["coarse", "zoom", "decoy"]
    ) -> tuple[torch.Tensor, torch.Tensor, str]:
        """Pixels, grid and feature key of a pooled item's coarse view, fixed zoom crop or decoy crop (processed once
        per item)."""
        if which not in p.pixels:
            fixed = {"coarse": (p.coarse, None), "zoom": p.zoom, "decoy": p.decoy}[which]
            if fixed is None:
                raise ValueError(f"item {p.item.uid} has no {which} crop (a detail item's crops are drawn afresh)")
            image = fixed[0]
            p.pixels[which] = self.engine._preprocess(image, self.min_pixels, self.max_pixels)
        pixels, grid = p.pixels[which]
        return pixels, grid, f"{p.item.uid}:{which}"

    def single(
        self,
        image: Image.Image,
        question: str,
        answer: str,
        family: str,
        view: View,
        box: Sequence[float] | None = None,
        pooled: tuple[torch.Tensor, torch.Tensor, str] | None = None,
    ) -> Example:
        """One image (a crop, or the coarse view) and the question; ``box``: the target in the image's pixels;
        ``pooled``: the image's pixels, grid and feature key from :meth:`pooled_view` (else it is processed here)."""
        st = self._state(image, question)
        if pooled is None:
            pixels, grid = self.engine._preprocess(image, self.min_pixels, self.max_pixels)
            key = None
        else:
            pixels, grid, key = pooled
        example = self._finish(st, answer, [pixels], [grid], family, view)
        example.image_keys = [key]
        if box is not None:
            example.target = target_tokens(st.blocks[0], image.size, box)
        return example

    def coarse(self, p: PoolItem) -> Example:
        """The coarse view and the question; detail items mark their target for the grounding loss."""
        item = p.item
        box = _scaled(item.box, item.canvas, p.coarse.size) if item.needs_detail else None
        pooled = self.pooled_view(p, "coarse")
        return self.single(p.coarse, item.question, item.answer, item.family, "coarse", box, pooled)

    def zoom_view(
        self, p: PoolItem, rng: random.Random | None, answer: str | None = None
    ) -> tuple[Image.Image, roi.GridBox, roi.PixelBox, torch.Tensor, torch.Tensor, str | None]:
        """What a zoom step on ``p``'s target shows: the crop of the coarse cells covering it (grown by up to a cell
        per side with ``rng``; ``answer`` drawn on the target), its grid and pixel boxes, its processed pixels and
        grid, and its feature key (a pooled item's fixed zoom crop) or None."""
        item = p.item
        crop_key: str | None = None
        if p.zoom is not None:
            crop, grid_box = p.zoom
            crop_pixels, crop_grid, crop_key = self.pooled_view(p, "zoom")
        else:
            grid_box = _grid_box_around(item.box, p.grid_hw, item.canvas, rng)
            box = roi.grid_box_to_pixels(grid_box, p.grid_hw, item.canvas, min_side=MIN_BOX_SIDE).as_list()
            crop = crop_with_answer(item, box, answer, origin=p.origin)
            crop_pixels, crop_grid = self.engine._preprocess(crop, self.min_pixels, self.max_pixels)
        pixel_box = roi.grid_box_to_pixels(grid_box, p.grid_hw, item.canvas, min_side=MIN_BOX_SIDE)
        return crop, grid_box, pixel_box, crop_pixels, crop_grid, crop_key

    def zoom_reading(
        self, p: PoolItem, crop: Image.Image, pixel_box: roi.PixelBox, crop_grid: torch.Tensor, answer: str
    ) -> torch.Tensor | None:
        """:func:`reading_targets` of a :meth:`zoom_view` crop showing ``answer`` (no colour marks), or None when
        ``p`` has no target plate."""
        scene = p.item.scene
        if scene.target is None:
            return None
        plate = scene.plates[scene.target]
        x0, y0, x1, y1 = plate.box
        plate_box = (x0 - pixel_box.x0, y0 - pixel_box.y0, x1 - pixel_box.x0, y1 - pixel_box.y0)
        grid_hw = (int(crop_grid[1]) // self.merge, int(crop_grid[2]) // self.merge)
        return reading_targets(crop, plate_box, plate.border, p.item.family, answer, grid_hw, None)

    def fused(
        self, p: PoolItem, rng: random.Random | None, answer: str | None = None, decoy_first: bool | None = None
    ) -> Example:
        """The coarse view with a native crop spliced after it, exactly as a zoom step does (``engine.splice``).

        With ``decoy_first`` set (True or False) and ``p.decoy``, the zoom step proposed two boxes: the target's and a
        look-alike's (the decoy first or second), as the demo model's SD-RPN does when its map lights both; the
        grounding and pointer targets stay on the target's crop, so the decoder learns to read the crop that the
        question names and to pass over the other."""
        item = p.item
        st = self._state(p.coarse, item.question)
        block = st.blocks[0]
        crop, grid_box, pixel_box, crop_pixels, crop_grid, crop_key = self.zoom_view(p, rng, answer)
        views = [(grid_box, pixel_box, crop_pixels, crop_grid, crop_key)]
        aim = 0  # the target's view among them (its block is the one after the coarse view's and any before it)
        if decoy_first is not None and p.decoy is not None:
            decoy_pixels, decoy_grid, decoy_key = self.pooled_view(p, "decoy")
            decoy_box = roi.grid_box_to_pixels(p.decoy[1], p.grid_hw, item.canvas, min_side=MIN_BOX_SIDE)
            aim = 1 if decoy_first else 0
            views.insert(1 - aim, (p.decoy[1], decoy_box, decoy_pixels, decoy_grid, decoy_key))
        empty = torch.empty(0)
        self.engine.splice(
            st,
            Proposal(block, empty, empty, [v[0] for v in views], [v[1] for v in views]),
            [(torch.zeros(int(v[3].prod()) // self.merge**2, self.hidden), v[3]) for v in views],
        )
        coarse_pixels, coarse_grid, coarse_key = self.pooled_view(p, "coarse")
        shown = answer or item.answer
        pixels = [coarse_pixels, *(v[2] for v in views)]
        example = self._finish(st, shown, pixels, [coarse_grid, *(v[3] for v in views)], item.family, "fused")
        example.image_keys = [coarse_key, *(v[4] for v in views)]
        if item.needs_detail:  # the target's coarse cells, and the whole crop (a zoom on it)
            zoomed = st.blocks[1 + aim]
            coarse_cells = target_tokens(block, item.canvas, item.box)
            example.target = torch.cat([coarse_cells, torch.arange(zoomed.start, zoomed.end)])
            reading = self.zoom_reading(p, crop, pixel_box, crop_grid, shown)
            if reading is not None:
                self._point(example, zoomed.start, reading, shown)
        return example

    def crop(
        self, p: PoolItem, side: int, rng: random.Random | None, answer: str | None = None, zoom: float = 1.0
    ) -> Example:
        """A crop of about ``side`` px containing the target's detail (at a random offset with ``rng``), alone: native,
        or ``zoom`` > 1 times as much of the canvas resized down to the side (bicubic, as the processor resizes a zoom
        box larger than the budget).

        The crop holds the detail with a margin of :data:`_DETAIL_MARGIN` px (any answer drawn there fits), not the
        whole card, which is up to 396 px a side. The side is snapped to a multiple of the 28 px token, and grown to
        one that holds the detail (a crop narrower than it would grow to its odd size), so the processor does not
        resample a native crop: 1-px patterns reach the ViT intact (fused examples show the resampled crops of real
        boxes).
        """
        item = p.item
        px0, py0, px1, py1 = item.box
        cx0, cy0, cx1, cy1 = item.content_box
        m = _DETAIL_MARGIN
        detail = (max(px0, cx0 - m), max(py0, cy0 - m), min(px1, cx1 + m), min(py1, cy1 + m))
        detail_side = max(detail[2] - detail[0], detail[3] - detail[1])
        side = max(2 * PATCH_PX, PATCH_PX * math.ceil(detail_side / zoom / PATCH_PX), PATCH_PX * round(side / PATCH_PX))
        box = crop_box_around(item, max(detail_side, round(side * zoom)), rng=rng, around=detail)
        image = crop_with_answer(item, box, answer, origin=p.origin)
        plate = item.scene.plates[item.scene.target] if item.scene.target is not None else None
        if image.size != (side, side):  # zoomed out (or clamped at the canvas's edge): to the side the model sees
            image = image.resize((side, side), Image.Resampling.BICUBIC)
        f = side / (box[2] - box[0])
        x0, y0, x1, y1 = item.box
        plate_box = (
            round((x0 - box[0]) * f),
            round((y0 - box[1]) * f),
            round((x1 - box[0]) * f),
            round((y1 - box[1]) * f),
        )
        example = self.single(image, item.question, answer or item.answer, item.family, "crop", plate_box)
        if plate is not None:
            grid = example.grids[0]
            example.reading = reading_targets(
                image,
                plate_box,
                max(1, round(plate.border * f)),
                item.family,
                answer or item.answer,
                (int(grid[1]) // self.merge, int(grid[2]) // self.merge),
                plate.colour,
            )
            start = int(torch.nonzero(example.input_ids == self.engine.image_token_id)[0, 0])
            self._point(example, start, example.reading, answer or item.answer)
        return example

    def make(
        self, p: PoolItem, view: View, rng: random.Random, crop_range: tuple[int, int], zoom: float = 1.0
    ) -> Example:
        """An example of ``view``; detail crops show a fresh random answer drawn on the target, ``zoom`` times
        downscaled (at most to the largest crop of ``crop_range``, the reach of a pooled item)."""
        answer = _fresh_answer(p.item, rng)
        if view == "fused":
            # `decoy_frac > 0` first: at 0 the draws are the ones made before decoys existed (r12's stream).
            decoy = self.decoy_frac > 0 and p.decoy is not None and rng.random() < self.decoy_frac
            return self.fused(p, rng, answer, decoy_first=rng.random() < 0.5 if decoy else None)
        if view == "coarse":
            return self.coarse(p)
        side = rng.randint(*crop_range)
        return self.crop(p, side, rng, answer, min(zoom, crop_range[1] / side))


def _zoom(rng: random.Random, frac: float, zoom_max: float) -> float:
    """1 (native scale), or with probability ``frac`` a downscale factor drawn from ``1 .. zoom_max``."""
    return rng.uniform(1.0, zoom_max) if rng.random() < frac else 1.0


def _fresh_answer(item: SyntheticItem, rng: random.Random) -> str | None:
    """A random answer of the item's detail family, different from the other plates' (None for coarse families).

    Drawing it on the target plate turns one rendered scene into many examples: rendering costs tens of
    milliseconds, redrawing one plate in a crop a fraction of one.
    """
    if item.family not in DETAIL_FAMILIES or item.scene.target is None:
        return None
    others = {p.value for i, p in enumerate(item.scene.plates) if i != item.scene.target}
    while True:
        answer = rng.choice(ANSWER_VOCAB[item.family])
        if answer not in others:
            return answer


def collate(examples: Sequence[Example], pad_id: int, merge: int = 2) -> dict[str, torch.Tensor]:
    """Right-padded batch for the stock forward; images in sequence order (the order their tokens are filled)."""
    n = max(int(e.input_ids.shape[0]) for e in examples)
    b = len(examples)
    ids = torch.full((b, n), pad_id, dtype=torch.long)
    labels = torch.full((b, n), -100, dtype=torch.long)
    mask = torch.zeros((b, n), dtype=torch.long)
    positions = torch.zeros((3, b, n), dtype=torch.float32)
    ground = torch.zeros((b, n), dtype=torch.bool)  # the target's image tokens (grounding loss)
    pointer = torch.zeros((b, n, n), dtype=torch.bool)  # [i, row, token]: row's answer character is shown at token
    for i, e in enumerate(examples):
        m = int(e.input_ids.shape[0])
        if e.target is not None:
            ground[i, e.target] = True
        for row, tokens in e.pointer or ():
            pointer[i, row, tokens] = True
        ids[i, :m] = e.input_ids
        labels[i, :m] = e.labels
        mask[i, :m] = 1
        positions[:, i, :m] = e.positions
    # Reading targets per merged token of every image, in the order the vision tower returns them; a mask keeps the
    # images that have none (coarse views, fused sequences).
    reading, read_mask = [], []
    for e in examples:
        for i, g in enumerate(e.grids):
            n_tokens = int(g.prod()) // merge**2
            target = e.reading if i == 0 else None  # a crop example's one image
            reading.append(target if target is not None else torch.zeros(n_tokens, len(READ_CLASSES)))
            read_mask.append(torch.full((n_tokens,), target is not None))
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "position_ids": positions,
        "pixel_values": torch.cat([p for e in examples for p in e.pixel_values]),
        "image_grid_thw": torch.stack([g for e in examples for g in e.grids]),
        "reading": torch.cat(reading),
        "reading_mask": torch.cat(read_mask),
        "ground": ground,
        "pointer": pointer,
        "referent": torch.tensor([-100 if e.referent is None else e.referent for e in examples], dtype=torch.long),
        "answer_weight": torch.tensor([e.answer_weight for e in examples], dtype=torch.float32),
    }


MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "pixel_values", "image_grid_thw")


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The part of a :func:`collate` batch that the stock forward takes."""
    return {name: batch[name] for name in MODEL_INPUTS}


def answer_loss_and_hits(
    model: QZoomQwen2_5_VLForConditionalGeneration,
    batch: dict[str, torch.Tensor],
    inputs_embeds: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over the answer tokens, each sample's weighted by its ``answer_weight`` (``collate``'s; 1
    where the batch has none), and per sample whether every answer token is the argmax.

    ``inputs_embeds`` (B, n, d): the sequence's embeddings with the image features already in place (see
    :class:`FrozenTowerFeatures`); the stock forward then runs no vision tower."""
    if inputs_embeds is None:
        out = model(**model_inputs(batch))
    else:
        out = model(
            inputs_embeds=inputs_embeds, attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]
        )
    logits = out.logits[:, :-1].float()  # (B, n-1, V): position i predicts token i + 1
    target = batch["labels"][:, 1:]  # (B, n-1)
    per_token = torch.nn.functional.cross_entropy(
        logits.transpose(1, 2), target, ignore_index=-100, reduction="none"
    )  # (B, n-1), 0 where unscored
    scored = target != -100
    weight = batch.get("answer_weight", torch.ones(target.shape[0]))
    loss = (per_token * weight[:, None]).sum() / scored.sum().clamp_min(1)
    correct = (logits.argmax(-1) == target) | ~scored
    return loss, correct.all(dim=1)


class FrozenTowerFeatures:
    """The inputs embeddings of a batch while the vision tower is frozen, reusing the features of images seen before.

    Valid only while the tower's weights do not change (after phase 0 with ``freeze_vision``): then the features of a
    pooled item's coarse view (drawn many times while the item is in a pool) are computed once and kept, by the
    example's ``image_keys``, in a bounded LRU. The other images of the batch go through the tower in one call, as
    the stock forward would run them. The sequence is what the stock forward builds: token embeddings with the image
    features scattered over the image tokens in order.
    """

    def __init__(self, model: QZoomQwen2_5_VLForConditionalGeneration, capacity: int) -> None:
        self.model = model
        self.capacity = capacity
        self.kept: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def image_features(self, batch: dict[str, torch.Tensor], keys: Sequence[str | None]) -> list[torch.Tensor]:
        """Per image of the batch, in order, its merged features (N_i, d)."""
        grids = batch["image_grid_thw"]  # (I, 3)
        if len(keys) != grids.shape[0]:
            raise ValueError(f"{len(keys)} image keys for {grids.shape[0]} images")
        pixels = torch.split(batch["pixel_values"], grids.prod(-1).tolist())
        features: list[torch.Tensor | None] = [None] * len(keys)
        for i, key in enumerate(keys):
            if key is not None and key in self.kept:
                self.kept.move_to_end(key)
                features[i] = self.kept[key]
        todo = [i for i, f in enumerate(features) if f is None]
        self.hits += len(keys) - len(todo)
        self.misses += len(todo)
        if todo:
            with torch.no_grad():
                fresh = self.model.model.get_image_features(
                    torch.cat([pixels[i] for i in todo]), grids[todo], return_dict=True
                ).pooler_output
            for i, f in zip(todo, fresh, strict=True):
                features[i] = f
                key = keys[i]
                if key is not None:
                    self.kept[key] = f
                    if len(self.kept) > self.capacity:
                        self.kept.popitem(last=False)
        return [f for f in features if f is not None]

    def inputs_embeds(self, batch: dict[str, torch.Tensor], keys: Sequence[str | None]) -> torch.Tensor:
        """(B, n, d) token embeddings with the image features over the image tokens."""
        ids = batch["input_ids"]
        embeds: torch.Tensor = self.model.model.get_input_embeddings()(ids)
        features = torch.cat(self.image_features(batch, keys)).to(embeds.dtype)
        image = (ids == self.model.config.image_token_id)[..., None].expand_as(embeds)
        if int(image.sum()) != features.numel():
            raise ValueError(f"{int(image.sum()) // embeds.shape[-1]} image tokens for {features.shape[0]} features")
        return embeds.masked_scatter(image, features)


def image_keys(examples: Sequence[Example]) -> list[str | None]:
    """The feature keys of every image of a :func:`collate` batch of ``examples``, in the batch's image order."""
    return [key for e in examples for key in (e.image_keys or [None] * len(e.pixel_values))]


# ------------------------------------------------------------------------------------------------------- training


class ItemPool:
    """A rolling pool of train-split items, refreshed a few at a time (rendering costs ~60 ms an item).

    The next ``prefetch`` items are rendered ahead on a worker thread (Pillow and numpy release the GIL while they
    draw and resize), so rendering overlaps the training step. Items are rendered by index and taken in index order:
    the pool's contents do not depend on the thread's timing.
    """

    def __init__(
        self,
        recipe: BaseRecipe,
        families: Sequence[str],
        start: int,
        desc: str,
        progress: bool = True,
        sides: tuple[int, int] = (896, 4096),
        prefetch: int = 2,
    ) -> None:
        self.recipe = recipe
        self.families = tuple(families)
        self.sides = sides
        self.next_index = start  # the index of the next item to render
        self.prefetch = prefetch
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qzoom-render") if prefetch else None
        self._ahead: deque[Future[PoolItem]] = deque()
        self.items = [self._new() for _ in tqdm(range(recipe.pool_size), desc=desc, disable=not progress, leave=False)]
        self.cursor = 0

    def _render(self, index: int) -> PoolItem:
        r = self.recipe
        item = generate_item(
            "train", index, seed=r.seed, families=self.families, min_side=self.sides[0], max_side=self.sides[1]
        )
        return pool_item(item, r.min_pixels, r.max_pixels, reach=r.crop_max, decoy=r.fused_decoy_frac > 0)

    def _new(self) -> PoolItem:
        if self._worker is None:
            self.next_index += 1
            return self._render(self.next_index - 1)
        while len(self._ahead) <= self.prefetch:
            self._ahead.append(self._worker.submit(self._render, self.next_index))
            self.next_index += 1
        return self._ahead.popleft().result()

    def refresh(self, count: int) -> None:
        for _ in range(count):
            self.items[self.cursor] = self._new()
            self.cursor = (self.cursor + 1) % len(self.items)

    def close(self) -> None:
        """Stop the worker thread; the items rendered ahead and not taken are dropped."""
        if self._worker is not None:
            self._worker.shutdown(wait=False, cancel_futures=True)
            self._ahead.clear()


def _ema(ema: float | None, value: float) -> float:
    return value if ema is None else 0.95 * ema + 0.05 * value


def _lr_at(step: int, total: int, recipe: BaseRecipe, peak: float | None = None) -> float:
    """Linear warmup to ``peak`` (default ``recipe.lr``), then cosine down to a tenth of it at ``total``."""
    peak = recipe.lr if peak is None else peak
    if step < recipe.warmup_steps:
        return peak * (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, total - recipe.warmup_steps)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


SINGLE_FAMILIES = frozenset({"letter", "shape", "pattern"})  # plates that show one thing


def _draw_batch(
    builder: ExampleBuilder,
    pools: dict[str, ItemPool],
    rng: random.Random,
    recipe: BaseRecipe,
    mixed: bool,
    singles_only: bool = False,
) -> list[Example]:
    if singles_only:  # the first crop steps: crops of the plates that show one thing
        items = [p for p in pools["detail"].items if p.item.family in SINGLE_FAMILIES] or pools["detail"].items
        crop_range = (recipe.crop_min, recipe.crop_max_phase1)
        return [
            builder.make(rng.choice(items), "crop", rng, crop_range, _zoom(rng, recipe.zoom_frac, recipe.zoom_max))
            for _ in range(recipe.batch_size)
        ]
    if "scene" in pools and rng.random() < recipe.scene_frac:
        # Whole views only (sequences of one length): scenes, and coarse views of the coarse families.
        picks = [
            rng.choice(pools["scene" if rng.random() < 0.5 else "coarse"].items) for _ in range(recipe.scene_batch_size)
        ]
        return [builder.coarse(p) for p in picks]
    examples = []
    n_fam = len(FAMILIES)
    size = recipe.mixed_batch_size if mixed else recipe.batch_size
    coarse_share = len(COARSE_FAMILIES) / n_fam
    for _ in range(size):
        r = rng.random()
        if not mixed or r < recipe.mix_crop:
            view: View = "crop"
            pool = pools["detail"]
        elif r < recipe.mix_crop + recipe.mix_fused:
            view = "fused"
            pool = pools["coarse"] if rng.random() < coarse_share else pools["detail"]
        else:
            # Mostly the coarse families; a few detail questions on the coarse view too, so that the model learns to
            # look at the plate the question names there (Stage 1 distils the SD-RPN from that attention).
            view = "coarse"
            pool = pools["detail"] if rng.random() < recipe.coarse_detail_frac else pools["coarse"]
        crop_max = recipe.crop_max if mixed else recipe.crop_max_phase1
        zoom = _zoom(rng, recipe.zoom_frac, recipe.zoom_max)
        examples.append(builder.make(rng.choice(pool.items), view, rng, (recipe.crop_min, crop_max), zoom))
    return _weigh_unreadable(examples, recipe)


def _weigh_unreadable(examples: list[Example], recipe: BaseRecipe) -> list[Example]:
    """Give the coarse views of detail questions (benchmark-size canvases: their detail is not legible) the answer
    weight ``recipe.unreadable_answer_weight``."""
    for e in examples:
        if e.view == "coarse" and e.family in DETAIL_FAMILIES:
            e.answer_weight = recipe.unreadable_answer_weight
    return examples


def _code_phase_batch(builder: ExampleBuilder, pool: ItemPool, rng: random.Random, recipe: BaseRecipe) -> list[Example]:
    """The code phase's batch (see ``BaseRecipe.code_steps``): ``mixed_batch_size`` examples of the pool's code
    items, crops and fused sequences alternating, each with a fresh code on the target."""
    items = [p for p in pool.items if p.item.family in CODE_FAMILIES]
    if not items:
        raise ValueError(f"the code phase needs code items in the detail pool; its families are {pool.families}")
    crop_range = (recipe.crop_min, recipe.crop_max)
    return [
        builder.make(
            rng.choice(items),
            "fused" if i % 2 else "crop",
            rng,
            crop_range,
            _zoom(rng, recipe.zoom_frac, recipe.zoom_max),
        )
        for i in range(recipe.mixed_batch_size)
    ]


def _ground_phase_batch(
    builder: ExampleBuilder, pools: dict[str, ItemPool], rng: random.Random, recipe: BaseRecipe
) -> tuple[list[Example], bool]:
    """One batch of the ground phase and whether it is the phase's own (coarse views at the benchmark's sizes,
    ``ground_detail_frac`` of them detail questions); with probability ``ground_mixed_frac`` it is a mixed-phase
    batch instead (reading rehearsed, ordinary loss weights)."""
    if rng.random() < recipe.ground_mixed_frac:
        for pool in pools.values():
            pool.refresh(recipe.refresh)
        return _draw_batch(builder, pools, rng, recipe, mixed=True), False
    for pool in (pools["detail"], pools["coarse"]):
        pool.refresh(recipe.refresh)
    picks = [
        rng.choice(pools["detail" if rng.random() < recipe.ground_detail_frac else "coarse"].items)
        for _ in range(recipe.mixed_batch_size)
    ]
    return _weigh_unreadable([builder.coarse(p) for p in picks], recipe), True


def train_base(
    out_dir: str | Path,
    recipe: BaseRecipe | None = None,
    *,
    progress: bool = True,
    log: Callable[[str], None] = print,
    check_items: int = 0,
) -> Path:
    """Train the demo backbone from scratch (see the module docstring) and save it to ``out_dir``.

    ``check_items``: that many val-split items are scored per view (:func:`view_accuracy`) after each phase.
    """
    recipe = recipe or BaseRecipe()
    torch.manual_seed(recipe.seed)
    rng = random.Random(recipe.seed)
    model, processor = build_demo_model(recipe)
    engine = QZoomEngine(model, processor, name="qzoom-tiny-base")
    model.train()
    builder = ExampleBuilder(engine, recipe.min_pixels, recipe.max_pixels, recipe.fused_decoy_frac)
    detail = tuple(f for f in recipe.families if f in DETAIL_FAMILIES)
    coarse = tuple(f for f in recipe.families if f in COARSE_FAMILIES) or detail
    # Disjoint index ranges of the train split per pool, so the two pools never draw the same item.
    pools = {
        "detail": ItemPool(recipe, detail, start=0, desc="render (detail)", progress=progress),
        "coarse": ItemPool(recipe, coarse, start=10_000_000, desc="render (coarse)", progress=progress),
    }
    if recipe.scene_frac > 0:
        sides = (recipe.scene_min_side, recipe.scene_max_side)
        pools["scene"] = ItemPool(
            recipe, detail, start=20_000_000, desc="render (scene)", progress=progress, sides=sides
        )
    frozen = ("model.visual.",) if recipe.freeze_vision and recipe.read_steps else ()
    params = [p for n, p in model.named_parameters() if not _is_branch(n) and not n.startswith(frozen)]
    read_weight = 0.0 if frozen else recipe.read_weight
    # The reading head (see `reading_targets`) reads the merger's output; it is trained here and not saved.
    reader = torch.nn.Linear(recipe.hidden_size, READ_LOGITS)  # the merger projects to the text width
    if recipe.read_steps:
        pretrain_reading(model, reader, builder, rng, recipe, pools, progress=progress, log=log)
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith(frozen))  # a frozen tower: no gradient computed for it at all
    # A frozen tower's features of pooled views are computed once per item (about a third of a step's time was the
    # tower's forward, mostly on coarse views that recur while their item stays pooled).
    tower = FrozenTowerFeatures(model, capacity=2 * sum(len(pool.items) for pool in pools.values())) if frozen else None
    # The stock forward computes the merged image tokens internally; the hook hands them to the reading loss.
    merged: list[torch.Tensor] = []
    hook = model.model.visual.register_forward_hook(lambda _m, _i, out: merged.append(out.pooler_output))
    # The heads are probed when either grounding weight is on: the ride-along one, or the ground phase's own.
    grounds = recipe.ground_weight > 0 or (recipe.ground_steps > 0 and recipe.ground_phase_weight > 0)
    probe = GroundingProbe(engine, recipe.ground_heads) if grounds else None
    pointer_probe = GroundingProbe(engine, recipe.pointer_heads) if recipe.pointer_weight > 0 else None
    # The referent head (see `_referent_loss`) reads the input of layer K; it is trained here and not saved.
    referent_head = torch.nn.Linear(recipe.hidden_size, len(REFERENTS))
    layer_k: list[torch.Tensor] = []
    k_hook = engine.layers[recipe.twig_k].register_forward_pre_hook(
        lambda _m, args, kwargs: layer_k.append(kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]),
        with_kwargs=True,
    )
    optimizer = torch.optim.AdamW(
        [*params, *reader.parameters(), *referent_head.parameters()], lr=recipe.lr, weight_decay=recipe.weight_decay
    )
    crops_start = recipe.referent_steps + recipe.drill_steps
    mixed_end = crops_start + recipe.crop_steps + recipe.mixed_steps
    codes_end = mixed_end + recipe.code_steps
    total = codes_end + recipe.ground_steps
    phase_ends = (
        ("referent", recipe.referent_steps),
        ("drills", crops_start),
        ("crops", crops_start + recipe.crop_steps),
        ("mixed", mixed_end),
        ("codes", codes_end),
        ("ground", total),
    )
    pad_id = engine.pad_id

    def phase_of(step: int) -> str:
        return next(name for name, end in phase_ends if step < end)

    # The referent drills draw from their own stream, so that the phase leaves every later batch as it was without it.
    referent_rng = random.Random(f"{recipe.seed}:referent")
    code_rng = random.Random(f"{recipe.seed}:codes")  # the same for the code phase
    started = time.perf_counter()
    ema: float | None = None
    read_ema: float | None = None
    ground_ema: float | None = None
    referent_ema: float | None = None
    pointer_ema: float | None = None
    bar = tqdm(range(total), desc="base", disable=not progress, dynamic_ncols=True)
    checks = list(iterate("val", check_items, seed=recipe.seed)) if check_items else []
    scene_checks = []
    if check_items and recipe.scene_frac > 0:
        scene_checks = list(
            iterate(
                "val",
                check_items,
                seed=recipe.seed,
                families=detail,
                min_side=recipe.scene_min_side,
                max_side=recipe.scene_max_side,
            )
        )

    def build(step: int) -> tuple[str, list[Example], bool, dict[str, torch.Tensor]]:
        """Step ``step``'s phase, examples, whether it is the ground phase's own batch, and the collated batch. Called
        for every step in order (it draws from ``rng`` and the pools), on the main thread or the builder thread."""
        phase = phase_of(step)
        ground_batch = False  # the ground phase's own coarse views: its loss weights apply
        if phase == "referent":
            examples = [
                builder.single(image, question, answer, family, "crop")
                for image, question, answer, family in (
                    referent_drill(referent_rng) for _ in range(recipe.referent_batch_size)
                )
            ]
        elif phase == "drills":
            examples = [
                builder.drill(image, question, answer, family, box)
                for image, question, answer, family, box in (
                    answer_drill(rng, recipe.drill_pair_frac, recipe.drill_position_frac)
                    for _ in range(recipe.drill_batch_size)
                )
            ]
        elif phase == "codes":
            examples = _code_phase_batch(builder, pools["detail"], code_rng, recipe)
        elif phase == "ground":
            examples, ground_batch = _ground_phase_batch(builder, pools, rng, recipe)
        else:
            for pool in pools.values():
                pool.refresh(recipe.refresh)
            singles_only = step - crops_start < recipe.single_steps
            examples = _draw_batch(builder, pools, rng, recipe, phase == "mixed", singles_only)
        return phase, examples, ground_batch, collate(examples, pad_id)

    # The next step's batch is built on a thread while this step trains (drawing, tokenizing and collating took a
    # third of a step, most of it beside the backward pass, which holds no GIL). Batches are built in step order by
    # one thread, so they are the same as built inline. The checks between phases run with no build in flight:
    # they use the same tokenizer, which is not safe to share between threads.
    check_steps = {end for _, end in phase_ends[1:-1]} if checks else set()
    builder_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qzoom-batches")
    pending: Future[tuple[str, list[Example], bool, dict[str, torch.Tensor]]] | None = None
    for step in bar:
        if step in check_steps:  # after each phase that answers
            _log_checks(engine, checks, log, f"before {phase_of(step)}", scene_checks)
        phase, examples, ground_batch, batch = pending.result() if pending is not None else build(step)
        pending = None
        if step + 1 < total and step + 1 not in check_steps:
            pending = builder_thread.submit(build, step + 1)
        if step == recipe.referent_steps and step > 0:
            # The answering phases start as they would without the referent phase: from a fresh warmup and with
            # Adam's moments cleared (primed by the referent loss alone). Without this the first drills ran at the
            # full rate, and the reading checks fell below those of the same data without the referent phase
            # (docs/demo_model.md, r4 against r2).
            optimizer.state.clear()
        # The referent, code and ground phases each run their own schedule; drills, crops and mixed share one.
        if phase == "referent":
            lr = _lr_at(step, recipe.referent_steps, recipe)
        elif phase == "codes":
            lr = _lr_at(step - mixed_end, recipe.code_steps, recipe, peak=recipe.code_lr)
        elif phase == "ground":
            lr = _lr_at(step - codes_end, recipe.ground_steps, recipe, peak=recipe.ground_lr)
        else:
            lr = _lr_at(step - recipe.referent_steps, mixed_end - recipe.referent_steps, recipe)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # Explicitly on: a caller (or a test before this one) may have turned autograd off process-wide.
        for probed in (probe, pointer_probe):
            if probed is not None:
                probed.heads.clear()  # the checks between phases ran forwards too
        layer_k.clear()
        with torch.enable_grad():
            embeds = tower.inputs_embeds(batch, image_keys(examples)) if tower is not None else None
            loss, _ = answer_loss_and_hits(model, batch, embeds)
            read_loss = _reading_loss(reader, merged[-1], batch) if read_weight > 0 else torch.zeros(())
            ground_loss = (
                _grounding_loss(probe.heads, batch, engine.image_token_id) if probe is not None else torch.zeros(())
            )
            referent_loss = _referent_loss(referent_head, layer_k[-1], batch)
            pointer_loss = (
                _pointer_loss(pointer_probe.heads, batch, engine.image_token_id)
                if pointer_probe is not None
                else torch.zeros(())
            )
        merged.clear()
        optimizer.zero_grad(set_to_none=True)
        answer_weight, ground_weight = (
            (recipe.ground_answer_weight, recipe.ground_phase_weight) if ground_batch else (1.0, recipe.ground_weight)
        )
        if phase == "referent":  # its answers are random: only the referent loss counts
            answer_weight, ground_weight = 0.0, 0.0
        (
            answer_weight * loss
            + read_weight * read_loss
            + ground_weight * ground_loss
            + recipe.referent_weight * referent_loss
            + recipe.pointer_weight * pointer_loss
        ).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if phase != "referent":
            ema = _ema(ema, loss.item())
        read_ema = _ema(read_ema, read_loss.item())
        ground_ema = _ema(ground_ema, ground_loss.item())
        referent_ema = _ema(referent_ema, referent_loss.item())
        pointer_ema = _ema(pointer_ema, pointer_loss.item())
        bar.set_postfix(
            phase=phase,
            loss=f"{ema or 0:.3f}",
            read=f"{read_ema:.3f}",
            ground=f"{ground_ema:.3f}",
            referent=f"{referent_ema:.3f}",
            pointer=f"{pointer_ema:.3f}",
        )
        if not progress and (step + 1) % 50 == 0:
            log(
                f"base step {step + 1}/{total} {phase} loss {ema or 0:.4f} read {read_ema:.4f} "
                f"ground {ground_ema:.4f} referent {referent_ema:.4f} pointer {pointer_ema:.4f} "
                f"{time.perf_counter() - started:.0f}s"
            )
    builder_thread.shutdown()
    hook.remove()
    k_hook.remove()
    for probed in (probe, pointer_probe):
        if probed is not None:
            probed.remove()
    log(f"base: {total} steps in {time.perf_counter() - started:.0f} s, final loss (EMA) {ema or 0:.4f}")
    if tower is not None:
        log(f"base: frozen tower features {tower.hits} reused, {tower.misses} computed")
    for pool in pools.values():
        pool.close()
    if checks:
        _log_checks(engine, checks, log, "final", scene_checks)
    model.requires_grad_(True)
    model.eval()
    model.init_branches_from_backbone()
    model.config.qzoom_base_recipe = asdict(recipe)
    return save_checkpoint(model, processor, out_dir)


@dataclass
class ProbedHead:
    """One attention head's rotated queries and keys of the last forward, float ``(B, n, head_dim)`` each, and the
    attention's ``scaling``: its logits for any query rows, as the stock attention computes them before the mask."""

    query: torch.Tensor
    key: torch.Tensor
    scaling: float

    def logits(self, sample: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
        """``(R, n)``: the logits of query position ``row[r]`` of sample ``sample[r]`` over all ``n`` keys; ``sample``
        ascending (as ``nonzero`` lists them)."""
        b = self.query.shape[0]
        # Each sample's rows side by side in (B, m) slots, m its most rows, so that one batched matmul serves them
        # without copying a sample's keys once per row.
        counts = torch.bincount(sample, minlength=b)
        slot = torch.arange(len(sample)) - (counts.cumsum(0) - counts)[sample]  # (R,) the row's place in its sample
        positions = torch.zeros(b, int(counts.max()), dtype=torch.long)
        positions[sample, slot] = row
        queries = self.query[torch.arange(b)[:, None], positions]  # (B, m, hd)
        logits = torch.matmul(queries, self.key.transpose(-2, -1))  # (B, m, n)
        return logits[sample, slot] * self.scaling


class GroundingProbe:
    """Forward hooks on the attention modules of ``heads`` ((layer, head) pairs) that keep each head's queries and
    keys (:class:`ProbedHead`) of the last forward in :attr:`heads`, for :func:`_grounding_loss`.

    Recomputed from the layer's input as the stock attention does (q/k projections, M-RoPE), since the fused SDPA
    kernel does not return its weights; one head of a layer costs a fraction of the layer. The losses need the
    logits of a few query rows only (those that predict an answer token), so the probe keeps queries and keys rather
    than the ``(B, n, n)`` logits, whose softmax and its backward cost 10-20x more than the rows' (up to 2.6 M entries
    per head in a mixed-phase batch, for some 40 rows that count); loss and gradients are the same.
    """

    def __init__(self, engine: QZoomEngine, heads: Sequence[tuple[int, int]]) -> None:
        self.heads: list[ProbedHead] = []
        layers = engine.layers
        self.handles = []
        for layer, head in heads:
            if not (0 <= layer < len(layers) and 0 <= head < layers[layer].self_attn.config.num_attention_heads):
                raise ValueError(f"grounding head {(layer, head)} is not in this model ({len(layers)} layers)")
            hook = self._hook(head)
            self.handles.append(layers[layer].self_attn.register_forward_hook(hook, with_kwargs=True))

    def _hook(self, head: int) -> Callable[..., None]:
        def hook(module: Any, args: Any, kwargs: dict[str, Any], output: Any) -> None:  # a Qwen2_5_VLAttention
            hidden = kwargs["hidden_states"]  # (B, n, d), already through input_layernorm
            b, n, _ = hidden.shape
            hd = module.head_dim
            kv = head // module.num_key_value_groups
            query = module.q_proj(hidden).view(b, n, -1, hd)[:, :, head : head + 1].transpose(1, 2)  # (B, 1, n, hd)
            key = module.k_proj(hidden).view(b, n, -1, hd)[:, :, kv : kv + 1].transpose(1, 2)  # (B, 1, n, hd)
            cos, sin = kwargs["position_embeddings"]
            query, key = apply_rotary_pos_emb(query, key, cos, sin)
            self.heads.append(ProbedHead(query[:, 0].float(), key[:, 0].float(), float(module.scaling)))

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _attention_share_loss(
    heads: Sequence[ProbedHead],
    batch: dict[str, torch.Tensor],
    image_id: int,
    targets: torch.Tensor,
    rows: torch.Tensor,
) -> torch.Tensor:
    """Mean over the probed ``heads`` and the query positions ``rows`` (``(B, n)`` bool) of ``-log`` of the share of
    the head's image attention that rests on ``targets`` (``(B, n, n)`` or ``(B, 1, n)`` bool over keys). A head that
    looks only at the targets pays 0; one spread evenly over the image pays log(image / target tokens). Zero when
    there are no rows. Only the rows' logits are computed, under the causal and padding mask."""
    if not heads or not bool(rows.any()):
        return torch.zeros(())
    n = rows.shape[1]
    sample, row = rows.nonzero(as_tuple=True)  # (R,) each, in (sample, position) order
    allowed = (torch.arange(n)[None, :] <= row[:, None]) & batch["attention_mask"].bool()[sample]  # (R, n)
    image = (batch["input_ids"][sample] == image_id).float()  # (R, n)
    on = targets.expand(-1, n, -1)[sample, row].float()  # (R, n); a view, for targets per sample too
    loss = torch.zeros(())
    for head in heads:
        probs = head.logits(sample, row).masked_fill(~allowed, float("-inf")).softmax(-1)  # (R, n)
        share = (probs * on).sum(-1) / (probs * image).sum(-1).clamp_min(1e-9)
        loss = loss - share.clamp_min(1e-6).log().mean()
    return loss / len(heads)


def _answer_rows(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, n) bool: the positions that predict an answer token (position i predicts token i + 1)."""
    rows = torch.zeros_like(batch["labels"], dtype=torch.bool)
    rows[:, :-1] = batch["labels"][:, 1:] != -100
    return rows


def _grounding_loss(heads: Sequence[ProbedHead], batch: dict[str, torch.Tensor], image_id: int) -> torch.Tensor:
    """:func:`_attention_share_loss` on the target's tokens (``collate``'s ``ground``) at every position that predicts
    an answer token, over the samples that mark a target. Zero when none does."""
    ground = batch["ground"]
    rows = _answer_rows(batch) & ground.any(1)[:, None]
    return _attention_share_loss(heads, batch, image_id, ground[:, None, :], rows)


def _pointer_loss(heads: Sequence[ProbedHead], batch: dict[str, torch.Tensor], image_id: int) -> torch.Tensor:
    """:func:`_attention_share_loss` at each position that predicts an answer character whose image tokens are known
    (``collate``'s ``pointer``), on those tokens: the head reads the answer where it is written, character by
    character. Zero when no sample points anywhere."""
    pointer = batch["pointer"]
    return _attention_share_loss(heads, batch, image_id, pointer, pointer.any(-1))


def _referent_loss(head: torch.nn.Linear, hidden: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of ``head`` on ``hidden`` (the input of layer K, ``(B, n, d)``) against the colour or quadrant
    the question names (``collate``'s ``referent``), at every position that predicts an answer token (where the
    grounding heads look and, for the first, the SD-RPN's query), over the samples that name one. Zero when none do."""
    referent = batch["referent"]
    rows = _answer_rows(batch) & (referent >= 0)[:, None]
    if not bool(rows.any()):
        return torch.zeros(())
    targets = referent[:, None].expand_as(rows)[rows]
    return torch.nn.functional.cross_entropy(head(hidden[rows].float()), targets)


def _reading_loss(
    reader: torch.nn.Linear,
    merged: torch.Tensor,
    batch: dict[str, torch.Tensor],
    groups: Sequence[int] | None = None,
) -> torch.Tensor:
    """The reading head's cross-entropy on the batch's labelled tokens (``collate``'s ``reading_mask``), summed over
    :data:`READ_GROUPS` (or those of them numbered in ``groups``): per group a softmax over its classes and one more,
    "nothing"; a token that shows two glyph centres has both as a soft target. In each group the tokens that show
    something and those that show nothing are averaged apart and the two means added, so the few tokens with a glyph
    weigh as much as the many without. Zero when nothing is labelled.

    ``reader`` maps the vision tower's merged tokens (N, hidden) to :data:`READ_LOGITS` logits, group after group,
    each group's "nothing" last."""
    keep = batch["reading_mask"]
    if not bool(keep.any()):
        return torch.zeros(())
    logits = reader(merged[keep])
    marks_all = batch["reading"][keep]  # (n, classes) multi-hot
    loss = torch.zeros(())
    first = 0
    for g, group in enumerate(READ_GROUPS):
        marks = marks_all[:, first : first + len(group)]
        group_logits = logits[:, first + g : first + g + len(group) + 1]
        first += len(group)
        if groups is not None and g not in groups:
            continue
        shows = marks.any(-1)
        target = torch.cat([marks, (~shows).float()[:, None]], dim=-1)
        target = target / target.sum(-1, keepdim=True)
        per_token = torch.nn.functional.cross_entropy(group_logits, target, reduction="none")
        if bool((~shows).any()):
            loss = loss + per_token[~shows].mean()
        if bool(shows.any()):
            loss = loss + per_token[shows].mean()
    return loss


_DRILL_KINDS: tuple[PlateKind, ...] = ("code", "code", "letter", "shape", "pattern")  # reading and answer drills
_DRILL_BORDER_MAX = 6  # an answer drill's plate border (its detail starts 5-9 px further in)


def reading_drill(rng: random.Random, side: int, zoom: float = 1.0) -> tuple[Image.Image, torch.Tensor]:
    """A ``side`` x ``side`` px image (a multiple of 28) of one plate detail drawn as on a plate, at a random
    sub-pixel-free offset (codes may run off an edge), on the card of a plate of a random colour, sometimes beside
    its border (a band of the colour along one edge); and its reading targets as :func:`reading_targets` marks them
    (each glyph, shape or pattern on the token holding its centre, with its place in a code; glyphs whose centre is
    off the image are not marked; every token with the card's colour). ``zoom`` > 1 draws the drill ``zoom`` times
    larger and downscales it to ``side`` (bicubic, as the processor resizes a zoom box larger than the budget).

    Why: a ViT with 14 px patches learns a glyph separately at every offset inside a patch, so it needs many samples;
    these cost a fraction of a benchmark crop (4-9 tokens, no scene to render), so phase 0 sees several times more.
    The downscaled ones are what a zoom box of several coarse cells on a large canvas shows (up to about 2x).
    """
    kind = rng.choice(_DRILL_KINDS)
    colour = rng.choice(tuple(COLOURS))
    detail, centres = render_detail(kind, detail_value(rng, kind), detail_size(rng, kind), colour)
    big = round(side * zoom)
    image = Image.new("RGB", (big, big), plate_fill(colour))  # (a pattern's tile is ink at its corner)
    if rng.random() < 0.5:  # the plate's border along one edge, as near its rim
        band = rng.randint(3, 12)
        edge = rng.randrange(4)
        box = [(0, 0, band, big), (big - band, 0, big, big), (0, 0, big, band), (0, big - band, big, big)][edge]
        image.paste(COLOURS[colour], box)
    fits_x = big - detail.width
    x = rng.randint(min(0, fits_x), max(0, fits_x)) if kind == "code" else rng.randint(0, max(0, fits_x))
    y = rng.randint(0, max(0, big - detail.height))
    image.paste(detail, (x, y))
    if big != side:
        image = image.resize((side, side), Image.Resampling.BICUBIC)
    g = side // PATCH_PX
    targets = torch.zeros(g * g, len(READ_CLASSES))
    targets[:, READ_CLASSES.index(f"on {colour}")] = 1.0  # the whole image is the card (a band is under 14 px)
    targets[:, READ_CLASSES.index("is plate")] = 1.0
    for place, (cx, cy, name) in enumerate(centres):
        px, py = (x + cx) * side / big, (y + cy) * side / big
        if 0 <= px < side and 0 <= py < side:
            token = int(py // PATCH_PX) * g + int(px // PATCH_PX)
            _mark(targets, token, name)
            if kind == "code":
                _mark(targets, token, f"glyph {place + 1}")
    return image, targets


def answer_drill(
    rng: random.Random, pair_frac: float, position_frac: float = 0.0
) -> tuple[Image.Image, str, str, str, tuple[int, int, int, int]]:
    """A small image (a multiple of 28 px a side) of one plate, or with probability ``pair_frac`` two plates of
    different colours showing different details of one kind, side by side or stacked, drawn as in a scene at
    native scale on a flat grey ground with a margin of 2-28 px; the question its family asks about the first plate
    (by colour), the answer, the family, and that plate's box. A pair of codes is, with probability
    ``position_frac``, two plates in different quadrants of the image instead, the first named by its quadrant
    (the ``code_at`` question).

    Why: the decoder learns to map the tower's glyph tokens to answer characters, in a code's order, and to pick a
    plate by its colour or quadrant, on sequences of 8-50 image tokens, several times cheaper than a benchmark crop.
    """
    kind = rng.choice(_DRILL_KINDS)
    n = 2 if rng.random() < pair_frac else 1
    colours = rng.sample(tuple(COLOURS), n)
    values: list[str] = []
    while len(values) < n:
        value = detail_value(rng, kind)
        if value not in values:
            values.append(value)
    plates = [
        render_plate(
            kind, value, detail_size(rng, kind), colour, border=rng.randint(3, _DRILL_BORDER_MAX), pad=rng.randint(5, 9)
        )
        for value, colour in zip(values, colours, strict=True)
    ]
    # `position_frac > 0` first: at 0 the draws are the ones made before quadrant pairs existed (r12's stream).
    if position_frac > 0 and n == 2 and kind == "code" and rng.random() < position_frac:
        return _quadrant_drill(rng, plates, values[0])
    order = list(range(n))
    rng.shuffle(order)  # the asked-about plate comes first or second
    gap = rng.randint(4, 28)
    side_by_side = rng.random() < 0.5
    if side_by_side:
        content = (sum(p.width for p in plates) + gap * (n - 1), max(p.height for p in plates))
    else:
        content = (max(p.width for p in plates), sum(p.height for p in plates) + gap * (n - 1))
    w = PATCH_PX * math.ceil((content[0] + rng.randint(4, 56)) / PATCH_PX)
    h = PATCH_PX * math.ceil((content[1] + rng.randint(4, 56)) / PATCH_PX)
    grey = rng.randint(120, 200)
    image = Image.new("RGB", (w, h), (grey, grey, grey))
    x, y = rng.randint(0, w - content[0]), rng.randint(0, h - content[1])
    box = (0, 0, 0, 0)
    for i in order:
        image.paste(plates[i], (x, y))
        if i == 0:
            box = (x, y, x + plates[i].width, y + plates[i].height)
        if side_by_side:
            x += plates[i].width + gap
        else:
            y += plates[i].height + gap
    return image, TEMPLATES[kind].format(colour=colours[0]), values[0], kind, box


def _quadrant_drill(
    rng: random.Random, plates: Sequence[Image.Image], answer: str
) -> tuple[Image.Image, str, str, str, tuple[int, int, int, int]]:
    """:func:`answer_drill`'s quadrant pair: the image split in four equal cells (each a multiple of 28 px, large
    enough for either plate), the two plates at random places inside two different cells, the question naming the
    first plate's quadrant as the benchmark's ``code_at`` does (quadrant q = 2 * row + column)."""
    cell_w = PATCH_PX * math.ceil((max(p.width for p in plates) + rng.randint(4, 28)) / PATCH_PX)
    cell_h = PATCH_PX * math.ceil((max(p.height for p in plates) + rng.randint(4, 28)) / PATCH_PX)
    grey = rng.randint(120, 200)
    image = Image.new("RGB", (2 * cell_w, 2 * cell_h), (grey, grey, grey))
    quadrants = rng.sample(range(4), 2)
    box = (0, 0, 0, 0)
    for i, (plate, q) in enumerate(zip(plates, quadrants, strict=True)):
        x = (q % 2) * cell_w + rng.randint(0, cell_w - plate.width)
        y = (q // 2) * cell_h + rng.randint(0, cell_h - plate.height)
        image.paste(plate, (x, y))
        if i == 0:
            box = (x, y, x + plate.width, y + plate.height)
    return image, TEMPLATES["code_at"].format(position=POSITIONS[quadrants[0]]), answer, "code_at", box


def referent_drill(rng: random.Random) -> tuple[Image.Image, str, str, str]:
    """A blank 56 px image of a random grey and a detail family's question naming a random colour or quadrant, with a
    random answer of the family (the referent phase trains on the question's words alone; its answer loss is off).

    Why: a sequence of 4 image tokens costs a fiftieth of a coarse view, and on it the layers below K learn in about
    50 steps to carry the question's colour or quadrant word to the answer positions, which among 256 image tokens
    they had not learned after 400 steps (``BaseRecipe.referent_steps``).
    """
    family = rng.choice(sorted(DETAIL_FAMILIES))
    question = TEMPLATES[family].format(colour=rng.choice(tuple(COLOURS)), position=rng.choice(POSITIONS))
    grey = rng.randint(110, 210)
    image = Image.new("RGB", (2 * PATCH_PX, 2 * PATCH_PX), (grey, grey, grey))
    return image, question, rng.choice(ANSWER_VOCAB[family]), family


def pretrain_reading(
    model: QZoomQwen2_5_VLForConditionalGeneration,
    reader: torch.nn.Linear,
    builder: ExampleBuilder,
    rng: random.Random,
    recipe: BaseRecipe,
    pools: dict[str, ItemPool] | None = None,
    *,
    progress: bool,
    log: Callable[[str], None],
) -> None:
    """Phase 0: the vision tower and the reading head on the reading loss alone, on :func:`reading_drill` images
    and, with ``pools``, on coarse views of their items (:func:`coarse_reading_targets`; the decoder is not run)."""
    vision = model.model.visual
    params = [*vision.parameters(), *reader.parameters()]
    optimizer = torch.optim.AdamW(params, lr=recipe.read_lr, weight_decay=recipe.weight_decay)
    started = time.perf_counter()
    ema: float | None = None  # drills' loss
    coarse_ema: float | None = None  # coarse views' loss
    bar = tqdm(range(recipe.read_steps), desc="base: reading", disable=not progress, dynamic_ncols=True)
    sides = range(2 * PATCH_PX, recipe.read_side_max + 1, PATCH_PX)
    pool_list = list(pools.values()) if pools else []
    for step in bar:
        groups: Sequence[int] | None = None
        if pool_list and rng.random() < recipe.read_coarse_frac:
            pool_list[step % len(pool_list)].refresh(recipe.refresh)
            picks = [rng.choice(rng.choice(pool_list).items) for _ in range(recipe.read_coarse_batch)]
            images, labels = [p.coarse for p in picks], [coarse_reading_targets(p) for p in picks]
            groups = COARSE_READ_GROUPS
        else:
            side = rng.choice(sides)
            drills = [
                reading_drill(rng, side, _zoom(rng, recipe.zoom_frac, recipe.zoom_max))
                for _ in range(recipe.read_batch_size)
            ]
            images, labels = [image for image, _ in drills], [t for _, t in drills]
        prepared = [builder.engine._preprocess(image, builder.min_pixels, builder.max_pixels) for image in images]
        targets = torch.cat(labels)
        batch = {
            "reading": targets,
            "reading_mask": torch.ones(targets.shape[0], dtype=torch.bool),
        }
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, recipe.read_steps, recipe, peak=recipe.read_lr)
        with torch.enable_grad():
            pixels = torch.cat([p for p, _ in prepared])
            grids = torch.stack([g for _, g in prepared])
            merged = vision(pixels, grid_thw=grids).pooler_output
            loss = _reading_loss(reader, merged, batch, groups)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if groups is None:
            ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        else:
            coarse_ema = loss.item() if coarse_ema is None else 0.9 * coarse_ema + 0.1 * loss.item()
        bar.set_postfix(read=f"{ema or 0:.3f}", coarse=f"{coarse_ema or 0:.3f}")
        if not progress and (step + 1) % 100 == 0:
            log(
                f"base reading step {step + 1}/{recipe.read_steps} loss {ema or 0:.4f} coarse {coarse_ema or 0:.4f} "
                f"{time.perf_counter() - started:.0f}s"
            )


def _log_checks(
    engine: QZoomEngine,
    items: Sequence[SyntheticItem],
    log: Callable[[str], None],
    when: str,
    scenes: Sequence[SyntheticItem] = (),
) -> None:
    views: tuple[View, ...] = ("crop", "fused", "coarse")
    for view in views:
        acc = view_accuracy(engine, items, view)
        log(f"base {when}: {view:<6} " + " ".join(f"{k} {v:.2f}" for k, v in acc.items()))
    if scenes:
        acc = view_accuracy(engine, scenes, "coarse")
        log(f"base {when}: scene  " + " ".join(f"{k} {v:.2f}" for k, v in acc.items()))


def _is_branch(name: str) -> bool:
    return any(part in name for part in ("twig_layers", "high_res_layers", "high_res_head"))


# --------------------------------------------------------------------------------------------------------- checks


def iter_batches(examples: Sequence[Example], size: int) -> Iterator[Sequence[Example]]:
    for i in range(0, len(examples), size):
        yield examples[i : i + size]


@torch.no_grad()
def view_accuracy(
    engine: QZoomEngine,
    items: Sequence[SyntheticItem],
    view: View,
    *,
    crop_size: int = 224,
    batch_size: int = 16,
) -> dict[str, float]:
    """Teacher-forced exact match per family of ``view`` on ``items`` (greedy decoding gives the same verdict).

    ``crop``: a ``crop_size`` native crop centred on the target; ``coarse``: the whole image at the model's
    budget; ``fused``: coarse view + the crop of the target's coarse-grid cells, spliced as a zoom step would.
    """
    settings = engine.settings
    min_px, max_px = settings.min_pixels or 4 * PATCH_PX**2, settings.max_pixels or COARSE_TOKENS * PATCH_PX**2
    builder = ExampleBuilder(engine, min_px, max_px)
    examples = []
    for item in items:
        p = pool_item(item, min_px, max_px, reach=crop_size)
        if view == "crop":
            examples.append(builder.crop(p, crop_size, None))
        elif view == "coarse":
            examples.append(builder.single(p.coarse, item.question, item.answer, item.family, "coarse"))
        else:
            examples.append(builder.fused(p, None))
    hits: dict[str, list[bool]] = {}
    was_training = engine.model.training
    engine.model.eval()
    for chunk in iter_batches(examples, batch_size):
        _, ok = answer_loss_and_hits(engine.model, collate(chunk, engine.pad_id))
        for e, good in zip(chunk, ok.tolist(), strict=True):
            hits.setdefault(e.family, []).append(bool(good))
    engine.model.train(was_training)
    return {family: sum(v) / len(v) for family, v in sorted(hits.items())}
