"""Qwen3-VL (`model_type` "qwen3_vl"): the released `YuhengSSS/Q-Zoom-Qwen3VL-4B` and stock Qwen3-VL checkpoints.

What differs from Qwen2.5-VL (spec §1.1, §1.2, §3, §4.2, §12):

- 16-px patches merged 2x2: one LLM token per 32x32 source pixels; crops are at least 32 px on a side.
- The global view is resized the way qwen-vl-utils does before the official evaluation calls the processor: PIL
  bicubic straight to qwen-vl-utils' 32-px size inside the pixel budget, then the processor without a resize
  (`qzoom.images.patchify_prefit`). A crop goes through the processor's own resize at the same budget (`patchify`).
- The vision tower also returns DeepStack features (one per `deepstack_visual_indexes` entry); level l is added to the
  image's token rows after decoder layer l, for the global view and every RoI alike (the engine does the adding).
- The RPN's Q/K go through the last twig layer's per-head `q_norm` / `k_norm` before RoPE; the stock rotary module
  is the interleaved M-RoPE (frequency 1, 4, 7, ... -> h; 2, 5, 8, ... -> w).
- Attention sinks: cells where the first sequence token's head-0 query, scored against the image keys through the
  same projections and averaged over heads, has sigmoid >= 0.75 are zeroed before the blur, on maps of any size.
- Checkpoints: the released layout is the transformers >= 4.52 one (`model.language_model.*`, `model.visual.*`),
  with the Q-Zoom modules beside the decoder layers and the flags at the top level of config.json (the official
  classes also copy them, and a nested vision config, into `text_config`; `qzoom.modeling.QZoomSettings` reads the
  top level first).
- Defaults (spec §8.1-§8.2): K = 24, T = 3 (the 4B); τ_roi = 0.15 and τ_gate = 0.10 (the Doc/OCR evaluation setting)
  at 256..576 tokens of 32 px.

Positions are the stock `get_rope_index` (integer M-RoPE rows t, h, w; a spliced RoI's rows are the aligned
fractional ones of spec §4.2, built by the engine). The engine passes three rows and no separate text-position row,
so nothing reads the non-monotonic M-RoPE rows as packed-sequence boundaries (the reason the official Qwen3 code keeps
monotonic text positions for FlashAttention-2); attention masks are explicit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb

from qzoom.backbones import Backbone, BackboneDefaults, View, VisionOutput
from qzoom.images import padded_to_aspect, patchify, patchify_prefit, qwen_vl_utils_size
from qzoom.modeling import QZoomModel, QZoomQwen3VLForConditionalGeneration
from qzoom.offline import build_qwen3vl_processor, load_qwen3vl_processor, tiny_qwen3vl_config

SINK_PROB = 0.75  # QZ:M3:1127: cells at or above it on the first token's map are sinks


class Qwen3_VL(Backbone):
    name = "qwen3-vl"
    model_type = "qwen3_vl"
    cell = 32
    defaults = BackboneDefaults(twig_K=24, twig_T=3, roi_thresh=0.15, gate_thresh=0.10, min_tokens=256, max_tokens=576)
    sink_from_first_token = True

    @property
    def model_class(self) -> type[QZoomModel]:
        return QZoomQwen3VLForConditionalGeneration

    def tiny_config(self, tokenizer: Any, **sizes: int) -> Any:
        return tiny_qwen3vl_config(tokenizer, **sizes)

    def build_processor(self, tokenizer: Any | None = None) -> Any:
        return build_qwen3vl_processor(tokenizer)

    def load_processor(self, directory: str | Path) -> Any:
        return load_qwen3vl_processor(directory)

    def preprocess(
        self, image: Image.Image, image_processor: Any, min_pixels: int, max_pixels: int, view: View
    ) -> tuple[Tensor, Tensor]:
        image = padded_to_aspect(image)
        if view == "global":
            return patchify_prefit(image, image_processor, min_pixels, max_pixels)
        return patchify(image, image_processor, min_pixels, max_pixels)

    def grid(self, image: Image.Image, image_processor: Any, min_pixels: int, max_pixels: int) -> Tensor:
        # The global view's grid (what `prepare` sizes the prompt by): qwen-vl-utils' size rule.
        ip = image_processor
        view = padded_to_aspect(image)
        h, w = qwen_vl_utils_size(view.height, view.width, ip.patch_size * ip.merge_size, min_pixels, max_pixels)
        return torch.tensor([1, h // ip.patch_size, w // ip.patch_size])

    def encode(self, model: Any, pixel_values: Tensor, grids: Tensor) -> list[VisionOutput]:
        out = model.model.get_image_features(pixel_values, grids, return_dict=True)
        levels = list(out.deepstack_features or [])
        return [VisionOutput(f, [level[i] for level in levels]) for i, f in enumerate(out.pooler_output)]

    def rpn_query_key(self, attn: Any, normed: Tensor) -> tuple[Tensor, Tensor]:
        batch, seq_len, _ = normed.shape
        head_dim: int = attn.head_dim
        query = attn.q_norm(attn.q_proj(normed).view(batch, seq_len, -1, head_dim)).transpose(1, 2)
        key = attn.k_norm(attn.k_proj(normed).view(batch, seq_len, -1, head_dim)).transpose(1, 2)
        return query, key

    def apply_rope(self, query: Tensor, key: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        q, k = apply_rotary_pos_emb(query, key, cos, sin)
        return q, k

    def sink_mask(self, first_token_logits: Tensor | None) -> bool | Tensor:
        if first_token_logits is None:
            raise ValueError("the Qwen3-VL sink rule needs the first token's map")
        return (first_token_logits.sigmoid() < SINK_PROB).float()


BACKBONE = Qwen3_VL()
