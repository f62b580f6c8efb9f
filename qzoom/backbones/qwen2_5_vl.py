"""Qwen2.5-VL (`model_type` "qwen2_5_vl"): the released `YuhengSSS/Q-Zoom-Qwen2.5VL-3B` / `-7B` and stock checkpoints.

- 14-px patches merged 2x2: one LLM token per 28x28 source pixels; crops are at least 28 px on a side (spec §3).
- No DeepStack; the RPN's Q/K are the plain projections; sinks are cut by the corner rule (spec §3 step 1).
- Checkpoints: ours and stock ones in the transformers >= 4.52 layout, and the released ones in the pre-4.52 layout
  (`model.layers.*`, `model.twig_layers.*`, `visual.*`; spec §1.1, §9.5), read through a key mapping.
- Defaults (spec §8.1-§8.2): the official build-time thresholds τ_roi = τ_gate = 0.1 and the Doc/OCR evaluation
  budget of 256..576 tokens; K = 24 for the 36-layer 3B and K = 18 for the 28-layer 7B, T = 3.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from qzoom.backbones import Backbone, BackboneDefaults, View, VisionOutput
from qzoom.images import padded_to_aspect, patchify
from qzoom.modeling import QZoomModel, QZoomQwen2_5_VLForConditionalGeneration, _plain_query_key
from qzoom.offline import build_processor, load_processor, tiny_qwen25vl_config

# Transformers >= 4.52 moved the decoder under `model.language_model` and the vision tower under `model.visual`.
LEGACY_KEY_MAPPING = {
    r"^visual\.": "model.visual.",
    r"^model\.(?!visual\.|language_model\.)": "model.language_model.",
}


def is_legacy_layout(keys: list[str]) -> bool:
    """True for the pre-transformers-4.52 layout (`model.layers.*`, `visual.*`) of the released checkpoints."""
    return any(k.startswith(("visual.", "model.layers.", "model.twig_layers.")) for k in keys)


class Qwen2_5_VL(Backbone):
    name = "qwen2.5-vl"
    model_type = "qwen2_5_vl"
    cell = 28
    defaults = BackboneDefaults(twig_K=18, twig_T=3, roi_thresh=0.1, gate_thresh=0.1, min_tokens=256, max_tokens=576)

    @property
    def model_class(self) -> type[QZoomModel]:
        return QZoomQwen2_5_VLForConditionalGeneration

    def key_mapping(self, keys: list[str]) -> dict[str, str] | None:
        return LEGACY_KEY_MAPPING if is_legacy_layout(keys) else None

    def tiny_config(self, tokenizer: Any, **sizes: int) -> Any:
        return tiny_qwen25vl_config(tokenizer, **sizes)

    def build_processor(self, tokenizer: Any | None = None) -> Any:
        return build_processor(tokenizer)

    def load_processor(self, directory: str | Path) -> Any:
        return load_processor(directory)

    def preprocess(
        self, image: Image.Image, image_processor: Any, min_pixels: int, max_pixels: int, view: View
    ) -> tuple[Tensor, Tensor]:
        # `patchify` equals the processor's own call on the view, without its per-call overhead (this runs for every
        # request and every training item).
        return patchify(padded_to_aspect(image), image_processor, min_pixels, max_pixels)

    def grid(self, image: Image.Image, image_processor: Any, min_pixels: int, max_pixels: int) -> Tensor:
        ip = image_processor
        view = padded_to_aspect(image)
        h, w = smart_resize(
            view.height, view.width, factor=ip.patch_size * ip.merge_size, min_pixels=min_pixels, max_pixels=max_pixels
        )
        return torch.tensor([1, h // ip.patch_size, w // ip.patch_size])

    def encode(self, model: Any, pixel_values: Tensor, grids: Tensor) -> list[VisionOutput]:
        out = model.model.get_image_features(pixel_values, grids, return_dict=True)
        return [VisionOutput(f, []) for f in out.pooler_output]

    def rpn_query_key(self, attn: Any, normed: Tensor) -> tuple[Tensor, Tensor]:
        return _plain_query_key(attn, normed)

    def apply_rope(self, query: Tensor, key: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        q, k = apply_rotary_pos_emb(query, key, cos, sin)
        return q, k

    def sink_mask(self, first_token_logits: Tensor | None) -> bool | Tensor:
        return True  # the corner rule (maps over 256 cells), `qzoom.roi.corner_sink_mask`

    def default_branch(self, num_layers: int) -> tuple[int, int]:
        # The released 3B (36 layers) branches at 24, the 7B (28 layers) at 18 (spec §8.1).
        return {36: (24, 3), 28: (18, 3)}.get(num_layers, (self.defaults.twig_K, self.defaults.twig_T))


BACKBONE = Qwen2_5_VL()
