"""How much of each detail the vision tower's tokens show: a linear probe of the merged image features.

Contract of :func:`probe_tower` (``qzoom eval tower-probe``): on detail items of the synthetic benchmark, the merged
token at the centre of each glyph, shape or pattern (found from the crop's own ink by
:func:`qzoom.demo.examples.reading_targets`) is labelled with what it shows, its feature is taken from the checkpoint's
vision tower, and a linear classifier (:func:`fit_linear_probe`) is fitted on the tokens of ``train_items`` items of the
*train* split and scored on those of ``val_items`` items of the *val* split. Two kinds of crop per item:

* ``native``: a crop of 168, 224 or 280 px around the detail at native scale, as the base trainer's crop phase draws.
* ``true box``: the ground-truth box's coarse cells cut from the canvas and resized to the model's budget, what
  ``gt-box@B`` of ``qzoom eval demo`` feeds the decoder.

Why: the demo recipe freezes the tower after phase 0, so what its tokens show is all the decoder can ever read. The
per-token accuracy bounds the answers: a three-glyph code is read whole at most about ``accuracy ** 3`` of the time by
any decoder that reads one token per glyph (:attr:`TowerProbe.whole_answer`). A probe fitted on a few thousand tokens is
a lower bound on what the features hold (docs/demo_model.md measured a 256-wide MLP probe within 5 points of it).
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from qzoom.demo.examples import READ_GROUPS, ExampleBuilder, pool_item
from qzoom.engine import QZoomEngine
from qzoom.evals.synthetic import (
    COARSE_TOKENS,
    CODE_FAMILIES,
    CODE_LENGTH,
    DETAIL_FAMILIES,
    FAMILIES,
    PATCH_PX,
    SyntheticItem,
    iterate,
)

CROPS = ("native", "true box")
NATIVE_SIDES = (168, 224, 280)
_CLASSES = len(READ_GROUPS[0])  # what a token shows: a code glyph or letter, a shape, a pattern


@dataclass
class TowerProbe:
    """Per crop kind and family: the probe's accuracy on held-out tokens and how many tokens it was scored on."""

    accuracy: dict[str, dict[str, float]] = field(default_factory=dict)
    tokens: dict[str, dict[str, int]] = field(default_factory=dict)
    train_tokens: dict[str, int] = field(default_factory=dict)

    def whole_answer(self, crop: str, family: str) -> float:
        """The share of answers a decoder reading each token as well as the probe would get whole (a code: every
        glyph; independent errors assumed)."""
        per_token = self.accuracy[crop][family]
        return per_token**CODE_LENGTH if family in CODE_FAMILIES else per_token


def fit_linear_probe(
    features: torch.Tensor, labels: torch.Tensor, classes: int, *, steps: int = 1500, seed: int = 0
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A softmax classifier on standardised ``features`` (N, d) for ``labels`` (N,), full-batch Adam; returns a
    function from features to predicted labels."""
    generator = torch.Generator().manual_seed(seed)
    mean, std = features.mean(0), features.std(0) + 1e-5
    weight = (torch.randn(features.shape[1], classes, generator=generator) * 0.01).requires_grad_()
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=3e-3, weight_decay=1e-4)
    x = (features - mean) / std
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(x @ weight + bias, labels).backward()
            optimizer.step()
    weight, bias = weight.detach(), bias.detach()
    return lambda z: (((z - mean) / std) @ weight + bias).argmax(-1)


@torch.no_grad()
def _tokens(
    engine: QZoomEngine, items: Iterable[SyntheticItem], rng: random.Random
) -> dict[str, tuple[torch.Tensor, torch.Tensor, list[str]]]:
    """Per crop kind: the features (N, d) of the marked tokens, their labels (N,) and their items' families."""
    # The checkpoint's own pixel budget, as `view_accuracy` reads it (the benchmark's where the checkpoint sets none).
    settings = engine.settings
    min_px, max_px = settings.min_pixels or 4 * PATCH_PX**2, settings.max_pixels or COARSE_TOKENS * PATCH_PX**2
    builder = ExampleBuilder(engine, min_px, max_px)
    found: dict[str, tuple[list[torch.Tensor], list[torch.Tensor], list[str]]] = {crop: ([], [], []) for crop in CROPS}
    for item in items:  # one at a time: a 4096 px canvas is 50 MB
        p = pool_item(item, min_px, max_px, reach=max(NATIVE_SIDES))
        example = builder.crop(p, rng.choice(NATIVE_SIDES), rng)
        # The true box: its coarse cells, cut and processed as a zoom step (and `gt-box@B`) would.
        crop, _, pixel_box, pixels, grid, _ = builder.zoom_view(p, None)
        views = {"true box": (pixels, grid, builder.zoom_reading(p, crop, pixel_box, grid, item.answer))}
        if example.reading is not None:
            views["native"] = (example.pixel_values[0], example.grids[0], example.reading)
        for kind, (view_pixels, view_grid, reading) in views.items():
            if reading is None:
                raise ValueError(f"detail item {item.uid} has no target plate")
            feats = engine.model.model.get_image_features(view_pixels, view_grid[None], return_dict=True).pooler_output
            shows = reading[:, :_CLASSES]
            marked = shows.sum(1) > 0
            xs, ys, families = found[kind]
            xs.append(feats[0][marked])
            ys.append(shows[marked].argmax(1))  # the first marked class, where two glyph centres share a token
            families.extend([item.family] * int(marked.sum()))
    return {
        kind: (
            torch.cat(xs) if xs else torch.empty(0, 0),
            torch.cat(ys) if ys else torch.empty(0, dtype=torch.long),
            fam,
        )
        for kind, (xs, ys, fam) in found.items()
    }


def probe_tower(engine: QZoomEngine, train_items: int = 1500, val_items: int = 300, *, seed: int = 0) -> TowerProbe:
    """Fit and score the probe (see the module docstring) on ``engine``'s vision tower."""
    rng = random.Random(seed)
    detail = tuple(f for f in FAMILIES if f in DETAIL_FAMILIES)  # in order: the items drawn depend on it
    train = _tokens(engine, iterate("train", train_items, seed=seed, families=detail), rng)
    val = _tokens(engine, iterate("val", val_items, seed=seed, families=detail), rng)
    report = TowerProbe()
    for crop in CROPS:
        x_train, y_train, _ = train[crop]
        x_val, y_val, families = val[crop]
        if not len(y_train) or not len(y_val):
            raise ValueError(f"no marked {crop} tokens on {train_items} train / {val_items} val items: use more items")
        hits = (fit_linear_probe(x_train, y_train, _CLASSES, seed=seed)(x_val) == y_val).tolist()
        per: dict[str, list[bool]] = defaultdict(list)
        for hit, family in zip(hits, families, strict=True):
            per[family].append(hit)
        report.accuracy[crop] = {family: sum(v) / len(v) for family, v in sorted(per.items())}
        report.tokens[crop] = {family: len(v) for family, v in sorted(per.items())}
        report.train_tokens[crop] = len(y_train)
    return report


def format_probe(report: TowerProbe) -> str:
    """A table: per crop kind and family, the probe's token accuracy and the whole answers it would allow."""
    families = sorted({family for per in report.accuracy.values() for family in per})
    lines = [f"{'crop':<9} {'':<14} " + " ".join(f"{family:>8}" for family in families)]
    for crop in CROPS:
        acc = report.accuracy[crop]
        lines.append(f"{crop:<9} {'token':<14} " + " ".join(f"{acc.get(f, float('nan')):>8.1%}" for f in families))
        whole = [report.whole_answer(crop, f) if f in acc else float("nan") for f in families]
        lines.append(f"{'':<9} {'whole answer':<14} " + " ".join(f"{w:>8.1%}" for w in whole))
        counts = report.tokens[crop]
        lines.append(f"{'':<9} {'val tokens':<14} " + " ".join(f"{counts.get(f, 0):>8}" for f in families))
    lines.append("train tokens: " + ", ".join(f"{crop} {n}" for crop, n in report.train_tokens.items()))
    return "\n".join(lines)
