"""Training the demo model's backbone from scratch on the synthetic high-res benchmark.

Contract:

* :func:`~qzoom.demo.model.build_demo_model` (:mod:`qzoom.demo.model`) makes the randomly initialised Qwen2.5-VL of a
  few million parameters; its sequences, reading targets and drills are built in :mod:`qzoom.demo.examples`.
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
  around the target with the answer loss (short sequences first: what gets a from-scratch model off the ground;
  with the tower unfrozen the reading loss on :func:`reading_targets` of the crop rides along). The *mixed*
  phase mixes those crops with the coarse view of the coarse families (colour,
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

import math
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb

from qzoom.checkpoint import save_checkpoint
from qzoom.demo.examples import (
    COARSE_READ_GROUPS,
    READ_GROUPS,
    READ_LOGITS,
    REFERENTS,
    Example,
    ExampleBuilder,
    ItemPool,
    View,
    _zoom,
    answer_drill,
    coarse_reading_targets,
    collate,
    image_keys,
    iter_batches,
    model_inputs,
    pool_item,
    reading_drill,
    referent_drill,
)
from qzoom.demo.model import BaseRecipe, build_demo_model
from qzoom.engine import QZoomEngine
from qzoom.evals.synthetic import (
    COARSE_FAMILIES,
    COARSE_TOKENS,
    CODE_FAMILIES,
    DETAIL_FAMILIES,
    FAMILIES,
    PATCH_PX,
    SyntheticItem,
    iterate,
)
from qzoom.modeling import QZoomQwen2_5_VLForConditionalGeneration


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
