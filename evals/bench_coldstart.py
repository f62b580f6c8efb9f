"""`qzoom bench coldstart`: how long a first `qzoom ask` takes from a cold process, beside a bare `import torch`.

Contract of :func:`run_coldstart_benchmark`: in one run, ``repeats`` times each, in fresh Python processes:

* ``bare torch``: ``python -c "import torch"``, wall-clock of the whole process;
* ``qzoom ask``: the console command on the demo model (or ``model``), forced to zoom, wall-clock of the whole
  process (what a user waits for);
* the split of the same work inside one process, timed in it: ``import torch``, the remaining imports the ask
  command makes (``qzoom.cli`` and what ``ask`` imports), the model and processor load, the first answer.

It prints the medians, the ask command's excess over the bare torch import (the issue-40 target: within 1.5 s), and
which modules the ask process imported that are known to be slow (``sympy``, ``torch._dynamo``, LangGraph, ...), so
that a regression names its cause. Timings on a shared machine are noisy; compare only numbers of one run.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

# Imported by the child that gives the split: the same imports, in the same order, as `qzoom ask` makes them.
_SPLIT = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
import qzoom.cli
from qzoom.images import load_image
from qzoom.agent import result, run
from qzoom.engine import QZoomEngine
from qzoom.schemas import AskOptions
from qzoom.settings import get_settings
t2 = time.perf_counter()
settings = get_settings()
engine = QZoomEngine.from_pretrained(sys.argv[1], device=settings.torch_device(), dtype=settings.torch_dtype())
t3 = time.perf_counter()
state = engine.new_state(load_image(sys.argv[2]), sys.argv[3], AskOptions(max_new_tokens=4))
run(engine, [state])
answer = result(engine, state).answer
t4 = time.perf_counter()
slow = [m for m in sys.argv[4].split(",") if m in sys.modules]
print(json.dumps({"torch": t1 - t0, "imports": t2 - t1, "load": t3 - t2, "answer": t4 - t3, "slow": slow}))
"""

# Known to cost seconds at import; none of them is needed to answer one question with the fast pixel path.
SLOW_MODULES = ("sympy", "torch._dynamo", "torch.distributed.tensor", "langgraph", "matplotlib")
QUESTION = "What letter is in the blue frame?"


def _wall(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True)
    return time.perf_counter() - start


def _image(folder: Path) -> Path:
    from qzoom.evals.synthetic import generate_item

    path = folder / "coldstart.png"
    generate_item("test", 0).image.save(path)
    return path


def run_coldstart_benchmark(model: str, repeats: int, echo: Callable[[str], None]) -> dict[str, float]:
    """Measure and print (see the module docstring); returns the medians in seconds."""
    python = sys.executable
    qzoom = str(Path(python).with_name("qzoom"))
    with tempfile.TemporaryDirectory() as tmp:
        image = str(_image(Path(tmp)))
        bare, asks, splits = [], [], []
        for _ in range(repeats):  # interleaved, so that a change in the machine's load hits both alike
            bare.append(_wall([python, "-c", "import torch"]))
            asks.append(_wall([qzoom, "ask", image, QUESTION, "--model", model, "--max-new-tokens", "4"]))
            argv = [python, "-c", _SPLIT, model, image, QUESTION, ",".join(SLOW_MODULES)]
            out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
            splits.append(json.loads(out.strip().splitlines()[-1]))
    med = {
        "bare_torch": statistics.median(bare),
        "ask": statistics.median(asks),
        **{k: statistics.median(s[k] for s in splits) for k in ("torch", "imports", "load", "answer")},
    }
    echo(f"cold start, median of {repeats} fresh processes each (seconds)")
    echo(f"  python -c 'import torch'           {med['bare_torch']:7.2f}")
    excess = med["ask"] - med["bare_torch"]
    echo(f"  qzoom ask (whole process)          {med['ask']:7.2f}   +{excess:.2f} over bare torch")
    echo("  split inside one process:")
    echo(f"    import torch                     {med['torch']:7.2f}")
    echo(f"    other imports of qzoom ask       {med['imports']:7.2f}")
    echo(f"    model + processor load           {med['load']:7.2f}")
    echo(f"    first answer                     {med['answer']:7.2f}")
    slow = sorted({m for s in splits for m in s["slow"]})
    echo(f"  slow modules imported: {', '.join(slow) or 'none'}")
    echo(f"  target: qzoom ask within 1.50 s of bare torch: {'met' if excess <= 1.5 else 'missed'}")
    return med
