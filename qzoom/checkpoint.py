"""Saving and loading qzoom checkpoints: ordinary Hugging Face model directories.

A qzoom checkpoint is what `save_pretrained` writes for `QZoomQwen2_5_VLForConditionalGeneration` plus the
processor files: `config.json` (the stock Qwen2.5-VL config with the Q-Zoom fields), `model.safetensors`,
`tokenizer.json`, `preprocessor_config.json`, `chat_template.jinja`.

`load_model` also reads the released Q-Zoom checkpoints (`YuhengSSS/Q-Zoom-Qwen2.5VL-7B` and siblings), written by
transformers 4.51 in the pre-4.52 key layout (spec §1.1, §8.1, §9.5):

    model.layers.*          -> model.language_model.layers.*
    model.twig_layers.*     -> model.language_model.twig_layers.*
    model.high_res_layers.* -> model.language_model.high_res_layers.*
    model.high_res_head.*   -> model.language_model.high_res_head.*
    model.embed_tokens/norm -> model.language_model.embed_tokens/norm
    visual.*                -> model.visual.*

and their flat config (text fields at the top level, Q-Zoom flags `twig_K`, `twig_T`, `high_res_K`, ...), which the
stock config class already understands. A stock Qwen2.5-VL directory loads too; it simply has no gate or SD-RPN.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from qzoom.modeling import QZoomQwen2_5_VLForConditionalGeneration
from qzoom.offline import OfflineQwen2_5_VLProcessor, save_processor

LEGACY_KEY_MAPPING = {
    r"^visual\.": "model.visual.",
    r"^model\.(?!visual\.|language_model\.)": "model.language_model.",
}


class CheckpointError(ValueError):
    """The directory is not a loadable Qwen2.5-VL / Q-Zoom checkpoint."""


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


def is_legacy_layout(keys: list[str]) -> bool:
    """True for the pre-transformers-4.52 layout (`model.layers.*`, `visual.*`) of the released checkpoints."""
    return any(k.startswith(("visual.", "model.layers.", "model.twig_layers.")) for k in keys)


def load_model(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    attn_implementation: str = "sdpa",
) -> QZoomQwen2_5_VLForConditionalGeneration:
    """Load a qzoom, released Q-Zoom or stock Qwen2.5-VL checkpoint directory, in eval mode on `device`."""
    directory = Path(path)
    if not (directory / "config.json").exists():
        raise CheckpointError(f"{directory} is not a model directory (no config.json)")
    config = json.loads((directory / "config.json").read_text())
    if config.get("model_type") not in ("qwen2_5_vl", None):
        raise CheckpointError(
            f"{directory} holds a {config.get('model_type')!r} model; qzoom runs Qwen2.5-VL (model_type 'qwen2_5_vl')"
        )
    kwargs: dict[str, Any] = {}
    if is_legacy_layout(weight_keys(directory)):
        kwargs["key_mapping"] = LEGACY_KEY_MAPPING
    try:
        model: QZoomQwen2_5_VLForConditionalGeneration = QZoomQwen2_5_VLForConditionalGeneration.from_pretrained(
            str(directory),
            dtype=dtype or torch.float32,
            attn_implementation=attn_implementation,
            **kwargs,
        )
    except ValueError as err:  # a Q-Zoom field of config.json that does not fit (QZoomSettings names it)
        raise CheckpointError(f"{directory}: {err}") from err
    model.to(torch.device(device))  # type: ignore[arg-type]  # transformers types .to() for dtypes only
    model.eval()
    return model


def save_checkpoint(
    model: QZoomQwen2_5_VLForConditionalGeneration,
    processor: OfflineQwen2_5_VLProcessor,
    path: str | Path,
) -> Path:
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
