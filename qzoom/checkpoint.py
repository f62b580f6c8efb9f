"""Saving and loading qzoom checkpoints: ordinary Hugging Face model directories.

A qzoom checkpoint is what `save_pretrained` writes for a Q-Zoom model class (`qzoom.modeling`) plus the processor
files: `config.json` (the stock config with the Q-Zoom fields), `model.safetensors`, `tokenizer.json`,
`preprocessor_config.json`, `chat_template.jinja`.

`load_model` picks the backbone from config.json's `model_type` (`qzoom.backbones`) and also reads the released
Q-Zoom checkpoints in their own layouts, through the backbone's key mapping:

- `YuhengSSS/Q-Zoom-Qwen2.5VL-3B` / `-7B`: written by transformers 4.51 in the pre-4.52 key layout (spec §1.1, §8.1,
  §9.5: `model.layers.*`, `model.twig_layers.*`, `model.high_res_*`, `model.embed_tokens/norm` ->
  `model.language_model.*`; `visual.*` -> `model.visual.*`) with a flat config that the stock config class reads.
- `YuhengSSS/Q-Zoom-Qwen3VL-4B`: already `model.language_model.*` / `model.visual.*`, with the Q-Zoom flags at the top
  level and copied into `text_config` (which also carries a nested vision config; both are ignored).

A stock directory of either backbone loads too; it simply has no gate or SD-RPN.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from qzoom.backbones import backbone_for
from qzoom.backbones.qwen2_5_vl import LEGACY_KEY_MAPPING, is_legacy_layout
from qzoom.offline import save_processor

__all__ = ["LEGACY_KEY_MAPPING", "CheckpointError", "is_legacy_layout", "load_model", "save_checkpoint"]


class CheckpointError(ValueError):
    """The directory is not a loadable Qwen-VL / Q-Zoom checkpoint."""


def weight_keys(directory: Path) -> list[str]:
    """The tensor names stored in a checkpoint directory (single file or sharded)."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        return list(json.loads(index.read_text())["weight_map"])
    single = directory / "model.safetensors"
    if not single.exists():
        raise CheckpointError(f"{directory} holds no model.safetensors or model.safetensors.index.json")
    with safe_open(str(single), framework="pt") as f:
        return list(f.keys())


def load_model(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    attn_implementation: str = "sdpa",
) -> Any:
    """Load a qzoom, released Q-Zoom or stock Qwen2.5-VL / Qwen3-VL checkpoint directory, in eval mode on `device`."""
    directory = Path(path)
    if not (directory / "config.json").exists():
        raise CheckpointError(f"{directory} is not a model directory (no config.json)")
    config = json.loads((directory / "config.json").read_text())
    try:
        backbone = backbone_for(config.get("model_type"))
    except ValueError as err:
        raise CheckpointError(f"{directory} holds a {config.get('model_type')!r} model: {err}") from err
    kwargs: dict[str, Any] = {}
    mapping = backbone.key_mapping(weight_keys(directory))
    if mapping is not None:
        kwargs["key_mapping"] = mapping
    try:
        model: Any = backbone.model_class.from_pretrained(  # type: ignore[attr-defined]
            str(directory),
            dtype=dtype or torch.float32,
            attn_implementation=attn_implementation,
            **kwargs,
        )
    except ValueError as err:  # a Q-Zoom field of config.json that does not fit (QZoomSettings names it)
        raise CheckpointError(f"{directory}: {err}") from err
    model.to(torch.device(device))
    model.eval()
    return model


def save_checkpoint(model: Any, processor: Any, path: str | Path) -> Path:
    """Write model and processor files into `path` (created if needed); returns the directory."""
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory))
    save_processor(processor, directory)
    return directory


def model_fingerprint(model: torch.nn.Module) -> str:
    """A short revision id of a model's weights, for cache keys: changes whenever any tensor's shape or leading
    values change. Reads 64 values per tensor, so it costs milliseconds even on a 7B model (no file I/O)."""
    digest = hashlib.blake2b(digest_size=8)
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().reshape(-1)[:64].float().cpu().numpy().tobytes())
    return digest.hexdigest()
