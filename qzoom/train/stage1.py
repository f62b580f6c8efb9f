"""Stage 1: self-distilled SD-RPN (spec §2). Trains ``twig_layers`` only; everything else stays frozen.

Contract of :func:`train_stage1`:

1. **Heads.** The grounding and sink heads come from, in this order: ``config.heads``; the automatic criterion of
   :func:`qzoom.train.labels.select_heads_by_localisation` on ``calibration`` items (their ``box`` ranks heads, and
   that is the only place a ground-truth box is read); the heads a previous Stage 1 recorded in the checkpoint's
   ``config.json`` (``qzoom_stage1_heads``). The chosen heads are written into the output ``config.json``.
   Calibration maps of different grids are compared on one square grid (bilinear upsampling to the largest side;
   boxes mapped through normalised coordinates).
2. **Pseudo-labels.** The frozen model answers each (image, question) greedily on the coarse view exactly as the
   engine does at inference (same chat prompt, same view and budget). The answer->image attention of every head is
   averaged over the decode steps (:func:`answer_attention`, the rows HF ``generate`` returns as
   ``attentions[1:]``), the grounding heads' mean and the sink heads' mean go through
   :func:`~qzoom.train.labels.stage1_labels` (spec §2.2), and the tri-state map is stored. Items reach the label pass
   with their ``box`` removed. The view keeps its aspect (no pad-to-square, unlike the reference), so there are no
   padding cells; the map has the grid the RPN sees at inference.
3. **Training.** The twig layers run on the frozen layer-K hidden states of the same prompt, and the logit map the
   engine's proposals use (:func:`qzoom.modeling.roi_logit_map`: the last prompt token's attention logits onto the
   image tokens, mean over heads) is fitted with BCE on the labelled cells (ignore cells masked; rejected samples
   are left out). Only the twig layers' parameters change (the last layer's V/O/MLP get no gradient and stay put).
4. A model without an SD-RPN gets one first (``twig_K`` / ``twig_T`` required), copied from the layers above K.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb, repeat_kv

from qzoom.engine import QZoomEngine, SequenceState, _run_layers
from qzoom.modeling import roi_logit_map
from qzoom.roi import GridBox
from qzoom.schemas import AskOptions
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
from qzoom.train.labels import IGNORE_INDEX, HeadSelection, select_heads_by_localisation, stage1_labels

LABELS_FILE = "stage1_labels.jsonl"
HEADS_FILE = "heads.json"
_CHARS = {1: "1", 0: "0", IGNORE_INDEX: "."}
_VALUES = {v: k for k, v in _CHARS.items()}


class Heads(BaseModel):
    """Grounding and sink heads as ``[layer, head]`` pairs (0-indexed), as recorded in ``qzoom_stage1_heads``."""

    model_config = ConfigDict(extra="ignore")

    grounding: list[tuple[int, int]] = Field(min_length=1)
    sink: list[tuple[int, int]] = Field(default_factory=list)

    @classmethod
    def parse(cls, text: str) -> Heads:
        """From ``"22:1,22:4,23:6"`` (grounding) optionally followed by ``";9:4"`` (sink heads)."""
        parts = text.split(";")
        if len(parts) > 2:
            raise ValueError(f"heads take 'L:H,L:H' or 'L:H,...;L:H,...' (grounding;sink), got {text!r}")

        def pairs(chunk: str) -> list[tuple[int, int]]:
            out = []
            for token in filter(None, (t.strip() for t in chunk.split(","))):
                layer, sep, head = token.partition(":")
                if not sep or not layer.strip().isdigit() or not head.strip().isdigit():
                    raise ValueError(f"a head is written LAYER:HEAD with 0-indexed integers, got {token!r}")
                out.append((int(layer), int(head)))
            return out

        return cls(grounding=pairs(parts[0]), sink=pairs(parts[1]) if len(parts) == 2 else [])

    def maps(self) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
        def as_map(pairs: list[tuple[int, int]]) -> dict[int, list[int]]:
            out: dict[int, list[int]] = {}
            for layer, head in pairs:
                out.setdefault(layer, []).append(head)
            return out

        return as_map(self.grounding), as_map(self.sink)

    def check(self, num_layers: int, num_heads: int) -> None:
        for layer, head in self.grounding + self.sink:
            if not (0 <= layer < num_layers and 0 <= head < num_heads):
                raise TrainingError(
                    f"head {layer}:{head} does not exist: the model has layers 0..{num_layers - 1} and heads "
                    f"0..{num_heads - 1}"
                )


class Stage1Config(TrainConfig):
    """Stage-1 recipe (spec §2.2-§2.3): lr 1e-4, cosine, 3 % warmup, no weight decay, clip 1.0, one epoch."""

    heads: Heads | None = Field(None, description="explicit grounding/sink heads (default: calibration, then config)")
    top_k_heads: int = Field(4, ge=1, description="grounding heads kept by the automatic criterion")
    twig_K: int | None = Field(None, ge=1, description="branch point, for a model that has no SD-RPN yet")
    twig_T: int = Field(3, ge=1, description="twig depth, for a model that has no SD-RPN yet")
    sink_thresh: float = 1e-2
    fg_coeff: float = 0.25
    bg_coeff: float = 0.05
    blur_kernel: int = 3
    max_box_frac: float = 0.5
    min_peak: float = 5e-3


# ---------------------------------------------------------------------------------------------------------------------
# Answer -> image attention during the engine's own greedy decoding


def answer_attention(engine: QZoomEngine, states: Sequence[SequenceState]) -> list[torch.Tensor | None]:
    """Decode each finished state greedily (``engine.decode``) and return its answer->image attention per head.

    Per sample a float32 ``(L, heads, H, W)`` map: for every decode step (a generated token fed back; the prefill
    is not one) the softmax attention row of that token onto the coarse image's tokens, averaged over steps. That is
    :func:`qzoom.train.labels.answer_to_image_attention_per_head` of HF ``generate(output_attentions=True)
    .attentions[1:]``, computed from the queries and the cached keys inside the engine's batched decode instead of
    materialising every attention matrix. None for a sample that stopped at once (no decode step).
    """
    layers = engine.layers
    lens = [st.kv_all[0][0].shape[1] for st in states]
    big_n = max(lens)
    cols = [
        (big_n - n) + torch.arange(st.blocks[0].start, st.blocks[0].end, device=engine.device)
        for st, n in zip(states, lens, strict=True)
    ]
    n_heads = layers[0].self_attn.config.num_attention_heads
    sums = [torch.zeros(len(layers), n_heads, c.numel(), device=engine.device) for c in cols]
    steps = [0] * len(states)
    layer_of = {id(layer.self_attn): j for j, layer in enumerate(layers)}

    def hook(module: Any, args: Any, kwargs: dict[str, Any], output: Any) -> None:  # a Qwen2_5_VLAttention
        hidden = kwargs["hidden_states"]  # (B, 1, d), already through input_layernorm
        if hidden.shape[1] != 1:
            return
        batch = hidden.shape[0]
        keys = kwargs["past_key_values"].layers[module.layer_idx][0]  # (B, kv_heads, N, hd), this step's key included
        query = module.q_proj(hidden).view(batch, 1, -1, module.head_dim).transpose(1, 2)  # (B, heads, 1, hd)
        cos, sin = kwargs["position_embeddings"]
        query, _ = apply_rotary_pos_emb(query, query, cos, sin)
        keys = repeat_kv(keys, module.num_key_value_groups)
        scores = torch.matmul(query.float(), keys.float().transpose(-2, -1)) * module.scaling  # (B, heads, 1, N)
        mask = kwargs.get("attention_mask")
        if mask is None:
            fed = [True] * batch
        else:
            allowed = mask if mask.dtype == torch.bool else mask == 0  # (B, 1, 1, N)
            scores = scores.masked_fill(~allowed, float("-inf"))
            fed = allowed[:, 0, 0, -1].tolist()  # the newest column is valid only where a token was fed
        probs = scores.softmax(dim=-1)[:, :, 0]  # (B, heads, N)
        j = layer_of[id(module)]
        for i in range(batch):
            if fed[i]:
                sums[i][j] += probs[i][:, cols[i]]
                if j == 0:
                    steps[i] += 1

    handles = [layer.self_attn.register_forward_hook(hook, with_kwargs=True) for layer in layers]
    try:
        engine.decode(states)
    finally:
        for handle in handles:
            handle.remove()
    out: list[torch.Tensor | None] = []
    for st, total, count in zip(states, sums, steps, strict=True):
        h, w = st.blocks[0].grid_hw
        out.append((total / count).reshape(len(layers), n_heads, h, w).cpu() if count else None)
    return out


def _coarse_states(engine: QZoomEngine, items: Sequence[TrainItem], options: AskOptions) -> list[SequenceState]:
    states = new_states(engine, items, options)
    engine.prepare(states)
    engine.encode(states)
    engine.prefill(states)
    return states


# ---------------------------------------------------------------------------------------------------------------------
# Heads


def _common_grid_box(box: tuple[int, int, int, int], image_wh: tuple[int, int], side: int) -> GridBox:
    w, h = image_wh
    x0 = min(side - 1, math.floor(box[0] / w * side))
    y0 = min(side - 1, math.floor(box[1] / h * side))
    x1 = max(x0 + 1, min(side, math.ceil(box[2] / w * side)))
    y1 = max(y0 + 1, min(side, math.ceil(box[3] / h * side)))
    return GridBox(x0, y0, x1, y1)


def select_heads(
    engine: QZoomEngine, calibration: Sequence[TrainItem], config: Stage1Config
) -> tuple[Heads, HeadSelection]:
    """Run the frozen model on the calibration items (each with a box) and pick heads by localisation (labels.py)."""
    boxed = [item for item in calibration if item.box is not None]
    if len(boxed) < 2:
        raise TrainingError(
            f"head selection needs at least 2 calibration items with a 'box'; got {len(boxed)} of {len(calibration)}"
        )
    maps: list[torch.Tensor] = []
    boxes: list[tuple[tuple[int, int, int, int], tuple[int, int]]] = []
    options = config.options()
    for start in range(0, len(boxed), config.mine_batch_size):
        chunk = boxed[start : start + config.mine_batch_size]
        states = _coarse_states(engine, chunk, options)
        engine.finish(states)
        for item, m in zip(chunk, answer_attention(engine, states), strict=True):
            if m is not None and item.box is not None:
                maps.append(m)
                boxes.append((item.box, item.image.size))
    if len(maps) < 2:
        raise TrainingError("fewer than 2 calibration items got a non-empty answer; cannot rank heads")
    side = max(max(m.shape[-2:]) for m in maps)
    common = torch.stack([F.interpolate(m, size=(side, side), mode="bilinear", align_corners=False) for m in maps])
    grid_boxes = [_common_grid_box(box, wh, side) for box, wh in boxes]
    selection = select_heads_by_localisation(common, grid_boxes, top_k=config.top_k_heads)
    heads = Heads(
        grounding=[(layer, head) for layer, hs in selection.grounding.items() for head in hs],
        sink=[(layer, head) for layer, hs in selection.sink.items() for head in hs],
    )
    return heads, selection


def _resolve_heads(
    run: RunDir, engine: QZoomEngine, config: Stage1Config, calibration: Sequence[TrainItem] | None
) -> tuple[Heads, str]:
    saved = run.load_json(HEADS_FILE)
    if saved is not None:
        return Heads.model_validate(saved["heads"]), str(saved["source"])
    if config.heads is not None:
        heads, source = config.heads, "given"
    elif calibration:
        heads, _ = select_heads(engine, calibration, config)
        source = f"select_heads_by_localisation on {len(calibration)} calibration items"
    elif getattr(engine.model.config, "qzoom_stage1_heads", None):
        heads, source = Heads.model_validate(engine.model.config.qzoom_stage1_heads), "checkpoint config"
    else:
        raise TrainingError(
            "Stage 1 needs grounding heads: pass heads explicitly (--heads 'L:H,L:H'), or calibration items with a "
            "'box' to pick them automatically (--calibration N / --calibration-data FILE), or a checkpoint whose "
            "config.json records qzoom_stage1_heads"
        )
    text = engine.model.config.text_config
    heads.check(text.num_hidden_layers, text.num_attention_heads)
    run.save_json(HEADS_FILE, {"heads": heads.model_dump(mode="json"), "source": source})
    return heads, source


# ---------------------------------------------------------------------------------------------------------------------
# Labels


def encode_labels(labels: torch.Tensor) -> str:
    return "".join(_CHARS[int(v)] for v in labels.reshape(-1).tolist())


def decode_labels(text: str, grid_hw: Sequence[int]) -> torch.Tensor:
    return torch.tensor([_VALUES[c] for c in text], dtype=torch.int64).reshape(int(grid_hw[0]), int(grid_hw[1]))


def pseudo_labels(
    engine: QZoomEngine, items: Sequence[TrainItem], heads: Heads, config: Stage1Config
) -> list[dict[str, Any]]:
    """One record per item: the model's answer and its tri-state label map (spec §2.2), without reading any box."""
    grounding_map, sink_map = heads.maps()
    blind = [dataclasses.replace(item, box=None) for item in items]  # the labels must not depend on GT boxes
    states = _coarse_states(engine, blind, config.options())
    engine.finish(states)
    records = []
    for st, m in zip(states, answer_attention(engine, states), strict=True):
        h, w = st.blocks[0].grid_hw
        record: dict[str, Any] = {"answer": st.answer, "grid": [h, w]}
        if m is None:
            records.append({**record, "labels": "." * (h * w), "rejected": "no_answer", "peak": 0.0})
            continue
        grounding = torch.stack([m[layer, head] for layer, hs in grounding_map.items() for head in hs]).mean(0)
        sink = (
            torch.stack([m[layer, head] for layer, hs in sink_map.items() for head in hs]).mean(0) if sink_map else None
        )
        result = stage1_labels(
            grounding,
            sink,
            None,
            sink_thresh=config.sink_thresh,
            fg_coeff=config.fg_coeff,
            bg_coeff=config.bg_coeff,
            blur_kernel=config.blur_kernel,
            max_box_frac=config.max_box_frac,
            min_peak=config.min_peak,
        )
        labels = encode_labels(result.labels)
        records.append({**record, "labels": labels, "rejected": result.reason, "peak": result.peak})
    return records


# ---------------------------------------------------------------------------------------------------------------------
# Training


def twig_logits(engine: QZoomEngine, states: Sequence[SequenceState]) -> list[torch.Tensor]:
    """The SD-RPN logit map over each state's coarse image, flat ``(H*W,)``, with gradients to the twig layers.

    The same computation as ``engine.roi_logits`` (twig layers on the layer-K states, then `roi_logit_map`), outside
    inference mode and without the feature cache.
    """
    lm = engine.lm
    hidden = [st.hidden_k.clone() for st in states]  # out of inference mode: autograd may save them
    positions = [st.positions.clone() for st in states]
    twig = engine.twig_layers
    if len(twig) > 1:
        hidden, _ = _run_layers(twig[:-1], lm.rotary_emb, engine.attn_impl, hidden, positions)
    maps = []
    for st, h, pos in zip(states, hidden, positions, strict=True):
        block = st.blocks[0]
        index = torch.arange(block.start, block.end, device=engine.device)
        cos, sin = lm.rotary_emb(h[None], pos[:, None])
        maps.append(roi_logit_map(twig[-1], h[None], (cos, sin), [index])[0])
    return maps


def stage1_loss(
    engine: QZoomEngine, items: Sequence[TrainItem], labels: Sequence[torch.Tensor], config: Stage1Config
) -> torch.Tensor | None:
    """BCE between the twig logit maps and the tri-state labels of a batch, ignore cells masked (None if none)."""
    states = _coarse_states(engine, [dataclasses.replace(item, box=None) for item in items], config.options())
    with config.autocast_context():
        logits = twig_logits(engine, states)
    flat_logits, flat_labels = [], []
    for st, lg, lb in zip(states, logits, labels, strict=True):
        if tuple(lb.shape) != st.blocks[0].grid_hw:
            raise TrainingError(
                f"a label map is {tuple(lb.shape)} but the view's grid is {st.blocks[0].grid_hw}: the pixel budget "
                "changed since the labels were made; use the same --min-pixels/--max-pixels or a new output directory"
            )
        flat_logits.append(lg.float())
        flat_labels.append(lb.reshape(-1).to(lg.device))
    logit, label = torch.cat(flat_logits), torch.cat(flat_labels)
    keep = label != IGNORE_INDEX
    if not bool(keep.any()):
        return None
    return F.binary_cross_entropy_with_logits(logit[keep], label[keep].float())


def train_stage1(
    model_dir: str | Path,
    items: Sequence[TrainItem],
    out_dir: str | Path,
    config: Stage1Config | None = None,
    *,
    calibration: Sequence[TrainItem] | None = None,
) -> Path:
    """Stage 1 on `items` (image, question; answers and boxes unused) -> a qzoom checkpoint in `out_dir`.

    `calibration`: items with a `box`, used only to pick heads automatically (see the module docstring). Resumable:
    rerunning with the same arguments continues; a finished run returns `out_dir` at once.
    """
    config = config or Stage1Config()
    identity = {
        "model": str(Path(model_dir).resolve()),
        "items": items_fingerprint(items),
        "calibration": items_fingerprint(calibration) if calibration else None,
        **config.run_identity(),
    }
    run = RunDir(out_dir, "stage1", identity)
    if run.done:
        return run.out
    model, processor = load_for_training(model_dir, config)
    if not model.qzoom.enable_twig:
        if config.twig_K is None:
            raise TrainingError(
                f"{model_dir} has no SD-RPN yet: give its branch point (--twig-k, e.g. 18 for Qwen2.5-VL-7B, 24 for 3B)"
            )
        try:
            model.attach_sd_rpn(config.twig_K, config.twig_T)
        except ValueError as err:
            raise TrainingError(str(err)) from err
    engine = make_engine(model, processor)
    heads, source = _resolve_heads(run, engine, config, calibration)

    records = mine(
        run,
        LABELS_FILE,
        items,
        lambda indices, batch: [
            {"index": i, "uid": item.uid, **r}
            for i, item, r in zip(indices, batch, pseudo_labels(engine, batch, heads, config), strict=True)
        ],
        batch_size=config.mine_batch_size,
        desc="stage 1 labels",
        progress=config.progress,
    )
    usable = [r for r in records if r["rejected"] is None]
    reasons: dict[str, int] = {}
    for r in records:
        if r["rejected"] is not None:
            reasons[r["rejected"]] = reasons.get(r["rejected"], 0) + 1
    if not usable:
        raise TrainingError(
            f"all {len(records)} pseudo-labels were rejected ({reasons}); Stage 1 has nothing to learn. Use more "
            "items, other heads, or a lower min_peak / higher max_box_frac"
        )
    labels = {int(r["index"]): decode_labels(r["labels"], r["grid"]) for r in usable}

    unfreeze([engine.lm.twig_layers])
    params = named_trainable(model)
    result = fit(
        run,
        params,
        [int(r["index"]) for r in usable],
        lambda batch: stage1_loss(engine, [items[i] for i in batch], [labels[i] for i in batch], config),
        config,
        desc="stage 1 (SD-RPN)",
    )
    model.config.qzoom_stage1_heads = {
        **heads.model_dump(mode="json"),
        "source": source,
        "criterion": "select_heads_by_localisation (qzoom.train.labels)",
    }
    summary = {
        "items": len(records),
        "labelled": len(usable),
        "rejected": reasons,
        "steps": result.steps,
        "last_loss": result.last_loss,
        "lr": config.lr,
        "batch_size": config.batch_size,
    }
    return run.finish(model, processor, summary)
