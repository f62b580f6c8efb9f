"""Stage 2: targeted post-SFT on regression samples (spec §6). Trains the decoder layers and ``lm_head``.

Contract of :func:`train_stage2`:

1. **Mining** (:func:`mine_regressions`). The input checkpoint (a Stage-1 model: its LLM is still the base LLM)
   answers every item twice, greedily: A on the coarse view alone, B after one SD-RPN zoom step (propose, crop,
   re-encode, splice with aligned M-RoPE, exactly the inference path). A judge compares both with the reference
   answer; a *regression* is "A right, B wrong". The judge is :func:`qzoom.train.labels.exact_match_judge` by
   default, :func:`synthetic_judge` (the benchmark's own scoring) for synthetic items, or any
   :data:`~qzoom.train.labels.Judge` such as :func:`qzoom.train.labels.llm_judge` with the spec §6 prompt
   (:func:`hf_chat_generate` runs a local chat checkpoint for it). A sample where the RPN proposed no box has B = A
   and is never a regression. The proposed grid boxes are stored with each record.
2. **Training.** Each regression sample is rebuilt as the global+RoI prompt *by the engine's own steps*
   (``prepare``, ``encode``, ``embed``, then ``add_regions`` with the mined box: the same splice and aligned M-RoPE
   positions as inference) and followed by the target answer and ``<|im_end|>``; the target is the coarse answer
   A by default (the base response, spec §6) or the reference answer (``target="gt"``). Next-token cross-entropy on
   the target tokens only, through all decoder layers recomputed from the embeddings (KV reuse at inference is
   exact, spec §11.1, so this is the sequence inference runs). Trained: ``language_model.layers`` (from
   ``first_layer`` on) and ``lm_head``; frozen: embeddings, final norm, vision tower, twig and gate branches. With
   tied embeddings (Qwen2.5-VL-3B) the shared matrix is trained, as in the reference.
3. No regression at all is a legitimate outcome: the output is then the input model, unchanged, and the run's
   summary says so.

Two options beyond the paper, whose defaults are the paper's (:class:`Stage2Config`): ``samples="zoomed"`` trains on
every mined sample the SD-RPN zoomed on, with the reference answer as the target (SFT on the sequences inference
builds from the model's own boxes, for a model whose zoomed answers are often wrong, not only regressions); and
``first_layer=K`` freezes the decoder layers below K, so that with K at ``twig_K`` and ``high_res_K`` or above, the
hidden states the SD-RPN and the gate read are the ones Stage 1 and Stage 3 trained on, bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn
from torch.utils.checkpoint import checkpoint

from qzoom.engine import QZoomEngine, SequenceState, _run_layers
from qzoom.roi import GridBox
from qzoom.train.common import (
    RunDir,
    TrainConfig,
    TrainingError,
    TrainItem,
    fit,
    items_fingerprint,
    load_for_training,
    make_engine,
    mine,
    named_trainable,
    new_states,
    unfreeze,
)
from qzoom.train.labels import Judge, exact_match_judge

MINED_FILE = "stage2_mined.jsonl"


class Stage2Config(TrainConfig):
    """Stage-2 recipe (spec §6): lr 1e-6, one epoch; the target is the coarse (base) answer."""

    lr: float = Field(1e-6, gt=0, description="peak learning rate")
    target: Literal["answer", "gt"] = Field("answer", description="SFT target: the coarse answer A or the reference")
    roi_thresh: float | None = Field(None, ge=0, le=1, description="τ_roi while mining (default: the checkpoint's)")
    gradient_checkpointing: bool = Field(False, description="recompute each decoder layer in backward (less memory)")
    # Two extensions beyond the paper; their defaults are the paper's.
    samples: Literal["regressions", "zoomed"] = Field(
        "regressions",
        description="train on the regressions (the paper) or on every mined sample the SD-RPN zoomed on "
        "(needs target='gt': the answer through the model's own boxes is taught, right or wrong)",
    )
    first_layer: int = Field(
        0,
        ge=0,
        description="decoder layers below this index stay frozen; at twig_K / high_res_K or above, the SD-RPN's and "
        "the gate's inputs (layer K's hidden states) are left exactly as Stage 1 and 3 saw them",
    )

    @model_validator(mode="after")
    def _zoomed_needs_gt(self) -> Stage2Config:
        if self.samples == "zoomed" and self.target != "gt":
            raise ValueError(
                "samples='zoomed' trains on samples whose coarse answer may be wrong: use target='gt' "
                "(the reference answer), or samples='regressions' with target='answer'"
            )
        return self


def synthetic_judge(question: str, ground_truth: str, answer_a: str, answer_b: str) -> tuple[bool, bool]:
    """The synthetic benchmark's exact match (number words, articles, punctuation normalised) as a Judge."""
    from qzoom.evals.synthetic import exact_match

    del question
    return exact_match(answer_a, ground_truth), exact_match(answer_b, ground_truth)


def hf_chat_generate(
    model_dir: str | Path, *, device: str = "cpu", max_new_tokens: int = 16
) -> Callable[[str, str], str]:
    """``generate(system, user) -> reply`` with a local (Qwen2.5-VL) chat checkpoint, text only, greedy.

    For :func:`qzoom.train.labels.llm_judge`: the spec §6 judge is Qwen2.5-VL-7B-Instruct.
    """
    from qzoom.checkpoint import load_model
    from qzoom.offline import load_processor

    model = load_model(model_dir, device=device, dtype=torch.bfloat16 if device.startswith("cuda") else None)
    processor = load_processor(model_dir)
    tokenizer = processor.tokenizer

    def generate(system: str, user: str) -> str:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(model.device)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False)
        return str(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))

    return generate


# ---------------------------------------------------------------------------------------------------------------------
# Mining


def mine_regressions(
    engine: QZoomEngine, items: Sequence[TrainItem], judge: Judge, config: Stage2Config
) -> list[dict[str, Any]]:
    """Per item: coarse answer A, zoomed answer B, the grid boxes of the zoom, both verdicts and ``regression``.

    A judge that raises ValueError (an unparsable LLM reply) marks the record ``judge_error`` and not a regression.
    """
    options = config.options(roi_thresh=config.roi_thresh)
    coarse = new_states(engine, items, options)
    engine.prepare(coarse)
    engine.encode(coarse)
    engine.prefill(coarse)
    engine.finish(coarse)
    engine.decode(coarse)
    # The zoomed pass reuses the coarse pass's vision features and question-independent prefix from the cache.
    zoomed = new_states(engine, items, options)
    engine.prepare(zoomed)
    engine.encode(zoomed)
    engine.prefill(zoomed)
    proposals = engine.propose(zoomed)
    engine.zoom(zoomed, proposals)
    engine.finish(zoomed)
    engine.decode(zoomed)
    records = []
    for item, a, b, p in zip(items, coarse, zoomed, proposals, strict=True):
        record: dict[str, Any] = {
            "uid": item.uid,
            "coarse_answer": a.answer,
            "zoom_answer": b.answer,
            "grid_boxes": [g.as_list() for g in p.grid_boxes],
            "boxes": [box.as_list() for box in p.boxes],
        }
        try:
            a_ok, b_ok = judge(item.question, item.answer, a.answer, b.answer)
        except ValueError as err:
            records.append({**record, "coarse_ok": None, "zoom_ok": None, "regression": False, "judge_error": str(err)})
            continue
        # Without a box there was no zoom: B is A, whatever the judge thinks of two equal strings.
        regression = bool(p.grid_boxes) and a_ok and not b_ok
        records.append({**record, "coarse_ok": a_ok, "zoom_ok": b_ok, "regression": regression})
    return records


# ---------------------------------------------------------------------------------------------------------------------
# Teacher forcing on the global + RoI sequence


class _Checkpointed(nn.Module):
    """A decoder layer recomputed in backward. Runs without a cache: only whole sequences with no past go through."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer
        self.self_attn = layer.self_attn

    def forward(self, hidden: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        out: torch.Tensor = checkpoint(
            self.layer,
            hidden,
            attention_mask=kwargs.get("attention_mask"),
            position_embeddings=kwargs.get("position_embeddings"),
            use_reentrant=False,
        )
        return out


def fused_states(
    engine: QZoomEngine, items: Sequence[TrainItem], records: Sequence[dict[str, Any]], config: Stage2Config
) -> list[SequenceState]:
    """The global+RoI prompt of each mined sample, built by the engine's inference steps; no decoder layer runs."""
    states = new_states(engine, items, config.options())
    engine.prepare(states)
    engine.encode(states)
    engine.embed(states)
    proposals = [
        engine.proposal_from_grid_boxes(st, [GridBox(*g) for g in r["grid_boxes"]])
        for st, r in zip(states, records, strict=True)
    ]
    engine.add_regions(states, proposals)
    return states


def target_ids(engine: QZoomEngine, text: str) -> list[int]:
    """The answer's tokens followed by <|im_end|>, the token the engine stops on."""
    tokenizer = engine.processor.tokenizer
    ids: list[int] = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [*ids, int(tokenizer.convert_tokens_to_ids("<|im_end|>"))]


def stage2_loss(
    engine: QZoomEngine,
    states: Sequence[SequenceState],
    targets: Sequence[Sequence[int]],
    config: Stage2Config,
) -> torch.Tensor:
    """Mean next-token CE over the target tokens of a batch of global+RoI prompts (teacher forcing)."""
    lm = engine.lm
    inputs, positions, spans = [], [], []
    for st, target in zip(states, targets, strict=True):
        fed = torch.tensor(target[:-1], dtype=torch.long, device=engine.device)  # the last target is never an input
        with torch.no_grad():
            fed_embeds = lm.embed_tokens(fed)
        # Decoding continues the positions as last + 1 in all three components (spec §4.3 step 5).
        step = torch.arange(1, len(target), device=engine.device, dtype=torch.float32)
        inputs.append(torch.cat([st.embeds.clone(), fed_embeds]))
        positions.append(torch.cat([st.positions.clone(), st.positions[:, -1:].clone() + step[None]], dim=1))
        n = st.embeds.shape[0]
        spans.append((n - 1, n - 1 + len(target)))  # rows whose next token is a target token
    layers: list[Any] = list(engine.layers)
    if config.gradient_checkpointing:
        layers = [_Checkpointed(layer) for layer in layers]
    with config.autocast_context():
        hidden, _ = _run_layers(layers, lm.rotary_emb, engine.attn_impl, inputs, positions)
        rows = torch.cat([h[a:b] for h, (a, b) in zip(hidden, spans, strict=True)])  # (sum of target lengths, d)
        logits = engine.model.lm_head(lm.norm(rows))
    labels = torch.tensor([t for target in targets for t in target], dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits.float(), labels)


def train_stage2(
    model_dir: str | Path,
    items: Sequence[TrainItem],
    out_dir: str | Path,
    config: Stage2Config | None = None,
    *,
    judge: Judge | None = None,
) -> Path:
    """Stage 2 on `items` (image, question, reference answer) -> a qzoom checkpoint in `out_dir`.

    `model_dir` must have an SD-RPN (a Stage-1 output). `judge` defaults to `exact_match_judge`. Resumable like
    every stage: rerunning with the same arguments continues; a finished run returns `out_dir` at once.
    """
    config = config or Stage2Config()
    judge = judge or exact_match_judge
    identity = {
        "model": str(Path(model_dir).resolve()),
        "items": items_fingerprint(items),
        "judge": getattr(judge, "__qualname__", type(judge).__name__),
        **config.run_identity(),
    }
    run = RunDir(out_dir, "stage2", identity)
    if run.done:
        return run.out
    model, processor = load_for_training(model_dir, config)
    if not model.qzoom.enable_twig:
        raise TrainingError(f"{model_dir} has no SD-RPN (enable_twig is false): Stage 2 needs a Stage-1 checkpoint")
    engine = make_engine(model, processor)
    layers = engine.lm.layers  # checked before mining, which is the long part
    if config.first_layer >= len(layers):
        raise TrainingError(
            f"first_layer={config.first_layer} leaves no decoder layer to train: the model has {len(layers)} "
            f"(use 0 .. {len(layers) - 1})"
        )

    records = mine(
        run,
        MINED_FILE,
        items,
        lambda indices, batch: [
            {"index": i, **r} for i, r in zip(indices, mine_regressions(engine, batch, judge, config), strict=True)
        ],
        batch_size=config.mine_batch_size,
        desc="stage 2 mining",
        progress=config.progress,
    )
    regressions = [r for r in records if r["regression"]]
    chosen_records = regressions if config.samples == "regressions" else [r for r in records if r["grid_boxes"]]
    counts = {
        "items": len(records),
        "regressions": len(regressions),
        "coarse_right": sum(bool(r["coarse_ok"]) for r in records),
        "zoom_right": sum(bool(r["zoom_ok"]) for r in records),
        "no_box": sum(not r["grid_boxes"] for r in records),
        "judge_errors": sum("judge_error" in r for r in records),
    }
    if not chosen_records:
        note = "no regression sample" if config.samples == "regressions" else "no sample with a box"
        return run.finish(model, processor, {**counts, "steps": 0, "note": f"{note}: model unchanged"})

    unfreeze([*layers[config.first_layer :], model.lm_head])
    params = named_trainable(model)
    by_index = {int(r["index"]): r for r in chosen_records}

    def loss(batch: list[int]) -> torch.Tensor:
        chosen = [by_index[i] for i in batch]
        states = fused_states(engine, [items[i] for i in batch], chosen, config)
        texts = [r["coarse_answer"] if config.target == "answer" else items[int(r["index"])].answer for r in chosen]
        return stage2_loss(engine, states, [target_ids(engine, t) for t in texts], config)

    result = fit(run, params, sorted(by_index), loss, config, desc="stage 2 (post-SFT)")
    summary = {
        **counts,
        "samples": config.samples,
        "trained_on": len(chosen_records),
        "first_layer": config.first_layer,
        "steps": result.steps,
        "last_loss": result.last_loss,
        "lr": config.lr,
        "target": config.target,
    }
    return run.finish(model, processor, summary)
