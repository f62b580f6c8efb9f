"""Stage 3: the dynamic gate on consistency-aware labels (spec §5.2). Trains ``high_res_layers`` and
``high_res_head`` only.

Contract of :func:`train_stage3`:

1. **Ladder.** The frozen input model (a Stage-2, or Stage-1, checkpoint) answers every item on the coarse view
   alone at each budget of ``config.ladder`` (merged tokens, ascending; the view is resized to exactly that budget:
   ``min_pixels = max_pixels = budget * 28²``, as the reference re-processes it).
2. **Labels** (:mod:`qzoom.train.labels`), by ``config.signal``:

   * ``consistency`` (the paper): :func:`~qzoom.train.labels.filter_pool` keeps the monotone transition ladders plus
     as many all-correct ones (seeded), :func:`~qzoom.train.labels.cap_pool` caps the pool (``max_samples``, shuffle
     seed 42), and :func:`~qzoom.train.labels.gate_step_label` draws one ``(budget, label)`` per ladder from
     ``random.Random(seed)``: 1 = needs zooming at that budget, 0 = the coarse view is enough; ignored draws are
     dropped.
   * ``prediction_vs_gt`` (the reference's ablation, ``DQ:1142-1173``): one budget below the top two per ladder,
     labelled by :func:`~qzoom.train.labels.prediction_vs_gt_label` (is the answer there right?). ``pool="matched"``
     takes as many ladders, drawn with ``random.Random(42)``, as the consistency filter would keep (the reference);
     ``pool="all"`` takes every ladder, and the top two budgets are then never answered (no label reads them). This
     suits a model whose answers above its training budgets are noise: the consistency filter finds its top two
     budgets in disagreement on most ladders and keeps almost nothing (the demo model, docs/demo_model.md).
3. **Training.** At the drawn budget the frozen layers below the branch point give the last prompt token's
   hidden state route; the gate layers run on it with gradients and ``high_res_head`` gives a logit (the same
   computation as ``engine.gate``: last prompt token, no final norm). BCE with the label.
4. **Threshold** (``config.high_res_thresh``): a number is written into the checkpoint as it is; ``"youden"`` or
   ``"recall"``: every item is answered once more on the coarse view as served, and the trained gate's scores of the
   wrong answers against the right ones choose it (:func:`choose_threshold`; not in the paper, which tunes τ_gate per
   benchmark): the best Youden's J, or the highest threshold that fires on ``config.gate_recall`` of the wrong
   answers (and, with ``config.gate_max_fpr``, on at most that share of the right ones, or as near both bounds as the
   scores allow: :func:`~qzoom.train.labels.recall_threshold`). It is recorded with its TPR and FPR in the run
   summary; None keeps the model's. The items answered are
   ``calibration`` when given (items the gate did not train on, whose scores are as sure as a new question's), else
   the training items.
5. A model with an SD-RPN but no gate gets one first: ``high_res_layers`` copied from ``layers[K:K+T]`` (the
   documented intent, spec §9.6), a fresh ``high_res_head``; ``high_res_K`` / ``high_res_T`` default to the twig's.

:func:`calibrate_gate` (``qzoom train gate-threshold``) is step 4 alone on a finished checkpoint: the same rules on
the items given, the threshold written into its ``config.json``, no weight changed.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from qzoom.engine import QZoomEngine, SequenceState, _run_layers
from qzoom.train.common import (
    RunDir,
    TrainConfig,
    TrainingError,
    TrainItem,
    answer_batch,
    fit,
    items_fingerprint,
    load_for_training,
    make_engine,
    mine,
    named_trainable,
    new_states,
    unfreeze,
    update_config,
)
from qzoom.train.labels import (
    IGNORE_INDEX,
    GateThreshold,
    LadderKind,
    LadderSample,
    answer_right,
    cap_pool,
    filter_pool,
    gate_step_label,
    prediction_vs_gt_label,
    prediction_vs_gt_range,
    recall_threshold,
    youden_threshold,
)

ThresholdRule = Literal["youden", "recall"]

LADDER_FILE = "stage3_ladders.jsonl"
EXAMPLES_FILE = "stage3_examples.json"
PIXELS_PER_TOKEN = 28 * 28


class Stage3Config(TrainConfig):
    """Stage-3 recipe (spec §5.2): lr 1e-4, cosine, one epoch, at most 20000 ladders."""

    ladder: list[int] = Field(
        default_factory=lambda: [64, 128, 256, 576, 1024], description="token budgets, ascending, at least 3"
    )
    signal: Literal["consistency", "prediction_vs_gt"] = Field(
        "consistency", description="gate labels: consistency over the ladder (paper) or the answer vs GT (ablation)"
    )
    pool: Literal["matched", "all"] = Field(
        "matched", description="prediction_vs_gt: as many ladders as the consistency filter keeps (reference), or all"
    )
    p_refine: float = Field(0.9, ge=0, le=1, description="probability of drawing a 'needs zoom' step on a transition")
    max_samples: int | None = Field(20000, ge=1, description="ladders kept after filtering (None: all)")
    strip_gt_punctuation: bool = False
    high_res_thresh: Annotated[float, Field(gt=0, lt=1)] | ThresholdRule | None = Field(
        None,
        description="gate decision threshold written into the checkpoint: a number in (0, 1); 'youden' or 'recall', "
        "chosen on the training items after training (choose_threshold); None keeps the model's",
    )
    gate_recall: float = Field(
        0.95, gt=0, le=1, description="high_res_thresh='recall': the share of wrong coarse answers the gate fires on"
    )
    gate_max_fpr: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="high_res_thresh='recall': the largest share of right coarse answers it may fire on (one minus the "
        "skip rate); where both bounds cannot hold, the threshold that misses them least (None: recall alone)",
    )
    high_res_K: int | None = Field(None, ge=1, description="gate branch point for a model without a gate (twig_K)")
    high_res_T: int | None = Field(None, ge=1, description="gate depth for a model without a gate (twig_T)")

    @field_validator("ladder")
    @classmethod
    def _ascending(cls, value: list[int]) -> list[int]:
        if len(value) < 3 or any(b <= a for a, b in itertools.pairwise(value)) or value[0] < 4:
            raise ValueError(
                f"the ladder takes at least 3 strictly ascending token budgets of 4 or more (the top two are the "
                f"reference; labels are drawn below them), e.g. 64,128,256,576,1024; got {value}"
            )
        return value


def answered_budgets(config: Stage3Config) -> list[int]:
    """The ladder budgets whose answers some label reads: all, except the top two for ``prediction_vs_gt`` on
    ``pool="all"``."""
    if config.signal == "prediction_vs_gt" and config.pool == "all":
        return config.ladder[: prediction_vs_gt_range(len(config.ladder))]
    return list(config.ladder)


def ladder_records(engine: QZoomEngine, items: Sequence[TrainItem], config: Stage3Config) -> list[dict[str, Any]]:
    """Per item: the model's coarse answer at each budget of :func:`answered_budgets` (``answers`` may be shorter
    than ``res``, the full ladder)."""
    answers: list[list[str]] = [[] for _ in items]
    for budget in answered_budgets(config):
        pixels = budget * PIXELS_PER_TOKEN
        options = config.options(min_pixels=pixels, max_pixels=pixels)
        for per_item, answer in zip(answers, answer_batch(engine, items, options), strict=True):
            per_item.append(answer)
    return [
        {"uid": item.uid, "res": list(config.ladder), "answers": a, "gt": item.answer}
        for item, a in zip(items, answers, strict=True)
    ]


def gate_examples(records: Sequence[dict[str, Any]], config: Stage3Config) -> tuple[list[list[int]], dict[str, int]]:
    """``[item index, budget, label]`` training examples from ladder records (spec §5.2), and the pool's counts."""
    ladders = [
        LadderSample(res=list(r["res"]), answers=list(r["answers"]), gt=str(r["gt"]), payload=int(r["index"]))
        for r in records
    ]
    counts: dict[str, int] = {}
    chosen = ladders  # prediction_vs_gt on pool="all": every ladder, the consistency filter never runs
    if config.signal == "consistency" or config.pool == "matched":
        pool = filter_pool(ladders, seed=config.seed, strip_gt_punctuation=config.strip_gt_punctuation)
        counts = {str(kind): pool.counts[kind] for kind in LadderKind}
        if config.signal == "consistency":
            chosen = pool.kept
        elif len(pool.kept) < len(ladders):
            # As the reference's dataset does for prediction_vs_gt: a random.Random(42) sample of the raw ladders, as
            # many as the hard-case pool holds.
            chosen = [ladders[i] for i in random.Random(42).sample(range(len(ladders)), len(pool.kept))]
    kept = cap_pool(chosen, config.max_samples)
    rng = random.Random(config.seed)
    examples = []
    for sample in kept:
        if config.signal == "consistency":
            budget, label = gate_step_label(
                sample, rng, p_refine=config.p_refine, strip_gt_punctuation=config.strip_gt_punctuation
            )
        else:
            budget, label = prediction_vs_gt_label(sample, rng)
        if label != IGNORE_INDEX:
            examples.append([int(sample.payload), budget, label])
    counts.update(kept=len(kept), examples=len(examples), positives=sum(e[2] == 1 for e in examples))
    return examples, counts


def gate_logits(engine: QZoomEngine, states: Sequence[SequenceState]) -> torch.Tensor:
    """``(B,)`` gate logits with gradients to the gate branch (``engine.gate`` before its sigmoid)."""
    with torch.inference_mode():
        frozen = engine._branch_input(states, engine.settings.high_res_K)
    hidden = [h.clone() for h in frozen]  # out of inference mode: autograd may save them
    positions = [st.positions.clone() for st in states]
    out, _ = _run_layers(engine.gate_layers, engine.lm.rotary_emb, engine.attn_impl, hidden, positions)
    assert engine.gate_head is not None
    last = torch.stack([h[-1] for h in out])  # (B, d): the last prompt token, no final norm
    logits: torch.Tensor = engine.gate_head(last).squeeze(-1)
    return logits


def stage3_loss(
    engine: QZoomEngine, items: Sequence[TrainItem], examples: Sequence[Sequence[int]], config: Stage3Config
) -> torch.Tensor:
    """BCE of the gate logit at each example's budget against its label."""
    states = []
    for item, (_, budget, _) in zip(items, examples, strict=True):
        pixels = budget * PIXELS_PER_TOKEN
        states += new_states(engine, [item], config.options(min_pixels=pixels, max_pixels=pixels))
    engine.prepare(states)
    engine.encode(states)
    engine.prefill(states)
    with config.autocast_context():
        logits = gate_logits(engine, states)
    labels = torch.tensor([float(e[2]) for e in examples], device=logits.device)
    return F.binary_cross_entropy_with_logits(logits.float(), labels)


def gate_scores(engine: QZoomEngine, items: Sequence[TrainItem], config: Stage3Config) -> tuple[list[float], list[int]]:
    """The trained gate's probability on each item's coarse view as served (the pixel budget of ``config.options()``:
    the checkpoint's unless the run sets one), and whether the model answers the item wrong there (1) or right (0,
    :func:`~qzoom.train.labels.answer_right` against GT).

    The probability comes from the training path (:func:`gate_logits`): the engine's prefix cache may hold gate
    outputs from before training.
    """
    scores: list[float] = []
    labels: list[int] = []
    options = config.options()
    for start in range(0, len(items), config.mine_batch_size):
        chunk = items[start : start + config.mine_batch_size]
        states = new_states(engine, chunk, options)
        engine.prepare(states)
        engine.encode(states)
        engine.prefill(states)
        with torch.inference_mode(), config.autocast_context():
            scores += gate_logits(engine, states).float().sigmoid().tolist()
        engine.finish(states)
        engine.decode(states)
        labels += [0 if answer_right(st.answer, item.answer) else 1 for st, item in zip(states, chunk, strict=True)]
    return scores, labels


def choose_threshold(
    engine: QZoomEngine, items: Sequence[TrainItem], config: Stage3Config, rule: ThresholdRule
) -> GateThreshold | None:
    """The threshold at which the trained gate tells the items the model answers wrong on the coarse view as served
    from those it answers right (:func:`gate_scores`): by ``rule``, the best Youden's J
    (:func:`~qzoom.train.labels.youden_threshold`) or the highest threshold that fires on ``config.gate_recall`` of
    the wrong ones, bounded by ``config.gate_max_fpr`` on the right ones when set
    (:func:`~qzoom.train.labels.recall_threshold`).

    At the view the gate decides on, not at the ladder's budgets it was trained across: on the demo model the examples'
    mixed budgets (a quarter of them at 64 tokens, where the coarse questions fail too) put the threshold at 0.89,
    which would skip the pattern questions the gate is for. The gate has seen these items, so its scores are a little
    surer than on new questions; the threshold is one number fitted on hundreds.
    """
    scores, labels = gate_scores(engine, items, config)
    if rule == "recall":
        return recall_threshold(scores, labels, config.gate_recall, config.gate_max_fpr)
    return youden_threshold(scores, labels)


def threshold_record(
    rule: ThresholdRule, chosen: GateThreshold | None, config: Stage3Config, *, on: str, items: int
) -> dict[str, Any]:
    """What a run summary records of a chosen threshold: the rule, the items it read (``on``: which ones, and how
    many), the value written (4 decimals; None with the reason when nothing could be chosen) with its TPR and FPR."""
    record: dict[str, Any] = {"rule": rule, "on": on, "items": items}
    if rule == "recall":
        record["recall"] = config.gate_recall
        if config.gate_max_fpr is not None:
            record["max_fpr"] = config.gate_max_fpr
    if chosen is None:
        return {**record, "value": None, "why": "the answers were all right or all wrong"}
    return {
        **record,
        "value": round(chosen.value, 4),
        "tpr": round(chosen.tpr, 4),
        "fpr": round(chosen.fpr, 4),
        "positives": chosen.positives,
        "negatives": chosen.negatives,
    }


def calibrate_gate(
    model_dir: str | Path,
    items: Sequence[TrainItem],
    config: Stage3Config,
    rule: ThresholdRule = "youden",
    *,
    source: str = "given",
) -> dict[str, Any]:
    """Choose τ_gate for a trained checkpoint on `items` by `rule` (:func:`choose_threshold`) and write it into
    ``model_dir/config.json`` (``high_res_thresh``, and the :func:`threshold_record` in ``qzoom_training`` as stage
    ``gate_threshold``; ``source`` names the items there); returns the record. Nothing is written when the answers
    hold one class only.

    The paper tunes τ_gate per benchmark: this is that step, on a user's own labelled items, without training
    (``qzoom train gate-threshold``). It reads the items' answers, never a box.
    """
    if len(items) < 2:
        raise TrainingError(f"gate calibration needs at least two items with a reference answer; got {len(items)}")
    model, processor = load_for_training(model_dir, config)
    if not model.qzoom.enable_high_res:
        raise TrainingError(f"{model_dir} has no gate (enable_high_res is false): train Stage 3 first")
    engine = make_engine(model, processor)
    chosen = choose_threshold(engine, items, config, rule)
    record = threshold_record(rule, chosen, config, on=source, items=len(items))
    if record["value"] is not None:
        update_config(model_dir, {"high_res_thresh": record["value"]}, {"stage": "gate_threshold", "threshold": record})
    return record


def train_stage3(
    model_dir: str | Path,
    items: Sequence[TrainItem],
    out_dir: str | Path,
    config: Stage3Config | None = None,
    calibration: Sequence[TrainItem] | None = None,
) -> Path:
    """Stage 3 on `items` (image, question, reference answer) -> a qzoom checkpoint with a trained gate in `out_dir`.

    `calibration`: items (image, question, reference answer) that only choose the threshold of a rule
    (``config.high_res_thresh`` "youden" / "recall"); default: the training items. Resumable like every stage:
    rerunning with the same arguments continues; a finished run returns at once.
    """
    config = config or Stage3Config()
    identity = {
        "model": str(Path(model_dir).resolve()),
        "items": items_fingerprint(items),
        "calibration": items_fingerprint(calibration) if calibration else None,
        **config.run_identity(),
    }
    run = RunDir(out_dir, "stage3", identity)
    if run.done:
        return run.out
    model, processor = load_for_training(model_dir, config)
    if not model.qzoom.enable_twig:
        raise TrainingError(f"{model_dir} has no SD-RPN (enable_twig is false): train Stage 1 (and 2) before Stage 3")
    if not model.qzoom.enable_high_res:
        model.attach_gate(config.high_res_K or model.qzoom.twig_K, config.high_res_T or model.qzoom.twig_T)
    engine = make_engine(model, processor)

    records = mine(
        run,
        LADDER_FILE,
        items,
        lambda indices, batch: [
            {"index": i, **r} for i, r in zip(indices, ladder_records(engine, batch, config), strict=True)
        ],
        batch_size=config.mine_batch_size,
        desc="stage 3 ladder",
        progress=config.progress,
    )
    examples, counts = gate_examples(records, config)
    run.save_json(EXAMPLES_FILE, {"counts": counts, "examples": examples})
    if not examples:
        raise TrainingError(
            f"no gate training example among {len(records)} ladders ({counts}): the gate needs items whose answer "
            "changes from wrong to right as the budget grows; use more items or another ladder (--ladder)"
        )

    unfreeze([engine.lm.high_res_layers, engine.lm.high_res_head])
    params = named_trainable(model)
    result = fit(
        run,
        params,
        examples,
        lambda batch: stage3_loss(engine, [items[e[0]] for e in batch], batch, config),
        config,
        desc="stage 3 (gate)",
    )
    summary: dict[str, Any] = {**counts, "steps": result.steps, "last_loss": result.last_loss, "lr": config.lr}
    # What the gate's probability means depends on its labels (a consistency transition vs a wrong answer), so the
    # stage that trains it may set the threshold it is read at.
    if isinstance(config.high_res_thresh, str):
        on = calibration or items
        chosen = choose_threshold(engine, on, config, config.high_res_thresh)
        summary["threshold"] = threshold_record(
            config.high_res_thresh, chosen, config, on="calibration" if calibration else "training", items=len(on)
        )
        if chosen is not None:
            model.config.high_res_thresh = summary["threshold"]["value"]
    elif config.high_res_thresh is not None:
        model.config.high_res_thresh = config.high_res_thresh
    return run.finish(model, processor, summary)
