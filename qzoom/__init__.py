"""qzoom: query-aware zooming for multimodal LLMs, Q-Zoom (arXiv 2604.06912) on stock Hugging Face Qwen2.5-VL.

    from qzoom import AskOptions, QZoomEngine, load_image
    from qzoom.agent import ask

    engine = QZoomEngine.from_pretrained("path/to/checkpoint")      # qzoom, released Q-Zoom or stock Qwen2.5-VL
    (result,) = ask(engine, [load_image("page.png")], ["What is the serial number?"])
    print(result.answer, result.gate_score, [s.box for s in result.steps])

The steps (`prepare`, `encode`, `prefill`, `gate`, `propose`, `zoom`, `finish`, `decode`) are methods of
`QZoomEngine`; the LangGraph graph in `qzoom.agent` chains them. `AskResult` is the JSON contract of `qzoom ask --json`.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

# In a source checkout, agent/ tools/ service/ evals/ beside this folder are the subpackages qzoom.agent, ...
# (pyproject's package-dir mapping). When Python finds this folder directly (a script or `python -c` run from the
# repository root), the editable install's mapping is bypassed; the root on __path__ keeps them importable.
_checkout = Path(__file__).resolve().parent.parent
if (_checkout / "pyproject.toml").is_file() and (_checkout / "agent" / "__init__.py").is_file():
    __path__.append(str(_checkout))

# Exports load on first use, so that `import qzoom.tools...` (agents without torch) never imports torch.
_EXPORTS = {
    "load_model": "qzoom.checkpoint",
    "save_checkpoint": "qzoom.checkpoint",
    "QZoomEngine": "qzoom.engine",
    "SequenceState": "qzoom.engine",
    "ImageError": "qzoom.images",
    "load_image": "qzoom.images",
    "QZoomQwen2_5_VLForConditionalGeneration": "qzoom.modeling",
    "QZoomQwen3VLForConditionalGeneration": "qzoom.modeling",
    "QZoomSettings": "qzoom.modeling",
    "enable_qzoom": "qzoom.modeling",
    "AskOptions": "qzoom.schemas",
    "AskResult": "qzoom.schemas",
    "StepResult": "qzoom.schemas",
}

if TYPE_CHECKING:
    from qzoom.checkpoint import load_model, save_checkpoint
    from qzoom.engine import QZoomEngine, SequenceState
    from qzoom.images import ImageError, load_image
    from qzoom.modeling import (
        QZoomQwen2_5_VLForConditionalGeneration,
        QZoomQwen3VLForConditionalGeneration,
        QZoomSettings,
        enable_qzoom,
    )
    from qzoom.schemas import AskOptions, AskResult, StepResult


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'qzoom' has no attribute {name!r}")


__all__ = [
    "AskOptions",
    "AskResult",
    "ImageError",
    "QZoomEngine",
    "QZoomQwen2_5_VLForConditionalGeneration",
    "QZoomQwen3VLForConditionalGeneration",
    "QZoomSettings",
    "SequenceState",
    "StepResult",
    "enable_qzoom",
    "load_image",
    "load_model",
    "save_checkpoint",
]
__version__ = "0.1.0"
