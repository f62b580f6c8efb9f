"""`qzoom train demo`: the demo checkpoint `qzoom-tiny`, trained from scratch on CPU.

Contract of :func:`train_demo`: from nothing but this package (no hub, no files), in order, each step writing an HF
checkpoint directory under ``work_dir``:

1. ``base``: :func:`qzoom.demo.base.train_base`, the Qwen2.5-VL backbone from scratch on the synthetic benchmark's
   train split with the crop-first curriculum.
2. ``stage1``: :func:`qzoom.train.stage1.train_stage1`, the SD-RPN distilled from the base model's own
   answer->image attention on the coarse view (heads picked on calibration items with boxes).
3. ``stage2``: :func:`qzoom.train.stage2.train_stage2`, targeted post-SFT on the samples that zooming regressed.
4. ``stage3``: :func:`qzoom.train.stage3.train_stage3`, the gate, on labels of whether the coarse answer at a low
   budget is right (``signal="prediction_vs_gt"``; see :class:`DemoRecipe` for why not the consistency filter), its
   threshold chosen on calibration items it did not train on.

The last checkpoint is copied to ``out``; the box settings of :class:`DemoRecipe` (``box_mode``, ``max_boxes``,
``roi_peak_frac``, ``multi_box``; τ_roi stays the paper's 0.1) are written into that copy's ``config.json`` (they
change no weight, only how the SD-RPN's map becomes boxes and how several boxes are answered), and a
``training.json`` (recipe, item ranges, seconds per step) beside it. Every step is seeded, the stages are resumable
(rerunning continues where it stopped). All items come from the train split; ``qzoom eval demo`` measures on the
test split.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from qzoom.demo.base import train_base
from qzoom.demo.model import BaseRecipe
from qzoom.roi import BoxMode
from qzoom.schemas import MultiBox
from qzoom.train.common import SyntheticItems, update_config
from qzoom.train.stage1 import Stage1Config, train_stage1
from qzoom.train.stage2 import Stage2Config, synthetic_judge, train_stage2
from qzoom.train.stage3 import Stage3Config, train_stage3

# Disjoint index ranges of the train split (the base model's own pools start at 0 and 10,000,000).
STAGE1_START = 30_000_000
CALIBRATION_START = 31_000_000
STAGE2_START = 32_000_000
STAGE3_START = 33_000_000
GATE_CALIBRATION_START = 34_000_000


class DemoRecipe(BaseModel):
    """The whole recipe of the shipped checkpoint; its defaults are what ``qzoom train demo`` runs."""

    model_config = ConfigDict(extra="forbid")

    seed: int = 0
    threads: int = Field(2, ge=1, description="torch CPU threads")
    stage1_items: int = Field(320, ge=2)
    calibration_items: int = Field(40, ge=2)
    # A tiny model's attention is flatter than a 7B's: a lower peak still marks the target (the paper's Stage-1
    # default is 5e-3).
    stage1: Stage1Config = Field(
        default_factory=lambda: Stage1Config(lr=1e-3, batch_size=8, epochs=2.0, min_peak=1e-3, max_box_frac=0.6)
    )
    stage2_items: int = Field(210, ge=1)
    stage2: Stage2Config = Field(default_factory=lambda: Stage2Config(lr=5e-5, batch_size=8, epochs=1.0))
    stage3_items: int = Field(400, ge=1)
    # The gate's labels: the answer at a budget below the ladder's top two against GT (the reference's
    # prediction_vs_gt strategy) on every ladder, rather than the paper's consistency filter. Why: this model never
    # sees views above 256 tokens in training, so its 576- and 1024-token answers disagree on 9 ladders in 10 and the
    # filter kept 9 of 280 (gate fired on every question); with these labels on 600 ladders the gate skips half of
    # the questions the coarse view gets right and fires on 96% of the detail ones it gets wrong (README "The demo
    # model"). Canvases at the benchmark's sizes, so the labels describe the views the gate decides on; the gate's
    # probability is then P(the coarse answer is wrong). The threshold it is read at is chosen after training rather
    # than fixed at even odds: count questions score around 0.5 and moved the skip rate between 64% and 71% from one
    # run to the next at 0.5. It is chosen on items the gate did not train on: at the threshold Youden's J picks on its
    # own 400 training items (0.852) the gate fired on 91% of their detail questions that it should, on 85% of 300 new
    # ones and on 86.5% on the card (docs/demo_model.md, r5). And by a recall target, not Youden's J: J trades the two
    # error rates as equals, so the fire rate moved with each run's score distribution (r10: 0.706, firing on 98% of
    # the detail questions the coarse view misses; r11: 0.910, 71.5%, under the bound of 90%), while the highest
    # threshold that fires on 90% of the calibration items' wrong coarse answers holds it (r11: 0.687 on val items,
    # 95.7%, skipping 79.5% of what the coarse view answers; r12, shipped: 0.710, 95.7% and 80.4% on the card;
    # docs/demo_model.md, "Session of 2026-12-04 (fifth)"). The recall holds the fire rate, not the skip rate: r12b,
    # r12's recipe rerun, put it at 0.606 (FPR 0.35 on calibration) and skipped 66.7% on the card. So the rule also
    # bounds the share of right coarse answers fired on at 0.3 (the skip bound of 70%), and where the two bounds
    # conflict it takes the threshold that misses them least (`recall_threshold`; r12's 0.710 at FPR 0.18 is
    # unchanged by it, and r14, shipped, chose 0.625 at FPR 0.23 with it; docs/demo_model.md, "Session of 2026-12-04
    # (seventh)").
    stage3_max_side: int = Field(4096, ge=896)
    gate_calibration_items: int = Field(300, ge=2)
    # The boxes: the two heaviest connected components of the cells above τ_roi that also reach half the map's peak,
    # instead of the paper's one box around every cell above τ_roi. Why: the map lights the named plate and a
    # look-alike or two; the paper's box spans them all (r10: median 13% of the image), and its crop shrinks the plate
    # again at the same budget. Chosen on val items through the gated pipeline, all question kinds (240 items, r10's
    # weights): the paper's box 45.8% right, the heaviest component 50.0%, the heaviest above 0.5 of the peak 55.4%,
    # the two heaviest above 0.5 52.1%. One box reads more but, with zoom forced on 160 val detail questions, held the
    # target's centre on 84.4% (the bound for the SD-RPN is 85%; the union 98.1%), where the look-alike's blob
    # outweighs the named one's; two boxes held it on 92.5%. So two, which keeps every target the paper's box met
    # (docs/demo_model.md, "Session of 2026-12-04 (fourth)").
    box_mode: BoxMode = "components"
    max_boxes: int = Field(2, ge=1, le=8)
    roi_peak_frac: float = Field(0.5, ge=0.0, le=1.0)
    # And the two boxes answered one at a time, keeping the more confident answer (`multi_box` "best"), instead of
    # both crops in one sequence: two crops side by side are a sequence the base never trained on, and read codes on
    # about half as often as the target's crop alone. r14's weights, 480 val items through the gated pipeline: 61.7%
    # -> 65.8% right, detail 54.7% -> 60.5% (`code_at` 8.7% -> 27.5%), the same throughput (docs/demo_model.md,
    # "Session of 2026-12-04 (eighth)").
    multi_box: MultiBox = "best"
    stage3: Stage3Config = Field(
        default_factory=lambda: Stage3Config(
            lr=1e-3,
            batch_size=8,
            epochs=3.0,
            ladder=[64, 128, 256, 576, 1024],
            signal="prediction_vs_gt",
            pool="all",
            high_res_thresh="recall",
            gate_recall=0.9,
            gate_max_fpr=0.3,
        )
    )


def train_demo(
    out: str | Path,
    *,
    work_dir: str | Path | None = None,
    recipe: DemoRecipe | None = None,
    base: BaseRecipe | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> Path:
    """Train the demo model from scratch into ``out`` (see the module docstring); returns ``out``."""
    recipe = recipe or DemoRecipe()
    base = base or BaseRecipe(seed=recipe.seed)
    out = Path(out)
    work = Path(work_dir) if work_dir is not None else out.with_name(out.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(recipe.threads)
    seconds: dict[str, float] = {}

    def timed(name: str, fn: Callable[[], Path]) -> Path:
        start = time.perf_counter()
        path = fn()
        seconds[name] = round(time.perf_counter() - start, 1)
        log(f"demo: {name} done in {seconds[name]:.0f} s -> {path}")
        return path

    base_dir = work / "base"
    if (base_dir / "config.json").exists():
        log(f"demo: reusing the base model in {base_dir}")
    else:
        timed("base", lambda: train_base(base_dir, base, progress=progress, log=log, check_items=48))

    def config(stage: Any) -> Any:
        return stage.model_copy(update={"seed": recipe.seed, "progress": progress})

    seed = recipe.seed
    items1 = SyntheticItems(recipe.stage1_items, split="train", seed=seed, start=STAGE1_START)
    calibration = SyntheticItems(recipe.calibration_items, split="train", seed=seed, start=CALIBRATION_START)
    stage1 = timed(
        "stage1",
        lambda: train_stage1(base_dir, items1, work / "stage1", config(recipe.stage1), calibration=calibration),
    )
    items2 = SyntheticItems(recipe.stage2_items, split="train", seed=seed, start=STAGE2_START)
    stage2 = timed(
        "stage2", lambda: train_stage2(stage1, items2, work / "stage2", config(recipe.stage2), judge=synthetic_judge)
    )
    items3 = SyntheticItems(
        recipe.stage3_items, split="train", seed=seed, start=STAGE3_START, max_side=recipe.stage3_max_side
    )
    calibration3 = SyntheticItems(
        recipe.gate_calibration_items,
        split="train",
        seed=seed,
        start=GATE_CALIBRATION_START,
        max_side=recipe.stage3_max_side,
    )
    last = timed(
        "stage3",
        lambda: train_stage3(stage2, items3, work / "stage3", config(recipe.stage3), calibration=calibration3),
    )

    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(last, out, ignore=shutil.ignore_patterns("trainer"))
    boxes = {
        "box_mode": recipe.box_mode,
        "max_boxes": recipe.max_boxes,
        "roi_peak_frac": recipe.roi_peak_frac,
        "multi_box": recipe.multi_box,
    }
    update_config(out, boxes, {"stage": "demo_boxes", "source": "DemoRecipe (chosen on val items)", **boxes})
    info: dict[str, Any] = {
        "command": "qzoom train demo",
        "seconds": seconds,
        "threads": recipe.threads,
        "recipe": recipe.model_dump(mode="json"),
        "base_recipe": asdict(base),
    }
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    return out
