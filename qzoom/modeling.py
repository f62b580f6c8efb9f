"""The Q-Zoom branches attached to the stock Hugging Face Qwen-VL models (spec §1, §10).

Nothing of transformers is forked. `QZoomQwen2_5_VLForConditionalGeneration` *is* the stock
`Qwen2_5_VLForConditionalGeneration` (and `QZoomQwen3VLForConditionalGeneration` the stock
`Qwen3VLForConditionalGeneration`); the constructor (`QZoomModel`) adds, beside `model.language_model.layers`:

- `twig_layers`: T decoder layers that read the hidden states after layer `twig_K` (the SD-RPN). Only the
  input norm and the Q/K projections of the last one are used (an attention-logit map, §1.2).
- `high_res_layers` + `high_res_head`: `high_res_T` decoder layers after layer `high_res_K` and a Linear(d, 1)
  (the gate, §1.3).

Their settings live in `config.json` under the official names (`enable_twig`, `twig_K`, `twig_T`,
`enable_high_res`, `high_res_K`, `high_res_T`, `high_res_thresh`, `reuse_src_pos`, ...), so a qzoom checkpoint is an
ordinary HF model directory, and the stock class loads it too (ignoring the branches). The official Qwen3-VL code
also copies the flags into `text_config`; they are read from there when the top level lacks them.

The one model class per backbone is all this module knows of backbones; everything else that differs between them
lives in `qzoom.backbones`.

The branch computations are here as two small functions, `gate_probability` and `roi_logit_map`; running the
decoder layers in order, caches and sequence surgery belong to `qzoom.engine`.
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb, repeat_kv

from qzoom.roi import BOX_MODES, BoxMode
from qzoom.schemas import MULTI_BOX_MODES, MultiBox

# Defaults of the official code (spec §1.1, §3, §5.1): τ_roi = 0.1 at build time, τ_gate = 0.1.
DEFAULT_ROI_THRESH = 0.1
DEFAULT_GATE_THRESH = 0.1


@dataclass(frozen=True)
class QZoomSettings:
    """The Q-Zoom fields of a checkpoint's config.json, with the official defaults for absent keys."""

    enable_twig: bool = False
    twig_K: int = 0
    twig_T: int = 3
    enable_high_res: bool = False
    high_res_K: int = 0
    high_res_T: int = 3
    high_res_thresh: float = DEFAULT_GATE_THRESH
    roi_thresh: float = DEFAULT_ROI_THRESH
    # Boxes per zoom step (connected components of the thresholded map). Not an official key: the paper's one box
    # is the default, and a checkpoint whose boxes were calibrated (`qzoom train boxes`) records its own.
    max_boxes: int = 1
    # How the boxes come from the map (`qzoom.roi.propose_grid_boxes`), also not official keys: "union" of every cell
    # above τ_roi is the paper; "components" takes the heaviest connected components; `roi_peak_frac` > 0 also drops
    # the cells below that fraction of the map's peak. A checkpoint records its own (the demo model does).
    box_mode: BoxMode = "union"
    roi_peak_frac: float = 0.0
    # With several boxes: one sequence holding them all ("joint"), or one per box and the most confident answer
    # ("best"). Not an official key either (the paper has one box).
    multi_box: MultiBox = "joint"
    # The official code reads `reuse_src_pos` with default False (QZ:M25:1161); a checkpoint that wants the aligned
    # positions says so in its config (ours always write it).
    reuse_src_pos: bool = False
    min_pixels: int | None = None
    max_pixels: int | None = None

    @classmethod
    def from_config(
        cls, config: Any, *, gate_default: float = DEFAULT_GATE_THRESH, roi_default: float = DEFAULT_ROI_THRESH
    ) -> QZoomSettings:
        """The settings of `config`; thresholds it does not name are `gate_default` / `roi_default` (a backbone's)."""
        if not hasattr(config, "enable_twig") and hasattr(getattr(config, "text_config", None), "enable_twig"):
            # The official Qwen3-VL classes build the text model from text_config with the flags copied in; a
            # config saved with them only there still describes the branches.
            config = config.text_config
        get = lambda key, default: getattr(config, key, default)  # noqa: E731

        def get_float(key: str, default: float) -> float:
            value = getattr(config, key, None)
            return default if value is None else float(value)

        enable_twig = bool(get("enable_twig", False))
        twig_k = int(get("twig_K", 0) or 0)
        twig_t = int(get("twig_T", 3) or 3)
        return cls(
            enable_twig=enable_twig,
            twig_K=twig_k,
            twig_T=twig_t,
            enable_high_res=bool(get("enable_high_res", False)) and enable_twig,
            high_res_K=int(get("high_res_K", None) or twig_k),
            high_res_T=int(get("high_res_T", None) or twig_t),
            high_res_thresh=get_float("high_res_thresh", gate_default),
            roi_thresh=get_float("roi_thresh", roi_default),
            max_boxes=int(get("max_boxes", None) or 1),
            box_mode=_config_choice("box_mode", get("box_mode", None), BOX_MODES),
            roi_peak_frac=get_float("roi_peak_frac", 0.0),
            multi_box=_config_choice("multi_box", get("multi_box", None), MULTI_BOX_MODES),
            reuse_src_pos=bool(get("reuse_src_pos", False)),
            min_pixels=get("min_pixels", None),
            max_pixels=get("max_pixels", None),
        )

    def validate(self, num_layers: int) -> None:
        """Raise ValueError when the branch points do not fit a model with `num_layers` decoder layers."""
        if not self.enable_twig:
            return
        if not self.twig_K > 0 or self.twig_K + self.twig_T > num_layers or self.twig_T < 1:
            raise ValueError(f"twig_K={self.twig_K}, twig_T={self.twig_T} do not fit a {num_layers}-layer decoder")
        if self.enable_high_res and (
            not self.high_res_K > 0 or self.high_res_K + self.high_res_T > num_layers or self.high_res_T < 1
        ):
            raise ValueError(
                f"high_res_K={self.high_res_K}, high_res_T={self.high_res_T} do not fit a {num_layers}-layer decoder"
            )


_Choice = TypeVar("_Choice", bound=str)


def _config_choice(key: str, value: Any, choices: tuple[_Choice, ...]) -> _Choice:
    """One of `choices` for config.json's `key`; absent (None) is the first, the paper's."""
    if value is None:
        return choices[0]
    for choice in choices:
        if value == choice:
            return choice
    raise ValueError(f"config.json {key} must be one of {', '.join(choices)}; got {value!r}")


def _branch_layers(language_model: Any, count: int, first_layer_idx: int) -> nn.ModuleList:
    # Layers of the backbone's own decoder-layer class, with the official indices (K + i, the layers they are copied
    # from). The engine never passes a cache to a branch layer, so these indices cannot alias a backbone layer's slot.
    layer_class = type(language_model.layers[0])
    text_config = language_model.config
    return nn.ModuleList(layer_class(text_config, layer_idx=first_layer_idx + i) for i in range(count))


def attach_qzoom_branches(language_model: Any, settings: QZoomSettings) -> None:
    """Add `twig_layers`, `high_res_layers` and `high_res_head` (randomly initialised) to a stock text model."""
    text_config = language_model.config
    num_layers = len(language_model.layers)
    settings.validate(num_layers)
    if not settings.enable_twig:
        return
    language_model.twig_layers = _branch_layers(language_model, settings.twig_T, settings.twig_K)
    if settings.enable_high_res:
        language_model.high_res_layers = _branch_layers(language_model, settings.high_res_T, settings.high_res_K)
        language_model.high_res_head = nn.Linear(text_config.hidden_size, 1, bias=True)


def patch_embed_as_linear(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """The stock vision patch embedding's forward (Qwen2.5-VL's, Qwen3-VL's) as one matrix product: (N, C*T*P*P)
    patches -> (N, embed_dim).

    The stock module applies a Conv3d whose kernel and stride equal the whole patch, i.e. a linear map of the
    flattened patch; torch's CPU Conv3d does it about 3x slower than `F.linear` (measured on 256-8192 patches, 2
    cores), and the vision tower runs on every view. Same weights, same state-dict keys, equal up to float rounding.
    """
    proj: nn.Conv3d = self.proj  # type: ignore[assignment]
    weight = proj.weight.reshape(proj.weight.shape[0], -1)  # (embed_dim, C*T*P*P), the patch's flattening order
    return nn.functional.linear(hidden_states.reshape(-1, weight.shape[1]).to(weight.dtype), weight, proj.bias)


class QZoomModel:
    """The Q-Zoom constructor and branch surgery, mixed in before a stock `...ForConditionalGeneration` class.

    Everything a stock model does (forward, `generate`, `save_pretrained`, `from_pretrained`) works unchanged; the
    Q-Zoom inference path is `qzoom.engine.QZoomEngine`. One speed-only change: the vision tower's patch embedding
    runs as a matrix product (`patch_embed_as_linear`) instead of the equivalent Conv3d.
    """

    model: Any
    config: Any
    qzoom: QZoomSettings
    _init_weights: Any

    def __init__(self, config: Any) -> None:
        super().__init__(config)  # type: ignore[call-arg]
        self.qzoom = QZoomSettings.from_config(config)
        attach_qzoom_branches(self.model.language_model, self.qzoom)
        for module in self.qzoom_modules():
            module.apply(self._init_weights)
        patch_embed = self.model.visual.patch_embed
        patch_embed.forward = types.MethodType(patch_embed_as_linear, patch_embed)

    def qzoom_modules(self) -> list[nn.Module]:
        lm = self.model.language_model
        return [getattr(lm, name) for name in ("twig_layers", "high_res_layers", "high_res_head") if hasattr(lm, name)]

    def attach_sd_rpn(self, twig_K: int, twig_T: int = 3) -> None:
        """Give a model without an SD-RPN its `twig_layers`, copied from `layers[twig_K:twig_K + twig_T]` (Stage 1's
        initialisation, spec §1.1), and write the fields into the config (the aligned positions on, as ours do)."""
        if self.qzoom.enable_twig:
            raise ValueError("this model already has an SD-RPN (enable_twig is true)")
        lm = self.model.language_model
        config = self.config
        config.enable_twig, config.twig_K, config.twig_T = True, twig_K, twig_T
        config.roi_source, config.roi_loss, config.reuse_src_pos = "qk", "bce", True
        config.enable_high_res = False
        settings = QZoomSettings.from_config(config)
        settings.validate(len(lm.layers))
        lm.twig_layers = _branch_layers(lm, twig_T, twig_K).to(lm.layers[0].mlp.down_proj.weight)
        for i, layer in enumerate(lm.twig_layers):
            layer.load_state_dict(lm.layers[twig_K + i].state_dict())
        self.qzoom = settings

    def attach_gate(self, high_res_K: int, high_res_T: int = 3) -> None:
        """Give a model with an SD-RPN but no gate its `high_res_layers` (copied from `layers[K:K + T]`, the documented
        intent of spec §9.6) and a freshly initialised `high_res_head`; write the fields into the config."""
        if not self.qzoom.enable_twig:
            raise ValueError("the gate needs an SD-RPN first (enable_twig is false): train Stage 1 before Stage 3")
        if self.qzoom.enable_high_res:
            raise ValueError("this model already has a gate (enable_high_res is true)")
        lm = self.model.language_model
        config = self.config
        config.enable_high_res, config.high_res_K, config.high_res_T = True, high_res_K, high_res_T
        settings = QZoomSettings.from_config(config)
        settings.validate(len(lm.layers))
        like = lm.layers[0].mlp.down_proj.weight
        lm.high_res_layers = _branch_layers(lm, high_res_T, high_res_K).to(like)
        lm.high_res_head = nn.Linear(lm.config.hidden_size, 1, bias=True).to(like)
        lm.high_res_head.apply(self._init_weights)
        for i, layer in enumerate(lm.high_res_layers):
            layer.load_state_dict(lm.layers[high_res_K + i].state_dict())
        self.qzoom = settings

    def init_branches_from_backbone(self) -> None:
        """Copy `layers[K + i]` into the i-th branch layer (the documented initialisation, spec §1.1 and §9.6)."""
        lm = self.model.language_model
        if hasattr(lm, "twig_layers"):
            for i, layer in enumerate(lm.twig_layers):
                layer.load_state_dict(lm.layers[self.qzoom.twig_K + i].state_dict())
        if hasattr(lm, "high_res_layers"):
            for i, layer in enumerate(lm.high_res_layers):
                layer.load_state_dict(lm.layers[self.qzoom.high_res_K + i].state_dict())


class QZoomQwen2_5_VLForConditionalGeneration(QZoomModel, Qwen2_5_VLForConditionalGeneration):
    """Stock Qwen2.5-VL with the Q-Zoom branches attached according to its config's Q-Zoom fields."""


class QZoomQwen3VLForConditionalGeneration(QZoomModel, Qwen3VLForConditionalGeneration):
    """Stock Qwen3-VL with the Q-Zoom branches attached according to its config's Q-Zoom fields."""


_Config = TypeVar("_Config")


def enable_qzoom(
    config: _Config,
    *,
    twig_K: int,
    twig_T: int = 3,
    enable_high_res: bool = True,
    high_res_K: int | None = None,
    high_res_T: int | None = None,
    high_res_thresh: float = DEFAULT_GATE_THRESH,
    roi_thresh: float = DEFAULT_ROI_THRESH,
    reuse_src_pos: bool = True,
) -> _Config:
    """Write the Q-Zoom fields into `config` (in place, and returned) under their official names, at the top level
    (where both the official Qwen2.5-VL and Qwen3-VL training scripts write them)."""
    c: Any = config
    c.enable_twig = True
    c.twig_K = twig_K
    c.twig_T = twig_T
    c.roi_source = "qk"
    c.roi_loss = "bce"
    c.enable_high_res = enable_high_res
    c.high_res_K = twig_K if high_res_K is None else high_res_K
    c.high_res_T = twig_T if high_res_T is None else high_res_T
    c.high_res_thresh = high_res_thresh
    c.roi_thresh = roi_thresh
    c.reuse_src_pos = reuse_src_pos
    return config


# --------------------------------------------------------------------------------------------------------------------
# The two branch computations. Inputs are the hidden states at the branch point, the attention mask and the rotary
# embeddings of the same sequence; the engine runs the branch decoder layers and calls these on their outputs.


def gate_probability(high_res_head: nn.Linear, gate_hidden: torch.Tensor) -> torch.Tensor:
    """p = sigmoid(head(h[:, -1])): the last prompt token of the gate branch's output, no final norm (§1.3).

    gate_hidden: (B, S, d) output of `high_res_layers`  ->  (B,) probabilities in float32.
    """
    return torch.sigmoid(high_res_head(gate_hidden[:, -1]).float()).squeeze(-1)


def _plain_query_key(attn: Any, normed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2.5-VL's RPN projections: q_proj / k_proj split into heads, (B, heads, S, hd) and (B, kv_heads, S, hd)."""
    batch, seq_len, _ = normed.shape
    head_dim: int = attn.head_dim
    query = attn.q_proj(normed).view(batch, seq_len, -1, head_dim).transpose(1, 2)
    key = attn.k_proj(normed).view(batch, seq_len, -1, head_dim).transpose(1, 2)
    return query, key


QueryKey = Callable[[Any, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
Rope = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def rpn_scores(
    last_twig_layer: Any,
    twig_hidden: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    image_token_index: list[torch.Tensor],
    *,
    query_key: QueryKey = _plain_query_key,
    rope: Rope = apply_rotary_pos_emb,
    query_row: int = -1,
    query_heads: slice = slice(None),
) -> list[torch.Tensor]:
    """Attention logits from one query token to each image token, mean over heads (§1.2, `roi_source='qk'`).

    twig_hidden: (B, S, d) output of `twig_layers[:-1]` (or the branch input when T == 1).
    position_embeddings: (cos, sin), each (B, S, head_dim), the M-RoPE of the same sequence.
    image_token_index: per sample, the (N_b,) sequence indices of the image tokens to score.
    query_key / rope: the backbone's projections (Qwen3-VL normalises per head) and rotary application.
    query_row / query_heads: the query token (the last one: the RPN; the first one, head 0: Qwen3-VL's sink map).
    Returns per sample a (N_b,) float32 vector of raw logits (the caller reshapes to the image's (H, W) grid).
    """
    attn = last_twig_layer.self_attn
    head_dim: int = attn.head_dim
    normed = last_twig_layer.input_layernorm(twig_hidden)
    query, key = query_key(attn, normed)
    cos, sin = position_embeddings
    query, key = rope(query, key, cos, sin)
    key = repeat_kv(key, attn.num_key_value_groups)  # (B, heads, S, hd)
    maps = []
    for b in range(len(image_token_index)):
        q = query[b, query_heads, query_row, :][:, None, :]  # (heads, 1, hd)
        k_img = key[b, :, image_token_index[b], :]  # (heads, N_b, hd)
        scores = torch.matmul(q, k_img.transpose(-2, -1)) / math.sqrt(head_dim)  # (heads, 1, N_b)
        maps.append(scores.mean(dim=0)[0].float())
    return maps


def roi_logit_map(
    last_twig_layer: Any,
    twig_hidden: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    image_token_index: list[torch.Tensor],
    *,
    query_key: QueryKey = _plain_query_key,
    rope: Rope = apply_rotary_pos_emb,
) -> list[torch.Tensor]:
    """The SD-RPN's raw logit map: `rpn_scores` with the last prompt token as the query, every head (§1.2)."""
    return rpn_scores(
        last_twig_layer, twig_hidden, position_embeddings, image_token_index, query_key=query_key, rope=rope
    )
