"""What differs between the stock vision-language models Q-Zoom runs on, behind one narrow interface.

The engine, the graph, the service and the tools are one copy each; they call a `Backbone` for everything that
depends on which model family a checkpoint is (spec §1.1, §1.2, §3, §4.2, §8.1):

- the Q-Zoom model class (the stock class with the branches attached) and the checkpoint key layouts it loads;
- the processor (build, load, save) and the image preprocessing of a global view and of a crop;
- the pixels per LLM token side (`cell`), which is also the minimum side of a crop in source pixels;
- the vision tower call, which also returns the DeepStack features a backbone injects into its early decoder layers
  (none for Qwen2.5-VL);
- the Q/K projections of the SD-RPN logits (Qwen3-VL normalises per head before RoPE) and the attention-sink rule;
- per-backbone defaults: branch point K and depth T, thresholds, pixel budget.

Positions are the same code for every Qwen-VL backbone here: the stock `get_rope_index` for plain positions and the
aligned fractional positions of spec §4.2 on its output; the stock rotary module of each model turns them into its
own (sectioned or interleaved) M-RoPE.

`backbone_for(model_type)` picks the module from a config's `model_type`; adding a backbone is one new module in this
package and one line in `_MODULES` (docs/backbones.md).
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch
    from PIL import Image
    from torch import Tensor, nn

    from qzoom.modeling import QZoomModel

View = Literal["global", "crop"]


@dataclass(frozen=True)
class BackboneDefaults:
    """Settings a checkpoint of this backbone gets when its config.json does not name them (spec §8.1-§8.2)."""

    twig_K: int  # branch point of the released checkpoints' largest common size
    twig_T: int
    roi_thresh: float  # τ_roi
    gate_thresh: float  # τ_gate
    min_tokens: int  # pixel budget of a view, in LLM tokens (x cell² pixels)
    max_tokens: int


@dataclass
class VisionOutput:
    """One view through the vision tower: (N, d) LLM-space features and, per DeepStack level, (N, d) features that
    are added to the view's token rows after the decoder layer of the same index (empty when the backbone has none)."""

    features: Tensor
    deepstack: list[Tensor]


class Backbone(ABC):
    """One backbone family. Instances are stateless singletons (`backbone_for`)."""

    name: str  # what users type: "qwen2.5-vl"
    model_type: str  # config.json's model_type: "qwen2_5_vl"
    cell: int  # source pixels per LLM token side (patch x merge)
    defaults: BackboneDefaults

    @property
    def min_box_side(self) -> int:
        """Minimum crop side in source pixels: one LLM token (spec §3 step 4)."""
        return self.cell

    @property
    def min_pixels(self) -> int:
        return self.defaults.min_tokens * self.cell**2

    @property
    def max_pixels(self) -> int:
        return self.defaults.max_tokens * self.cell**2

    # -- model and checkpoint ---------------------------------------------------------------------------------

    @property
    @abstractmethod
    def model_class(self) -> type[QZoomModel]:
        """The stock `...ForConditionalGeneration` with the Q-Zoom branches (`qzoom.modeling`)."""

    def key_mapping(self, keys: list[str]) -> dict[str, str] | None:
        """Regex -> replacement for the tensor names of an older layout (given the stored names), or None."""
        return None

    @abstractmethod
    def tiny_config(self, tokenizer: Any, **sizes: int) -> Any:
        """A few-layer config of the real architecture, for tests and `qzoom init-tiny`."""

    # -- processor and preprocessing --------------------------------------------------------------------------

    @abstractmethod
    def build_processor(self, tokenizer: Any | None = None) -> Any:
        """The stock processor with the offline byte tokenizer (or `tokenizer`), images only."""

    @abstractmethod
    def load_processor(self, directory: str | Path) -> Any:
        """The processor of a model directory (ours, a stock one or a released Q-Zoom one)."""

    @abstractmethod
    def preprocess(
        self, image: Image.Image, image_processor: Any, min_pixels: int, max_pixels: int, view: View
    ) -> tuple[Tensor, Tensor]:
        """Pixel values (patches, C*T*P*P) float32 and patch grid (3,) of one view at the pixel budget, as the
        official evaluation feeds them (a global view and a crop may be resized differently)."""

    @abstractmethod
    def grid(self, image: Image.Image, image_processor: Any, min_pixels: int, max_pixels: int) -> Tensor:
        """The patch grid (3,) that `preprocess` gives, from the size alone (no pixels)."""

    # -- inference pieces ---------------------------------------------------------------------------------------

    @abstractmethod
    def encode(self, model: Any, pixel_values: Tensor, grids: Tensor) -> list[VisionOutput]:
        """The vision tower + merger over several views (concatenated patches, (V, 3) grids), per view."""

    @abstractmethod
    def rpn_query_key(self, attn: Any, normed: Tensor) -> tuple[Tensor, Tensor]:
        """Per-head queries (B, heads, S, hd) and keys (B, kv_heads, S, hd) of the RPN's last twig layer, before RoPE,
        from its input-normed hidden states (spec §1.2)."""

    @abstractmethod
    def apply_rope(self, query: Tensor, key: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """The stock rotary application of this backbone's attention."""

    # Whether `sink_mask` needs the first sequence token's logit map over the same image tokens.
    sink_from_first_token: bool = False

    @abstractmethod
    def sink_mask(self, first_token_logits: Tensor | None) -> bool | Tensor:
        """The attention-sink mask of an (H, W) RoI map (spec §3 step 1): True for the corner rule of
        `qzoom.roi.corner_sink_mask`, or a 0/1 tensor, given the first token's (H, W) logits when
        `sink_from_first_token`."""

    def default_branch(self, num_layers: int) -> tuple[int, int]:
        """(K, T) for a model of `num_layers` decoder layers: the released checkpoints' values where they exist."""
        return self.defaults.twig_K, self.defaults.twig_T


# model_type -> module defining `BACKBONE`. Imported on first use: each module imports its stock transformers classes.
_MODULES = {
    "qwen2_5_vl": "qzoom.backbones.qwen2_5_vl",
    "qwen3_vl": "qzoom.backbones.qwen3_vl",
}


def backbone_for(model_type: str | None) -> Backbone:
    """The backbone of a config's `model_type` (None: Qwen2.5-VL, the released checkpoints' flat configs);
    ValueError naming the supported ones otherwise."""
    module = _MODULES.get(model_type or "qwen2_5_vl")
    if module is None:
        supported = ", ".join(repr(m) for m in _MODULES)
        raise ValueError(f"model_type {model_type!r} is not a supported backbone (supported: {supported})")
    backbone: Backbone = importlib.import_module(module).BACKBONE
    return backbone


def backbone_named(name: str) -> Backbone:
    """The backbone a user names ("qwen2.5-vl", "qwen3-vl"); ValueError naming the choices otherwise."""
    for model_type in _MODULES:
        backbone = backbone_for(model_type)
        if backbone.name == name:
            return backbone
    raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONE_NAMES)}")


BACKBONE_NAMES = ("qwen2.5-vl", "qwen3-vl")


def backbone_of(model: nn.Module) -> Backbone:
    """The backbone of a loaded model (from its config's model_type)."""
    return backbone_for(getattr(model.config, "model_type", None))


def to_device(outputs: list[VisionOutput], dtype: torch.dtype) -> list[VisionOutput]:
    return [VisionOutput(o.features.to(dtype), [d.to(dtype) for d in o.deepstack]) for o in outputs]
