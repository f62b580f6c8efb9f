"""The Q-Zoom inference engine: the paper's pipeline as separately callable, batched steps (spec §1-§4, §7, §10).

    prepare  -> image views + chat prompt per request
    encode   -> vision tower on the coarse (global) views, all images of the batch in one call
    prefill  -> embeddings, M-RoPE positions, decoder layers < K with a KV cache; keeps the layer-K hidden states
    gate     -> high_res_layers + high_res_head on the last prompt token: p(needs detail)
    propose  -> twig layers -> attention-logit map over the newest image's tokens -> sink mask, blur, threshold -> box
    zoom     -> crop the ORIGINAL image, re-encode with the same pixel budget, splice the RoI block after the newest
                image, aligned (or plain) M-RoPE positions, re-run layers < K on the new tail only (the prefix's
                layer<K KV cache is reused); with several boxes and `multi_box` "best", one sequence per box
    finish   -> layers >= K over the whole final sequence (starting from the saved layer-K states), with a cache
    decode   -> greedy (or sampled) decoding of one answer per request (per candidate sequence, keeping the
                most confident)

Every step takes a list of `SequenceState` (one per request) and may be given any subset of them: requests with
different images, sizes, aspect ratios, budgets and questions share one batch, some zooming and some not, and get
the same answers and boxes as each alone (up to float noise). The official code is effectively batch size 1
(spec §9.1); here each sample keeps its own positions, image offsets and cache, and a batch is laid out as a ragged
block with an explicit attention mask (`_run_layers`).

What differs between backbones (preprocessing, vision tower and DeepStack, RPN projections, sink rule, cell size,
defaults) comes from `self.backbone` (`qzoom.backbones`); nothing here branches on which backbone it is. DeepStack
features (Qwen3-VL) are kept per image block and added to its token rows after the early decoder layers wherever
those layers run over the block (`_run_layers`'s `inject`).

The graph in `qzoom.agent` chains the steps; nothing here decides *whether* to zoom.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import torch
from PIL import Image
from torch import nn

from qzoom import roi
from qzoom.backbones import Backbone, VisionOutput, backbone_of
from qzoom.cache import FeatureCache, feature_key, image_digest, pack_prefix, unpack_prefix
from qzoom.checkpoint import load_model, model_fingerprint
from qzoom.modeling import QZoomSettings, gate_probability, rpn_scores
from qzoom.sampling import Sampler, choose_tokens
from qzoom.schemas import AskOptions, MultiBox, check_prompt_text

Tensor = torch.Tensor
KV = tuple[Tensor, Tensor]  # (kv_heads, n, head_dim) each, one layer of one sample
_EMPTY = torch.empty(0)
_EMPTY_IDS = torch.empty(0, dtype=torch.long)


# ----------------------------------------------------------------------------------------------------------------
# Per-request state. Tensors live here (never in LangGraph state); each is per sample, without a batch dimension.


@dataclass
class ImageBlock:
    """One image in the sequence: the global view or a zoomed region."""

    start: int  # sequence index of the first image token (its <|vision_start|> is at start - 1)
    grid_hw: tuple[int, int]  # merged LLM grid (H, W): one token per cell (28 or 32 px square) of the resized view
    box: roi.PixelBox  # the region of the ORIGINAL image it shows
    step: int  # 0 for the global view, k for the k-th zoom step
    row_pos: Tensor  # (H,) float32 M-RoPE h coordinate of each token row
    col_pos: Tensor  # (W,) float32 M-RoPE w coordinate of each token column
    before_question: bool = True  # spliced before the question (Q-Zoom); False: appended after it (a tool loop)
    # Per DeepStack level l, (H*W, d) features added to the block's rows after decoder layer l (Qwen3-VL).
    deepstack: list[Tensor] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return self.grid_hw[0] * self.grid_hw[1]

    @property
    def end(self) -> int:
        """Index one past the last image token: the index of this block's <|vision_end|>."""
        return self.start + self.num_tokens


@dataclass(frozen=True)
class ImagePiece:
    """An image to append to a conversation; `box` names the region of the request's image it was cut from."""

    image: Image.Image
    box: roi.PixelBox | None = None


@dataclass
class Proposal:
    """What the SD-RPN proposed for one sample in one step."""

    block: ImageBlock  # the image whose tokens were scored
    logits: Tensor  # (H, W) raw attention logits
    prob: Tensor  # (H, W) sigmoid * sink mask, blurred
    grid_boxes: list[roi.GridBox]  # empty: no cell passed τ_roi
    boxes: list[roi.PixelBox]  # the same boxes in original-image pixels


@dataclass
class SequenceState:
    """Everything the engine knows about one request between steps."""

    image: Image.Image  # the original, EXIF-oriented RGB image; crops come from here
    query: str
    options: AskOptions
    min_pixels: int
    max_pixels: int
    gate_thresh: float
    roi_thresh: float
    max_boxes: int
    box_mode: roi.BoxMode = "union"
    roi_peak_frac: float = 0.0
    multi_box: MultiBox = "joint"
    system_prompt: str | None = None  # None: the chat template's default (stock Qwen: "You are a helpful assistant.")
    sampler: Sampler | None = None  # None: greedy decoding; else the request's temperature, top-p and random stream
    stop: tuple[str, ...] = ()  # decode ends the answer once its text holds one of these (kept in the text)
    # Tensors start empty and are filled by the steps named beside them.
    input_ids: Tensor = field(default_factory=lambda: _EMPTY_IDS)  # prepare: (n,)
    pixel_values: Tensor = field(default_factory=lambda: _EMPTY)  # prepare: (patches, C*T*P*P) of the global view
    grid_thw: Tensor = field(default_factory=lambda: _EMPTY_IDS)  # prepare: (3,) patch grid of the global view
    image_features: Tensor = field(default_factory=lambda: _EMPTY)  # encode: (N, d) after the ViT + merger
    image_deepstack: list[Tensor] = field(default_factory=list)  # encode: per DeepStack level (N, d), if any
    embeds: Tensor = field(default_factory=lambda: _EMPTY)  # prefill/zoom: (n, d) with image features scattered in
    positions: Tensor = field(default_factory=lambda: _EMPTY)  # prefill/zoom: (3, n) float32 M-RoPE (t, h, w)
    blocks: list[ImageBlock] = field(default_factory=list)  # prefill/zoom
    kv_below_k: list[KV] = field(default_factory=list)  # prefill/zoom: layers < K, all n tokens
    hidden_k: Tensor = field(default_factory=lambda: _EMPTY)  # prefill/zoom: (n, d) hidden states entering layer K
    kv_all: list[KV] = field(default_factory=list)  # finish: every layer, all n tokens
    next_logits: Tensor = field(default_factory=lambda: _EMPTY)  # finish: (vocab,) logits of the first answer token
    answer_ids: list[int] = field(default_factory=list)
    answer_logprobs: list[float] = field(default_factory=list)  # decode: log-probability of each chosen token
    answer: str = ""
    digest: str = ""  # prepare: content digest of the decoded pixels (the cache key's image part)
    cache_hits: list[str] = field(default_factory=list)  # which kinds of cached features this request reused
    gate_scores: list[float] = field(default_factory=list)
    proposals: list[Proposal] = field(default_factory=list)  # every SD-RPN map computed, for display
    # zoom with `multi_box` "best": the same request zoomed on each of a step's other boxes, one sequence per box.
    # finish and decode run them beside this one, and decode makes the most confident answer this state's.
    alternatives: list[SequenceState] = field(default_factory=list)
    timings_ms: dict[str, float] = field(default_factory=dict)

    @property
    def newest_blocks(self) -> list[ImageBlock]:
        last = max(b.step for b in self.blocks)
        return [b for b in self.blocks if b.step == last]

    @property
    def visual_tokens(self) -> int:
        return sum(b.num_tokens for b in self.blocks)

    @property
    def zoom_steps(self) -> int:
        return max((b.step for b in self.blocks), default=0)


def _single_box(proposal: Proposal, k: int) -> Proposal:
    return Proposal(proposal.block, proposal.logits, proposal.prob, [proposal.grid_boxes[k]], [proposal.boxes[k]])


def _fork(st: SequenceState) -> SequenceState:
    """A copy of the state to zoom elsewhere: tensors are shared (the steps replace them, never write into them);
    the lists a step appends to are its own."""
    return replace(
        st,
        blocks=list(st.blocks),
        answer_ids=[],
        answer_logprobs=[],
        cache_hits=[],
        gate_scores=list(st.gate_scores),
        proposals=list(st.proposals),
        timings_ms={},
        alternatives=[],
    )


def _with_alternatives(states: Sequence[SequenceState]) -> list[SequenceState]:
    return [x for st in states for x in (st, *st.alternatives)]


def _confidence(st: SequenceState) -> float:
    """Mean log-probability of the greedy answer's tokens, the end token included (-inf before any decoding)."""
    return sum(st.answer_logprobs) / len(st.answer_logprobs) if st.answer_logprobs else float("-inf")


# What differs between a state and its alternatives: the sequence, its caches and its answer.
_CANDIDATE_FIELDS = (
    "input_ids", "embeds", "positions", "blocks", "kv_below_k", "hidden_k", "kv_all", "next_logits",
    "answer_ids", "answer_logprobs", "answer",
)  # fmt: skip


def _adopt(st: SequenceState, other: SequenceState) -> None:
    """Make `other`'s sequence and answer `st`'s."""
    for name in _CANDIDATE_FIELDS:
        setattr(st, name, getattr(other, name))
    st.cache_hits += other.cache_hits


# ----------------------------------------------------------------------------------------------------------------
# The batched layer runner.


class _KVStore:
    """The single method stock attention calls on a cache: `update(k, v, layer_idx)` returns the full keys/values."""

    def __init__(self, past: dict[int, KV] | None = None) -> None:
        self.layers: dict[int, KV] = dict(past or {})

    def update(self, key: Tensor, value: Tensor, layer_idx: int, *args: Any, **kwargs: Any) -> KV:
        if layer_idx in self.layers:
            past_key, past_value = self.layers[layer_idx]
            key = torch.cat([past_key, key], dim=-2)
            value = torch.cat([past_value, value], dim=-2)
        self.layers[layer_idx] = (key, value)
        return key, value


def _attention_mask(key_valid: Tensor, q_len: int, attn_impl: str, dtype: torch.dtype) -> Tensor | None:
    """(B, 1, q, kv) mask from a (B, kv) key-validity map: causal by column, padding masked anywhere.

    Returns None exactly where the stock model does (sdpa, no padding, a square prefill or a single query), so that
    a batch of one reproduces stock `generate` bit for bit.
    """
    kv_len = key_valid.shape[1]
    if attn_impl == "sdpa" and bool(key_valid.all()) and (q_len == kv_len or q_len == 1):
        return None
    device = key_valid.device
    q_cols = torch.arange(kv_len - q_len, kv_len, device=device)  # (q,)
    causal = torch.arange(kv_len, device=device)[None, :] <= q_cols[:, None]  # (q, kv)
    mask = causal[None] & key_valid[:, None, :]  # (B, q, kv)
    # A padding query row that sees nothing would give NaN in sdpa; let it see everything (its output is never used
    # and its column is masked for every real query), as transformers does.
    mask = mask | ~mask.any(dim=-1, keepdim=True)
    mask = mask[:, None]  # (B, 1, q, kv)
    if attn_impl == "sdpa":
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, torch.finfo(dtype).min)


Injection = tuple[int, Tensor, Tensor]  # (j, rows, features): after the j-th layer run, rows += features


def _run_layers(
    layers: Sequence[Any],  # decoder layers (the stock decoder-layer class of the backbone)
    rotary: nn.Module,
    attn_impl: str,
    inputs: Sequence[Tensor],
    positions: Sequence[Tensor],
    past: Sequence[Sequence[KV]] | None = None,
    keep_cache: bool = False,
    tap: int | None = None,
    tapped: list[Tensor] | None = None,
    inject: Sequence[Sequence[Injection]] | None = None,
) -> tuple[list[Tensor], list[list[KV]]]:
    """Run `layers` over new tokens of several samples at once.

    inputs[i]: (t_i, d) hidden states of sample i's new tokens; positions[i]: (3, t_i) their M-RoPE positions.
    past[i][l]: (kv_heads, p_i, hd) cached keys/values of sample i for the l-th of `layers` (None: no cache).
    Layout: a ragged block of P + T columns, sample i's past right-aligned in [0, P) and its new tokens right-aligned
    in [P, P + T); holes are masked as keys. Causality by column index keeps every sample's tokens in order.

    Returns the outputs (t_i, d) and, when `keep_cache`, the per-sample per-layer KV over past + new tokens.
    With `tap` = j, the hidden states entering the j-th of `layers` are appended per sample to `tapped`.
    inject[i]: (j, rows, features) additions to sample i's new-token rows after the j-th of `layers` (DeepStack, as
    the stock text model adds them: out of place, so autograd sees it).
    """
    batch = len(inputs)
    device, dtype = inputs[0].device, inputs[0].dtype
    new_lens = [x.shape[0] for x in inputs]
    past_lens = [sample[0][0].shape[1] if sample else 0 for sample in past] if past else [0] * batch
    big_p, big_t = max(past_lens), max(new_lens)

    hidden = torch.zeros(batch, big_t, inputs[0].shape[-1], device=device, dtype=dtype)
    pos = torch.zeros(3, batch, big_t, device=device, dtype=torch.float32)
    key_valid = torch.zeros(batch, big_p + big_t, dtype=torch.bool, device=device)
    for i, (x, p) in enumerate(zip(inputs, positions, strict=True)):
        hidden[i, big_t - new_lens[i] :] = x
        pos[:, i, big_t - new_lens[i] :] = p
        key_valid[i, big_p - past_lens[i] : big_p] = True
        key_valid[i, big_p + big_t - new_lens[i] :] = True

    store = _KVStore()
    if past is not None and big_p > 0:
        ref = next(sample for sample in past if sample)  # samples without a past contribute empty columns
        for l_rel, layer in enumerate(layers):
            ref_k = ref[l_rel][0]
            keys = ref_k.new_zeros(batch, ref_k.shape[0], big_p, ref_k.shape[2])
            values = torch.zeros_like(keys)
            for i in range(batch):
                if past_lens[i]:
                    k_i, v_i = past[i][l_rel]
                    keys[i, :, big_p - past_lens[i] :] = k_i
                    values[i, :, big_p - past_lens[i] :] = v_i
            store.layers[layer.self_attn.layer_idx] = (keys, values)

    mask = _attention_mask(key_valid, big_t, attn_impl, dtype)
    position_embeddings = rotary(hidden, pos)
    for j, layer in enumerate(layers):
        if j == tap and tapped is not None:
            tapped.extend(hidden[i, big_t - new_lens[i] :] for i in range(batch))
        hidden = layer(
            hidden,
            attention_mask=mask,
            position_embeddings=position_embeddings,
            past_key_values=store,
            use_cache=True,
        )
        adds = [(i, rows, feats) for i in range(batch) for jj, rows, feats in (inject[i] if inject else ()) if jj == j]
        if adds:
            hidden = hidden.clone()
            for i, rows, feats in adds:
                cols = rows.to(device) + (big_t - new_lens[i])
                hidden[i, cols] = hidden[i, cols] + feats.to(hidden.dtype)

    outputs = [hidden[i, big_t - new_lens[i] :] for i in range(batch)]
    kvs: list[list[KV]] = [[] for _ in range(batch)]
    if keep_cache:
        for layer in layers:
            keys, values = store.layers[layer.self_attn.layer_idx]
            for i in range(batch):
                cols = torch.cat(
                    [
                        torch.arange(big_p - past_lens[i], big_p, device=device),
                        torch.arange(big_p + big_t - new_lens[i], big_p + big_t, device=device),
                    ]
                )
                kvs[i].append((keys[i][:, cols], values[i][:, cols]))
    return outputs, kvs


_T = TypeVar("_T")


def _present(value: _T | None) -> _T:
    assert value is not None
    return value


def _deepstack_injections(st: SequenceState, start: int, first_layer: int, num_layers: int) -> list[Injection]:
    """The DeepStack additions of sample `st`'s tokens from `start` on, for `layers[first_layer:][:num_layers]`:
    every image block's level-l features after decoder layer l, rows counted from `start`."""
    out: list[Injection] = []
    for b in st.blocks:
        lo = max(b.start, start)
        if lo >= b.end:
            continue
        for level, feats in enumerate(b.deepstack):
            j = level - first_layer
            if 0 <= j < num_layers:
                out.append((j, torch.arange(lo - start, b.end - start), feats[lo - b.start :]))
    return out


def _vision_entry(out: VisionOutput, grid: Tensor | None = None) -> dict[str, Tensor]:
    entry = {"features": out.features, **{f"deepstack.{i}": d for i, d in enumerate(out.deepstack)}}
    return entry if grid is None else {**entry, "grid_thw": grid}


def _vision_from_entry(entry: dict[str, Tensor], dtype: torch.dtype) -> VisionOutput:
    levels = sum(1 for name in entry if name.startswith("deepstack."))
    return VisionOutput(entry["features"].to(dtype), [entry[f"deepstack.{i}"].to(dtype) for i in range(levels)])


# ----------------------------------------------------------------------------------------------------------------
# The engine.


class QZoomEngine:
    """A Q-Zoom model and its processor on one device, with the inference steps as methods.

    Build it with `QZoomEngine.from_pretrained(path)` (a qzoom checkpoint, a released Q-Zoom checkpoint or a stock
    Qwen2.5-VL / Qwen3-VL directory) or from objects you already have. All methods run under `torch.inference_mode()`.
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        name: str = "qzoom",
        cache: FeatureCache | None = None,
    ) -> None:
        self.model: Any = model.eval()
        self.processor = processor
        self.name = name
        self.backbone: Backbone = backbone_of(model)
        # Coarse features, prefix state and crop features are reused across steps, questions and replicas.
        self.cache = cache if cache is not None else FeatureCache.from_url(None)
        self.revision = model_fingerprint(model)
        defaults = self.backbone.defaults
        self.settings: QZoomSettings = QZoomSettings.from_config(
            model.config, gate_default=defaults.gate_thresh, roi_default=defaults.roi_thresh
        )
        lm = self.model.model.language_model
        self.lm: Any = lm
        self.layers: list[Any] = list(lm.layers)
        self.split = self.settings.twig_K if self.settings.enable_twig else 0  # K: the KV-reuse split point
        self.twig_layers: list[Any] = list(getattr(lm, "twig_layers", []))
        self.gate_layers: list[Any] = list(getattr(lm, "high_res_layers", []))
        self.gate_head: nn.Linear | None = getattr(lm, "high_res_head", None)
        self.attn_impl: str = getattr(model.config.text_config, "_attn_implementation", None) or "sdpa"
        if self.attn_impl not in ("sdpa", "eager"):
            # The explicit masks below are built for these two; flash kernels need packed inputs instead.
            raise ValueError(f"attention implementation {self.attn_impl!r} is not supported; use 'sdpa' or 'eager'")
        tok = processor.tokenizer
        self.image_token_id = int(model.config.image_token_id)
        self.vision_start_id = int(model.config.vision_start_token_id)
        self.vision_end_id = int(model.config.vision_end_token_id)
        self.stop_ids = {int(tok.convert_tokens_to_ids("<|im_end|>")), int(tok.convert_tokens_to_ids("<|endoftext|>"))}
        self.pad_id = int(tok.convert_tokens_to_ids("<|endoftext|>"))

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        cache: FeatureCache | None = None,
    ) -> QZoomEngine:
        model = load_model(path, device=device, dtype=dtype)
        return cls(model, backbone_of(model).load_processor(path), name=Path(path).name, cache=cache)

    @property
    def device(self) -> torch.device:
        return torch.device(self.model.device)

    @property
    def dtype(self) -> torch.dtype:
        dtype: torch.dtype = self.lm.embed_tokens.weight.dtype
        return dtype

    @property
    def has_gate(self) -> bool:
        return self.gate_head is not None and bool(self.gate_layers)

    @property
    def has_rpn(self) -> bool:
        return bool(self.twig_layers)

    # -- prepare ------------------------------------------------------------------------------------------------

    def new_state(
        self, image: Image.Image, query: str, options: AskOptions | None = None, system_prompt: str | None = None
    ) -> SequenceState:
        """A request's state with its budgets and thresholds resolved (request, then checkpoint, then paper).

        Raises `PromptTextError` when the query or system prompt holds a chat control token such as <|image_pad|>."""
        check_prompt_text(query, "query")
        if system_prompt is not None:
            check_prompt_text(system_prompt, "system_prompt")
        opts = options or AskOptions()
        s = self.settings
        # Without a budget in the request or the checkpoint: the backbone's (the paper's Doc/OCR evaluation budget).
        min_px = opts.min_pixels or s.min_pixels or self.backbone.min_pixels
        max_px = opts.max_pixels or s.max_pixels or max(self.backbone.max_pixels, min_px)
        if min_px > max_px:
            raise ValueError(f"min_pixels ({min_px}) must not exceed max_pixels ({max_px})")
        # A request's "union" (the paper's one box) overrides a checkpoint's several boxes per step.
        max_boxes = opts.max_boxes or (1 if opts.box_mode == "union" else s.max_boxes)
        return SequenceState(
            image=image,
            query=query,
            options=opts,
            min_pixels=min_px,
            max_pixels=max_px,
            gate_thresh=s.high_res_thresh if opts.gate_thresh is None else opts.gate_thresh,
            roi_thresh=s.roi_thresh if opts.roi_thresh is None else opts.roi_thresh,
            max_boxes=max_boxes,
            box_mode=s.box_mode if opts.box_mode is None else opts.box_mode,
            roi_peak_frac=s.roi_peak_frac if opts.roi_peak_frac is None else opts.roi_peak_frac,
            multi_box=s.multi_box if opts.multi_box is None else opts.multi_box,
            system_prompt=system_prompt,
            sampler=Sampler(opts.temperature, opts.top_p or 1.0, opts.seed) if opts.temperature else None,
        )

    def _preprocess(self, image: Image.Image, min_pixels: int, max_pixels: int) -> tuple[Tensor, Tensor]:
        """Pixel values (patches, dim) and patch grid (3,) of a crop at the pixel budget, resized by the processor's
        own (fast-processor) path, as the official code treats the RoI crop on every backbone."""
        return self.backbone.preprocess(image, self.processor.image_processor, min_pixels, max_pixels, "crop")

    def _preprocess_global(self, image: Image.Image, min_pixels: int, max_pixels: int) -> tuple[Tensor, Tensor]:
        """The same for a whole image, as the backbone's official evaluation prepares it (equal to `_preprocess` on
        Qwen2.5-VL; Qwen3-VL resizes with qwen-vl-utils' PIL bicubic first)."""
        return self.backbone.preprocess(image, self.processor.image_processor, min_pixels, max_pixels, "global")

    def _grid(self, image: Image.Image, min_pixels: int, max_pixels: int) -> Tensor:
        """The patch grid (3,) `_preprocess_global` gives, from the image size alone (no resize, no pixels)."""
        return self.backbone.grid(image, self.processor.image_processor, min_pixels, max_pixels)

    def prompt_text(self, query: str, system_prompt: str | None = None) -> str:
        messages: list[dict[str, Any]] = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": query}]}
        ]
        if system_prompt is not None:
            messages.insert(0, {"role": "system", "content": system_prompt})
        return str(self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))

    def prepare(self, states: Sequence[SequenceState]) -> None:
        """Size each global view and tokenize its chat prompt (image pads expanded to the view's tokens).

        Pixels are produced by `encode`, and only when the view's features are not in the cache.
        """
        with self._timed(states, "preprocess"):
            for st in states:
                st.digest = st.digest or image_digest(st.image)
                st.grid_thw = self._grid(st.image, st.min_pixels, st.max_pixels)
                merge = self.model.config.vision_config.spatial_merge_size
                n_tokens = int(st.grid_thw.prod()) // merge**2
                text = self.prompt_text(st.query, st.system_prompt)
                text = text.replace("<|image_pad|>", "<|image_pad|>" * n_tokens, 1)
                ids = self.processor.tokenizer(text, add_special_tokens=False)["input_ids"]
                st.input_ids = torch.tensor(ids, dtype=torch.long)

    # -- encode -------------------------------------------------------------------------------------------------

    def encode_views(self, pixel_values: Sequence[Tensor], grids: Sequence[Tensor]) -> list[VisionOutput]:
        """The vision tower + merger over several views in one call -> per view (N_i, d) LLM-space features (and
        the DeepStack features of a backbone that has them)."""
        if not pixel_values:
            return []
        with torch.inference_mode():
            out = self.backbone.encode(
                self.model, torch.cat(list(pixel_values)).to(self.device), torch.stack(list(grids)).to(self.device)
            )
        return [VisionOutput(o.features.to(self.dtype), [d.to(self.dtype) for d in o.deepstack]) for o in out]

    def _key(self, kind: str, st: SequenceState, *, digest: str | None = None, **params: object) -> str:
        """Cache key of `kind` for the request's image (or the image with `digest`) at the request's budget."""
        budget = {
            "min_pixels": st.min_pixels,
            "max_pixels": st.max_pixels,
            "dtype": str(self.dtype),
            "backbone": self.backbone.name,
        }
        return feature_key(kind, self.name, self.revision, {**budget, **params}, digest or st.digest)

    def _cache_meta(self) -> dict[str, str]:
        return {"model": self.name, "revision": self.revision, "dtype": str(self.dtype)}

    def encode(self, states: Sequence[SequenceState]) -> None:
        """Vision features of each global view, from the feature cache when this image was seen at this budget."""
        with self._timed(states, "encode"):
            todo = []
            for st in states:
                if st.image_features.numel():
                    continue
                hit = self.cache.get(self._key("vision", st), device=self.device)
                if hit is not None:
                    cached = _vision_from_entry(hit, self.dtype)
                    st.image_features, st.image_deepstack = cached.features, cached.deepstack
                    st.cache_hits.append("vision")
                else:
                    todo.append(st)
            for st in todo:
                st.pixel_values, grid = self._preprocess_global(st.image, st.min_pixels, st.max_pixels)
                if not torch.equal(grid, st.grid_thw):
                    raise RuntimeError(
                        f"the processor sized the view {grid.tolist()}, prepare() {st.grid_thw.tolist()}"
                    )
            feats = self.encode_views([st.pixel_values for st in todo], [st.grid_thw for st in todo])
            for st, f in zip(todo, feats, strict=True):
                st.image_features, st.image_deepstack = f.features, f.deepstack
                self.cache.put(self._key("vision", st), _vision_entry(f), self._cache_meta())

    # -- prefill ------------------------------------------------------------------------------------------------

    def _global_positions(self, input_ids: Tensor, grids: Sequence[Tensor]) -> Tensor:
        """Stock `get_rope_index` on one unpadded sequence -> (3, n) float32."""
        ids = input_ids[None].to(self.device)
        mm_types = (ids == self.image_token_id).int()
        pos, _ = self.model.model.get_rope_index(ids, mm_types, image_grid_thw=torch.stack(list(grids)).to(self.device))
        return torch.as_tensor(pos[:, 0]).float()

    def embed(self, states: Sequence[SequenceState]) -> None:
        """Token embeddings with the image features scattered in, and the `layout` of each encoded prompt; runs no
        decoder layer."""
        with torch.inference_mode():
            embed = self.lm.embed_tokens
            for st in states:
                if st.image_features.numel() == 0:
                    raise RuntimeError("prefill() needs encode() first")
                ids = st.input_ids.to(self.device)
                x = embed(ids)
                x[ids == self.image_token_id] = st.image_features
                st.embeds = x
        self.layout(states)
        for st in states:
            st.blocks[0].deepstack = list(st.image_deepstack)

    def layout(self, states: Sequence[SequenceState]) -> None:
        """Stock M-RoPE positions and the global image block of each prepared prompt: no weights, no pixels
        (training builds its teacher-forced sequences from this)."""
        merge = self.model.config.vision_config.spatial_merge_size
        for st in states:
            st.positions = self._global_positions(st.input_ids, [st.grid_thw])
            start = int((st.input_ids == self.image_token_id).nonzero()[0, 0])
            grid = (int(st.grid_thw[1]) // merge, int(st.grid_thw[2]) // merge)
            first = st.positions[:, start]
            st.blocks = [
                ImageBlock(
                    start=start,
                    grid_hw=grid,
                    box=roi.PixelBox(0, 0, st.image.width, st.image.height),
                    step=0,
                    row_pos=first[1] + torch.arange(grid[0], device=self.device, dtype=torch.float32),
                    col_pos=first[2] + torch.arange(grid[1], device=self.device, dtype=torch.float32),
                )
            ]

    def prefill(self, states: Sequence[SequenceState]) -> None:
        """Embed, position, and run layers < K with a cache; keep the hidden states entering layer K."""
        with self._timed(states, "prefill"), torch.inference_mode():
            self.embed(states)
            # The prefix (system prompt, user header, image tokens) does not depend on the question: a request on
            # an image seen before reuses its layer<K KV and layer-K states and runs only the question's tokens.
            outputs, kvs = self._run_over_prefix(
                "below", self.layers[: self.split], states, [st.embeds for st in states], full_outputs=True,
                first_layer=0,
            )  # fmt: skip
            for st, h, kv in zip(states, outputs, kvs, strict=True):
                st.hidden_k, st.kv_below_k = h, kv

    def _prefix_spans(self, st: SequenceState) -> list[tuple[int, list[list[float]] | None]]:
        """Question-independent prefixes of the sequence, longest first, with what identifies each in a cache key.

        Everything before the question is the same for every question about the image: through the coarse view's
        last image token, and, after zooms, through the newest spliced region's last token, given the same regions
        (their boxes, grids and positions). Images appended after the question (a tool loop's crops) are not.
        """
        spliced = [b for b in st.blocks if b.before_question]
        spans: list[tuple[int, list[list[float]] | None]] = []
        if len(spliced) > 1:
            regions = [
                [*b.box.as_list(), *b.grid_hw, b.step, *(round(float(t), 4) for t in (b.row_pos[0], b.row_pos[-1],
                 b.col_pos[0], b.col_pos[-1]))]
                for b in spliced[1:]
            ]  # fmt: skip
            spans.append((spliced[-1].end, regions))
        spans.append((st.blocks[0].end, None))
        return spans

    def _run_over_prefix(
        self,
        group: str,
        layers: Sequence[Any],
        states: Sequence[SequenceState],
        inputs: Sequence[Tensor],
        *,
        full_outputs: bool = False,
        own_prefix: Sequence[tuple[int, list[KV], Tensor] | None] | None = None,
        first_layer: int | None = None,
    ) -> tuple[list[Tensor], list[list[KV]]]:
        """Run `layers` over each whole sequence (inputs[i]: (n_i, d)), reusing the KV of its longest cached
        question-independent prefix (`_prefix_spans`) and caching the prefixes it had to compute.

        `own_prefix[i]` = (P, KV, outputs) is a prefix the request itself already holds (its layer<K state before a
        zoom), used when the cache has nothing longer. Outputs cover the tokens that were run (the last row is always
        the last token), or every token with `full_outputs` (the prefixes' outputs are then cached too); the returned
        KV covers every token. `first_layer`: the index of `layers[0]` among the decoder layers, for the DeepStack
        additions (None for branch layers, which get none).
        """
        if not layers:
            return list(inputs), [[] for _ in states]
        kind = "prefix" if group == "below" else f"prefix-{group}"
        plans: list[list[tuple[int, str]]] = []
        starts: list[int] = []
        pasts: list[list[KV]] = []
        reused_out: list[Tensor] = []
        for i, st in enumerate(states):
            spans = [
                (p, self._key(kind, st, k=self.split, header=self._header(st), regions=regions))
                for p, regions in self._prefix_spans(st)
            ]
            plans.append(spans)
            own = own_prefix[i] if own_prefix is not None else None
            start, past, out = own if own is not None else (0, [], torch.empty(0))
            for p, key in spans:
                if p <= start:
                    break  # the request already holds this much (and a cache hit would be its own entry)
                hit = self.cache.get(key, device=self.device)
                if hit is not None:
                    past, out = unpack_prefix(hit)
                    start = p
                    st.cache_hits.append(kind)
                    break
            starts.append(start)
            pasts.append(past)
            reused_out.append(out)
        outputs, kvs = _run_layers(
            layers,
            self.lm.rotary_emb,
            self.attn_impl,
            [x[p:] for x, p in zip(inputs, starts, strict=True)],
            [st.positions[:, p:] for st, p in zip(states, starts, strict=True)],
            pasts,
            keep_cache=True,
            inject=self._injections(states, starts, first_layer, len(layers)),
        )
        for i, (spans, start, kv) in enumerate(zip(plans, starts, kvs, strict=True)):
            full = torch.cat([reused_out[i].to(outputs[i].dtype), outputs[i]]) if start else outputs[i]
            for p, key in spans:
                if p <= start:
                    break  # this prefix (and every shorter one) came from the cache or the request itself
                prefix = [(k[:, :p].clone(), v[:, :p].clone()) for k, v in kv]
                prefix_out = full[:p].clone() if full_outputs else torch.empty(0)
                self.cache.put(key, pack_prefix(prefix, prefix_out), self._cache_meta())
            if full_outputs:
                outputs[i] = full
        return outputs, kvs

    def _injections(
        self, states: Sequence[SequenceState], starts: Sequence[int], first_layer: int | None, num_layers: int
    ) -> list[list[Injection]] | None:
        if first_layer is None:
            return None
        return [_deepstack_injections(st, p, first_layer, num_layers) for st, p in zip(states, starts, strict=True)]

    def _header(self, st: SequenceState) -> str:
        return str(self.processor.tokenizer.decode(st.input_ids[: st.blocks[0].start].tolist()))

    # -- gate -----------------------------------------------------------------------------------------------------

    def _branch_input(self, states: Sequence[SequenceState], branch_k: int) -> list[Tensor]:
        """Hidden states entering layer `branch_k` for each sample's whole sequence (no cache is written)."""
        hidden = [st.hidden_k for st in states]
        if branch_k == self.split:
            return hidden
        if branch_k < self.split:
            # A branch point below the split: recompute layers < branch_k (only for unusual checkpoints).
            start = [st.embeds for st in states]
            out, _ = _run_layers(
                self.layers[:branch_k],
                self.lm.rotary_emb,
                self.attn_impl,
                start,
                [st.positions for st in states],
                inject=self._injections(states, [0] * len(states), 0, branch_k),
            )
            return out
        out, _ = _run_layers(
            self.layers[self.split : branch_k],
            self.lm.rotary_emb,
            self.attn_impl,
            hidden,
            [st.positions for st in states],
            inject=self._injections(states, [0] * len(states), self.split, branch_k - self.split),
        )
        return out

    def gate(self, states: Sequence[SequenceState]) -> list[float]:
        """The gate's probability that each sample needs high-resolution detail (appended to `gate_scores`)."""
        if not self.has_gate:
            raise RuntimeError("this checkpoint has no gate (enable_high_res is false)")
        if not states:
            return []
        with self._timed(states, "gate"), torch.inference_mode():
            inputs = self._branch_input(states, self.settings.high_res_K)
            out, _ = self._run_over_prefix("gate", self.gate_layers, states, inputs)
            assert self.gate_head is not None
            probs = [float(gate_probability(self.gate_head, h[None])[0]) for h in out]
        for st, p in zip(states, probs, strict=True):
            st.gate_scores.append(p)
        return probs

    # -- propose --------------------------------------------------------------------------------------------------

    def roi_logits(self, states: Sequence[SequenceState]) -> list[list[Tensor]]:
        """Raw SD-RPN logit maps, per sample one (H, W) map for each of its newest image blocks."""
        return [[m for m, _ in pairs] for pairs in self._rpn_maps(states)]

    def _rpn_maps(self, states: Sequence[SequenceState]) -> list[list[tuple[Tensor, bool | Tensor]]]:
        """Per sample, per newest image block: the raw SD-RPN (H, W) logit map and its attention-sink mask (the
        backbone's rule: the corner rule, or the first sequence token's map through the same projections)."""
        if not self.has_rpn:
            raise RuntimeError("this checkpoint has no SD-RPN (enable_twig is false)")
        inputs = self._branch_input(states, self.settings.twig_K)
        if len(self.twig_layers) > 1:
            inputs, _ = self._run_over_prefix("twig", self.twig_layers[:-1], states, inputs, full_outputs=True)
        bb = self.backbone
        maps: list[list[tuple[Tensor, bool | Tensor]]] = []
        for st, h in zip(states, inputs, strict=True):
            blocks = st.newest_blocks
            index = torch.cat([torch.arange(b.start, b.end, device=self.device) for b in blocks])
            cos, sin = self.lm.rotary_emb(h[None], st.positions[:, None])
            args = (self.twig_layers[-1], h[None], (cos, sin), [index])
            flat = rpn_scores(*args, query_key=bb.rpn_query_key, rope=bb.apply_rope)[0]
            sizes = [b.num_tokens for b in blocks]
            first: list[Tensor | None] = [None] * len(blocks)
            if bb.sink_from_first_token:
                # Qwen3-VL: the first sequence token's head-0 query on the same keys (QZ:M3:1122-1127).
                sink = rpn_scores(
                    *args, query_key=bb.rpn_query_key, rope=bb.apply_rope, query_row=0, query_heads=slice(0, 1)
                )[0]
                first = list(sink.split(sizes))
            maps.append(
                [
                    (m.view(*b.grid_hw), bb.sink_mask(None if f is None else f.view(*b.grid_hw)))
                    for m, f, b in zip(flat.split(sizes), first, blocks, strict=True)
                ]
            )
        return maps

    def propose(self, states: Sequence[SequenceState]) -> list[Proposal]:
        """SD-RPN boxes on each sample's newest image (the block with the strongest peak when there are several)."""
        if not states:
            return []
        with self._timed(states, "propose"), torch.inference_mode():
            all_maps = self._rpn_maps(states)
            proposals = []
            for st, maps in zip(states, all_maps, strict=True):
                candidates = []
                for block, (logits, sink_mask) in zip(st.newest_blocks, maps, strict=True):
                    grid_boxes, prob = roi.propose_grid_boxes(
                        logits,
                        st.roi_thresh,
                        max_boxes=st.max_boxes,
                        mode=st.box_mode,
                        peak_frac=st.roi_peak_frac,
                        sink_mask=sink_mask,
                    )
                    candidates.append((float(prob.max()), block, logits, prob, grid_boxes))
                _, block, logits, prob, grid_boxes = max(candidates, key=lambda c: c[0])
                boxes = [self._pixel_box(st, block, gb) for gb in grid_boxes]
                proposals.append(Proposal(block, logits, prob, grid_boxes, boxes))
                st.proposals.append(proposals[-1])
        return proposals

    def _pixel_box(self, st: SequenceState, block: ImageBlock, grid_box: roi.GridBox) -> roi.PixelBox:
        image_wh = (st.image.width, st.image.height)
        min_side = self.backbone.min_box_side
        if block.step == 0:
            margin = st.options.margin
            return roi.grid_box_to_pixels(grid_box, block.grid_hw, image_wh, min_side=min_side, margin=margin)
        return roi.sub_box_to_pixels(
            grid_box, block.grid_hw, block.box, image_wh, min_side=min_side, margin=st.options.margin
        )

    # -- zoom -----------------------------------------------------------------------------------------------------

    def zoom(self, states: Sequence[SequenceState], proposals: Sequence[Proposal]) -> None:
        """Crop each proposal's boxes from the original image, re-encode, splice after the newest image, re-run
        layers < K on the new tail only (reusing the prefix's cache).

        With several boxes and `multi_box` "best", the state takes the first (heaviest) box alone and each other box
        goes into a copy of the state, kept in `alternatives` (all of them run here in one batch). A later zoom step
        continues the state's own sequence; the alternatives stay candidates as they are."""
        work: list[tuple[SequenceState, Proposal]] = []
        for st, p in zip(states, proposals, strict=True):
            if st.multi_box == "best" and len(p.boxes) > 1:
                for k in range(1, len(p.boxes)):
                    st.alternatives.append(_fork(st))
                    work.append((st.alternatives[-1], _single_box(p, k)))
                p = _single_box(p, 0)
            if p.boxes:
                work.append((st, p))
        if not work:
            return
        with self._timed([st for st, _ in work], "zoom"), torch.inference_mode():
            kept = self.add_regions([st for st, _ in work], [p for _, p in work])
            # Layers < K for the new tail only: the request's own layer<K state before the splice stays valid
            # (causality), and a region zoomed before with the same box may even be cached through its end.
            own: list[tuple[int, list[KV], Tensor] | None] = [
                (p, [(k[:, :p], v[:, :p]) for k, v in st.kv_below_k], st.hidden_k[:p])
                for (st, _), p in zip(work, kept, strict=True)
            ]
            states = [st for st, _ in work]
            outputs, kvs = self._run_over_prefix(
                "below", self.layers[: self.split], states, [st.embeds for st in states], full_outputs=True,
                own_prefix=own, first_layer=0,
            )  # fmt: skip
            for st, h, kv in zip(states, outputs, kvs, strict=True):
                st.hidden_k, st.kv_below_k = h, kv

    def add_regions(self, states: Sequence[SequenceState], proposals: Sequence[Proposal]) -> list[int]:
        """Crop each proposal's boxes from the original image, encode them (feature cache first) and `splice` them
        in; runs no decoder layer. Returns per sample P, the length of the prefix whose layer<K state stays valid."""
        work = list(zip(states, proposals, strict=True))
        with torch.inference_mode():
            # Crop features: from the cache when this region of this image was zoomed before, else one ViT call.
            crop_feats: list[VisionOutput | None] = []
            crop_grids: list[Tensor] = []
            misses: list[tuple[int, str, Tensor]] = []
            for st, p in work:
                for box in p.boxes:
                    key = self._key("crop", st, box=box.as_list())
                    hit = self.cache.get(key, device=self.device)
                    if hit is not None:
                        crop_feats.append(_vision_from_entry(hit, self.dtype))
                        crop_grids.append(hit["grid_thw"].cpu())
                        st.cache_hits.append("crop")
                        continue
                    crop = st.image.crop((box.x0, box.y0, box.x1, box.y1))
                    pixels, grid = self._preprocess(crop, st.min_pixels, st.max_pixels)
                    misses.append((len(crop_feats), key, pixels))
                    crop_feats.append(None)
                    crop_grids.append(grid)
            computed = self.encode_views([m[2] for m in misses], [crop_grids[m[0]] for m in misses])
            for (index, key, _), f in zip(misses, computed, strict=True):
                crop_feats[index] = f
                self.cache.put(key, _vision_entry(f, crop_grids[index]), self._cache_meta())
            feats = iter(crop_feats)
            grids = iter(crop_grids)
            kept = []
            for st, p in work:
                if not p.boxes:
                    kept.append(int(st.input_ids.numel()))  # nothing spliced: the whole sequence stays valid
                    continue
                roi_views = [(_present(next(feats)), next(grids)) for _ in p.boxes]
                kept.append(self.splice(st, p, roi_views))
        return kept

    def proposal_from_grid_boxes(self, st: SequenceState, grid_boxes: Sequence[roi.GridBox]) -> Proposal:
        """A proposal of boxes given on the grid of the sample's newest image (the first one when there are several),
        e.g. to replay a box proposed earlier. It carries no SD-RPN map: `logits` and `prob` are empty."""
        block = st.newest_blocks[0]
        boxes = [self._pixel_box(st, block, gb) for gb in grid_boxes]
        return Proposal(block, torch.empty(0), torch.empty(0), list(grid_boxes), boxes)

    def splice(
        self, st: SequenceState, proposal: Proposal, roi_views: Sequence[tuple[VisionOutput | Tensor, Tensor]]
    ) -> int:
        """Insert one RoI block per box after the newest image's <|vision_end|>; update ids, embeddings, positions
        and blocks. Returns P, the number of leading tokens whose layer<K cache stays valid (spec §4.1, §4.3)."""
        merge = self.model.config.vision_config.spatial_merge_size
        newest = max(st.blocks, key=lambda b: b.start)
        prefix_len = newest.end  # keeps the newest image's tokens, not its <|vision_end|>
        insert_at = newest.end + 1
        step = newest.step + 1
        embed = self.lm.embed_tokens
        vs = embed(torch.tensor([self.vision_start_id], device=self.device))
        ve = embed(torch.tensor([self.vision_end_id], device=self.device))

        ids_parts = [st.input_ids[:insert_at]]
        emb_parts = [st.embeds[:insert_at]]
        pos_parts = [st.positions[:, :insert_at]]
        last = float(st.positions[0, insert_at - 1])  # E: position of the newest <|vision_end|> (t == h == w)
        new_blocks = []
        cursor = insert_at
        for grid_box, box, (view, grid_thw) in zip(proposal.grid_boxes, proposal.boxes, roi_views, strict=True):
            feat = view if isinstance(view, VisionOutput) else VisionOutput(view, [])  # bare features: no DeepStack
            h_r, w_r = int(grid_thw[1]) // merge, int(grid_thw[2]) // merge
            n = h_r * w_r
            parent = proposal.block
            # Continuous spatio-temporal alignment (§4.2): the next temporal slot, fractional h/w inside the parent
            # image's own frame, between the centres of the first and last covered cells of the grid box.
            rows = torch.linspace(
                float(parent.row_pos[grid_box.y0]), float(parent.row_pos[grid_box.y1 - 1]), h_r, device=self.device
            )
            cols = torch.linspace(
                float(parent.col_pos[grid_box.x0]), float(parent.col_pos[grid_box.x1 - 1]), w_r, device=self.device
            )
            t = torch.full((n,), last + 2, device=self.device)
            block_pos = torch.stack(
                [t, rows[:, None].expand(h_r, w_r).reshape(-1), cols[None, :].expand(h_r, w_r).reshape(-1)]
            )
            extent = max(h_r, w_r)
            start_pos = torch.full((3, 1), last + 1, device=self.device)
            end_pos = torch.full((3, 1), last + 2 + extent, device=self.device)
            ids_parts.append(
                torch.tensor(
                    [self.vision_start_id] + [self.image_token_id] * n + [self.vision_end_id], dtype=torch.long
                )
            )
            emb_parts += [vs, feat.features.to(self.dtype), ve]
            pos_parts += [start_pos, block_pos, end_pos]
            new_blocks.append(ImageBlock(cursor + 1, (h_r, w_r), box, step, rows, cols, deepstack=feat.deepstack))
            cursor += n + 2
            last = last + 2 + extent

        shift = last - float(st.positions[0, insert_at - 1])
        ids_parts.append(st.input_ids[insert_at:])
        emb_parts.append(st.embeds[insert_at:])
        pos_parts.append(st.positions[:, insert_at:] + shift)
        st.input_ids = torch.cat(ids_parts)
        st.embeds = torch.cat(emb_parts)
        st.blocks = st.blocks + new_blocks
        if self.settings.reuse_src_pos:
            st.positions = torch.cat(pos_parts, dim=1)
        else:
            # Plain positions: the stock layout of a multi-image prompt (what SD-RPN-Qwen used, spec §4.2).
            grids = [st.grid_thw] + [self._block_grid_thw(b) for b in st.blocks[1:]]
            st.positions = self._global_positions(st.input_ids, grids)
            for b in st.blocks:
                b.row_pos = st.positions[1, b.start : b.end : b.grid_hw[1]].clone()
                b.col_pos = st.positions[2, b.start : b.start + b.grid_hw[1]].clone()
        return prefix_len

    def _block_grid_thw(self, block: ImageBlock) -> Tensor:
        merge = self.model.config.vision_config.spatial_merge_size
        return torch.tensor([1, block.grid_hw[0] * merge, block.grid_hw[1] * merge])

    # -- finish + decode ------------------------------------------------------------------------------------------

    def finish(self, states: Sequence[SequenceState]) -> None:
        """Layers >= K over each final sequence from its saved layer-K states; logits of the first answer token.
        A state's `alternatives` are finished in the same batch."""
        states = _with_alternatives(states)
        if not states:
            return
        with self._timed(states, "finish"), torch.inference_mode():
            outputs, kvs = self._run_over_prefix(
                "above", self.layers[self.split :], states, [st.hidden_k for st in states], first_layer=self.split
            )
            for st, h, kv in zip(states, outputs, kvs, strict=True):
                st.kv_all = list(st.kv_below_k) + kv
                st.next_logits = self.model.lm_head(self.lm.norm(h[-1:]))[0].float()

    def decode(self, states: Sequence[SequenceState]) -> None:
        """Decoding of one answer per sample (`options.max_new_tokens`, ending at a `stop` string), all samples in
        one batch; greedy unless the request asked for sampling.

        A state with `alternatives` (several boxes, `multi_box` "best") gets the answer of the candidate sequence
        whose answer tokens have the highest mean log-probability (the state's own on a tie), and that candidate's
        sequence, so the result's steps show the box the answer was read from."""
        every = _with_alternatives(states)
        if not every:
            return
        with self._timed(every, "decode"):
            texts = self.generate(every, stop_strings=[st.stop for st in every])
        for st, text in zip(every, texts, strict=True):
            st.answer = text.strip()
        for st in states:
            if st.alternatives:
                best = max([st, *st.alternatives], key=_confidence)
                if best is not st:
                    _adopt(st, best)
                st.alternatives = []

    def generate(
        self,
        states: Sequence[SequenceState],
        *,
        max_new_tokens: int | Sequence[int] | None = None,
        stop_strings: Sequence[Sequence[str]] | None = None,
        keep_history: bool = False,
    ) -> list[str]:
        """Decoding from each state's `next_logits` until a stop token, a stop string or the limit: greedy, or
        sampled where the state has a `sampler` (`qzoom.sampling`).

        `stop_strings[i]` are sample i's stop strings. Returns the text generated by this call per sample (stop
        tokens dropped, stop strings kept). With
        `keep_history` every generated token, the final one included, is fed through the model and kept: ids,
        positions and KV grow append-only, so the conversation can continue with `append` (the tool loop of
        thinking-with-images models). Without it the KV of the answer is dropped (a one-shot answer).
        """
        if not states:
            return []
        with torch.inference_mode():
            batch = len(states)
            lens = [st.kv_all[0][0].shape[1] for st in states]
            big_n = max(lens)
            key_valid = torch.zeros(batch, big_n, dtype=torch.bool, device=self.device)
            store = _KVStore()
            for l_idx, layer in enumerate(self.layers):
                ref = states[0].kv_all[l_idx][0]
                keys = ref.new_zeros(batch, ref.shape[0], big_n, ref.shape[2])
                values = torch.zeros_like(keys)
                for i, st in enumerate(states):
                    keys[i, :, big_n - lens[i] :], values[i, :, big_n - lens[i] :] = st.kv_all[l_idx]
                store.layers[layer.self_attn.layer_idx] = (keys, values)
            for i in range(batch):
                key_valid[i, big_n - lens[i] :] = True
            last_pos = torch.stack([st.positions[:, -1] for st in states], dim=1)  # (3, B)
            logits = torch.stack([st.next_logits for st in states])
            if max_new_tokens is None or isinstance(max_new_tokens, int):
                limits = [max_new_tokens or st.options.max_new_tokens for st in states]
            else:
                limits = list(max_new_tokens)
            stops = list(stop_strings) if stop_strings is not None else [()] * batch
            generated: list[list[int]] = [[] for _ in states]  # every chosen token, stop tokens included
            hidden_k_rows: list[list[Tensor]] = [[] for _ in states]  # layer-K states of fed tokens (history)
            fed_logits: list[Tensor | None] = [None] * batch
            active = [True] * batch
            while True:
                next_ids = choose_tokens(logits, [st.sampler for st in states])
                chosen_logprobs = torch.log_softmax(logits, dim=-1).gather(1, next_ids[:, None])[:, 0]
                feed = [False] * batch
                for i in range(batch):
                    if not active[i]:
                        continue
                    token = int(next_ids[i])
                    generated[i].append(token)
                    states[i].answer_logprobs.append(float(chosen_logprobs[i]))
                    text = self.processor.tokenizer.decode(generated[i][-16:], skip_special_tokens=False)
                    finished = (
                        token in self.stop_ids
                        or len(generated[i]) >= limits[i]
                        or any(stop in text for stop in stops[i])
                    )
                    active[i] = not finished
                    feed[i] = not finished or keep_history
                if not any(feed):
                    break
                feed_mask = torch.tensor(feed, device=self.device)
                ids = torch.where(feed_mask, next_ids, self.pad_id)
                hidden = self.lm.embed_tokens(ids)[:, None]  # (B, 1, d)
                last_pos = last_pos + feed_mask.float()[None]
                key_valid = torch.cat([key_valid, feed_mask[:, None]], dim=1)
                mask = _attention_mask(key_valid, 1, self.attn_impl, hidden.dtype)
                position_embeddings = self.lm.rotary_emb(hidden, last_pos[:, :, None])
                for j, layer in enumerate(self.layers):
                    if j == self.split and keep_history:
                        for i in range(batch):
                            if feed[i]:
                                hidden_k_rows[i].append(hidden[i])
                    hidden = layer(
                        hidden, attention_mask=mask, position_embeddings=position_embeddings, past_key_values=store
                    )
                logits = self.model.lm_head(self.lm.norm(hidden[:, -1])).float()
                for i in range(batch):
                    if feed[i]:
                        fed_logits[i] = logits[i]
            texts = []
            for i, st in enumerate(states):
                kept = [t for t in generated[i] if t not in self.stop_ids]
                st.answer_ids.extend(kept)
                texts.append(self.processor.tokenizer.decode(kept, skip_special_tokens=True))
                if not keep_history or not generated[i]:
                    continue
                cols = key_valid[i].nonzero()[:, 0]
                st.kv_all = [
                    (k[i][:, cols], v[i][:, cols])
                    for k, v in (store.layers[layer.self_attn.layer_idx] for layer in self.layers)
                ]
                new_ids = torch.tensor(generated[i], dtype=torch.long)
                n = len(generated[i])
                step = torch.arange(1, n + 1, device=self.device, dtype=torch.float32)
                st.positions = torch.cat([st.positions, st.positions[:, -1:] + step[None]], dim=1)
                st.embeds = torch.cat([st.embeds, self.lm.embed_tokens(new_ids.to(self.device))])
                st.input_ids = torch.cat([st.input_ids, new_ids])
                st.hidden_k = torch.cat([st.hidden_k, *hidden_k_rows[i]])
                st.next_logits = _present(fed_logits[i])
        return texts

    def append(self, states: Sequence[SequenceState], pieces: Sequence[Sequence[str | ImagePiece]]) -> None:
        """Append text and images to each finished sequence and run them through every layer on top of its KV.

        pieces[i] is a list of text (special tokens such as <|im_start|> allowed) and `ImagePiece`s, each image
        becoming <|vision_start|> + its tokens + <|vision_end|> at the stock M-RoPE positions of an image that
        follows the sequence. Afterwards `next_logits` predicts the next token, and `generate` can continue.
        """
        with self._timed(states, "append"), torch.inference_mode():
            merge = self.model.config.vision_config.spatial_merge_size
            new_embeds: list[Tensor] = []
            new_pos: list[Tensor] = []
            for st, parts in zip(states, pieces, strict=True):
                ids: list[Tensor] = []
                embs: list[Tensor] = []
                pos: list[Tensor] = []
                nxt = float(st.positions[0, -1]) + 1  # text after text: t == h == w
                cursor = st.input_ids.numel()
                for part in parts:
                    if isinstance(part, str):
                        tok = torch.tensor(self.processor.tokenizer(part, add_special_tokens=False)["input_ids"])
                        ids.append(tok)
                        embs.append(self.lm.embed_tokens(tok.to(self.device)))
                        pos.append(
                            nxt + torch.arange(len(tok), device=self.device, dtype=torch.float32)[None].expand(3, -1)
                        )
                        nxt += len(tok)
                        cursor += len(tok)
                        continue
                    vision, grid_thw = self._image_piece_features(st, part)
                    feat = vision.features
                    h, w = int(grid_thw[1]) // merge, int(grid_thw[2]) // merge
                    ids.append(
                        torch.tensor([self.vision_start_id] + [self.image_token_id] * (h * w) + [self.vision_end_id])
                    )
                    vs = self.lm.embed_tokens(
                        torch.tensor([self.vision_start_id, self.vision_end_id], device=self.device)
                    )
                    embs += [vs[:1], feat, vs[1:]]
                    rows = nxt + 1 + torch.arange(h, device=self.device, dtype=torch.float32)
                    cols = nxt + 1 + torch.arange(w, device=self.device, dtype=torch.float32)
                    grid_pos = torch.stack(
                        [torch.full((h * w,), nxt + 1, device=self.device), rows.repeat_interleave(w), cols.repeat(h)]
                    )
                    end = nxt + 1 + max(h, w)
                    pos += [
                        torch.full((3, 1), nxt, device=self.device),
                        grid_pos,
                        torch.full((3, 1), end, device=self.device),
                    ]
                    step = max((b.step for b in st.blocks), default=0) + 1
                    box = part.box or roi.PixelBox(0, 0, part.image.width, part.image.height)
                    st.blocks.append(
                        ImageBlock(
                            cursor + 1, (h, w), box, step, rows, cols, before_question=False, deepstack=vision.deepstack
                        )
                    )
                    nxt = end + 1
                    cursor += h * w + 2
                st.input_ids = torch.cat([st.input_ids, *ids])
                new_embeds.append(torch.cat(embs))
                new_pos.append(torch.cat(pos, dim=1))
            tapped: list[Tensor] = []
            starts = [int(st.input_ids.numel()) - e.shape[0] for st, e in zip(states, new_embeds, strict=True)]
            outputs, kvs = _run_layers(
                self.layers,
                self.lm.rotary_emb,
                self.attn_impl,
                new_embeds,
                new_pos,
                [st.kv_all for st in states],
                keep_cache=True,
                tap=self.split,
                tapped=tapped,
                inject=self._injections(states, starts, 0, len(self.layers)),
            )
            for st, h_out, kv, emb, pos_, h_k in zip(states, outputs, kvs, new_embeds, new_pos, tapped, strict=True):
                st.kv_all = kv
                st.hidden_k = torch.cat([st.hidden_k, h_k])
                st.embeds = torch.cat([st.embeds, emb])
                st.positions = torch.cat([st.positions, pos_], dim=1)
                st.next_logits = self.model.lm_head(self.lm.norm(h_out[-1:]))[0].float()

    def _image_piece_features(self, st: SequenceState, piece: ImagePiece) -> tuple[VisionOutput, Tensor]:
        """Features of an appended image: a crop of the request's image is cached under its box."""
        if piece.box is not None:
            key = self._key("crop", st, box=piece.box.as_list())
        else:
            key = self._key("vision", st, digest=image_digest(piece.image))
        hit = self.cache.get(key, device=self.device)
        if hit is not None:
            st.cache_hits.append("crop" if piece.box is not None else "vision")
            return _vision_from_entry(hit, self.dtype), hit["grid_thw"].cpu()
        pixels, grid = self._preprocess_global(piece.image, st.min_pixels, st.max_pixels)
        (feat,) = self.encode_views([pixels], [grid])
        self.cache.put(key, _vision_entry(feat, grid), self._cache_meta())
        return feat, grid

    # -- helpers --------------------------------------------------------------------------------------------------

    @contextmanager
    def _timed(self, states: Sequence[SequenceState], stage: str) -> Iterator[None]:
        """Charge the wall time of a batched stage to every request in the batch (synchronising a GPU first)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = (time.perf_counter() - start) * 1000.0
        for st in states:
            st.timings_ms[stage] = st.timings_ms.get(stage, 0.0) + elapsed
