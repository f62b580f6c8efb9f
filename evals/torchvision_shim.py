"""Import the PyPI torchvision wheel beside a torch it was not built for, for its pure-Python transforms only.

The official Q-Zoom code runs transformers' torchvision-backend image processor (`AutoProcessor(..., use_fast=True)`),
and qzoom's `qzoom.images.patchify` is tested against it. On our CPU machines torch is the 2.13.0 CPU wheel, while
every torchvision on PyPI that imports without help is built for another torch (0.29.1 for 2.14, CUDA build).
Installed without its dependencies (`pip install --no-deps --target DIR torchvision==0.29.1`), its compiled
extension `_C_stable.so` fails to load, which torchvision tolerates, but then `torchvision/_meta_registrations.py`
registers fake kernels for `torchvision::nms` and `torchvision::qnms` at import time and fails because those
operators do not exist ("operator torchvision::nms does not exist").

`install()` defines the two operator schemas (exactly as torchvision's C++ library declares them) in a
`torch.library.Library("torchvision", "DEF")` before torchvision is imported, so its import completes. Nothing else is
changed: the transforms the processor uses (`resize`, `normalize`, `pil_to_tensor`, ...) are Python over torch ops,
and torchvision's ops that need the compiled kernels (nms, roi_align, ...) still raise if called. Only tests and the
fixture generator use this; the qzoom runtime never imports torchvision.

Works standalone (torch only), so a second environment can load it by file path.
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Any

# torchvision's own schema strings (torchvision/csrc/ops/nms.cpp): the only operators its import touches without
# checking that the compiled library loaded.
SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)

_LIBRARY: Any = None  # kept alive: a Library's definitions go away with it


def install() -> bool:
    """Define the torchvision operator schemas torchvision's import needs, unless they exist. True if defined now."""
    global _LIBRARY
    import torch

    if _LIBRARY is not None or hasattr(torch.ops.torchvision, "nms"):
        return False
    library = torch.library.Library("torchvision", "DEF")
    for schema in SCHEMAS:
        library.define(schema)
    _LIBRARY = library
    return True


def import_torchvision(path: str | None = None) -> Any:
    """`torchvision`, imported through the shim; `path` (a `pip install --target` directory) is put first on
    sys.path. Raises ImportError when no torchvision is found there or installed."""
    if path is not None and path not in sys.path:
        sys.path.insert(0, path)
    if importlib.util.find_spec("torchvision") is None:
        raise ImportError(f"torchvision is not installed{f' in {path}' if path else ''}")
    if "torchvision" not in sys.modules:
        import torch

        # A torchvision whose extension loads defines the operators itself; defining them first would clash.
        try:
            spec = importlib.util.find_spec("torchvision")
            origin = spec.submodule_search_locations[0] if spec and spec.submodule_search_locations else None
            if origin is not None:
                torch.ops.load_library(f"{origin}/_C_stable.so")
        except (OSError, RuntimeError):
            install()
    import torchvision

    return torchvision
