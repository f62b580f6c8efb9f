"""Checkpoints that ship inside the package, and the default model of every entry point.

``qzoom-tiny`` (:data:`DEMO_MODEL`) is the default model of ``qzoom ask``, ``qzoom serve``, ``qzoom mcp``, ``qzoom
eval demo`` and the compose CPU profile whenever no ``--model`` / ``QZOOM_MODEL`` is given: a Qwen2.5-VL-architecture
model of a few million parameters made from scratch by ``qzoom train demo``. It is package data
(``qzoom/models/qzoom-tiny/``), so a non-editable ``pip install .`` carries it when it is there. An install without
it fails with :class:`ModelNotFoundError`, whose message says how to get a model, instead of a stack trace.
"""

from __future__ import annotations

from pathlib import Path

DEMO_MODEL_NAME = "qzoom-tiny"
DEMO_MODEL: Path = Path(__file__).resolve().parent / DEMO_MODEL_NAME


class ModelNotFoundError(FileNotFoundError):
    """No checkpoint was named and the package holds no demo model (or the named one does not exist)."""


def default_model_dir() -> Path:
    """The shipped demo model's directory; :class:`ModelNotFoundError` if this install has none."""
    demo = DEMO_MODEL
    if not (demo / "config.json").is_file():
        raise ModelNotFoundError(
            f"no model given, and this install has no demo model ({demo}): pass --model DIR or set QZOOM_MODEL "
            "to a checkpoint directory (`qzoom init-tiny DIR` writes a tiny random one; `qzoom train demo DIR` "
            "trains the demo model from scratch)"
        )
    return demo


__all__ = ["DEMO_MODEL", "DEMO_MODEL_NAME", "ModelNotFoundError", "default_model_dir"]
