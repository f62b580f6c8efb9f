"""The demo model's architecture: a Qwen2.5-VL of a few million parameters, randomly initialised.

Contract: :func:`build_demo_model` makes the stock architecture (windowed ViT, 2x2 merger, M-RoPE, GQA) at the sizes
of a :class:`BaseRecipe`, with the byte tokenizer and the offline processor (:mod:`qzoom.offline`) and the Q-Zoom
branch fields in its config (the branches are copied from the backbone after training; Stages 1-3 train them). Its
pixel budget is the synthetic benchmark's small one: at most :data:`~qzoom.evals.synthetic.COARSE_TOKENS` merged
tokens per view, and as few as :data:`MIN_VIEW_TOKENS` so that a small zoom crop is not upsampled. The recipe's
training fields are read by :func:`qzoom.demo.base.train_base`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qzoom.evals.synthetic import (
    COARSE_TOKENS,
    FAMILIES,
    PATCH_PX,
)
from qzoom.modeling import QZoomQwen2_5_VLForConditionalGeneration, enable_qzoom
from qzoom.offline import (
    NO_DEFAULT_SYSTEM_CHAT_TEMPLATE,
    OfflineQwen2_5_VLProcessor,
    build_processor,
    build_tokenizer,
    tiny_qwen25vl_config,
)

MIN_VIEW_TOKENS = 4  # a 56x56 crop stays at native resolution instead of being upsampled to the coarse budget


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
