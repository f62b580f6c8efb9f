"""``qzoom bench paper-scale``: Q-Zoom's speed at the paper's scale, on the real Qwen2.5-VL-7B architecture.

The model has Qwen2.5-VL-7B's real configuration (28 decoder layers of width 3584, 28 query / 4 KV heads of 128, MLP
18944, vocabulary 152064, M-RoPE sections 16/24/24; the 32-block, 1280-wide windowed vision tower with full attention
in blocks 7/15/23/31) and the paper's Q-Zoom branches (SD-RPN after K = 18, T = 3; the gate), with random weights:
timing does not depend on the weights, so the gate and the box are forced to typical values instead of read from
the model (a zoom on a centred box covering ``box_frac`` of each side; every answer exactly ``new_tokens`` long).
Measured side by side in one run, runs alternating, the device synchronised around each timer:

1. throughput at batch 1 and 8 (requests per engine call) of the no-zoom baseline at 4096 tokens against Q-Zoom
   that zooms at 576 and 1024 tokens (the paper's headline pairs: 4.39x on HR at 576, 2.52x on Doc/OCR at 1024) and
   against Q-Zoom whose gate stays closed at 576; plus the throughput to expect when the gate fires on a share
   ``gate_rate`` of the questions;
2. the gate-closed pipeline vs stock ``generate`` at 576 tokens (``bench_engine.gate_closed_vs_stock``);
3. the zoom step's second prefill with KV reuse vs a full recompute (``bench_engine.kv_reuse_vs_recompute``).

``--device cuda --dtype bfloat16`` on a GPU (the defaults there); ``--small`` swaps in a small model of the same
family with the same vocabulary, so that the code path runs on a CPU in CI in seconds. The full run is sized to stay
under 8 minutes on one H100.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image, ImageDraw

from qzoom import roi
from qzoom.engine import QZoomEngine, SequenceState
from qzoom.evals.bench_engine import alternate, environment, gate_closed_vs_stock, kv_reuse_vs_recompute, sync
from qzoom.modeling import QZoomQwen2_5_VLForConditionalGeneration, enable_qzoom
from qzoom.offline import build_processor, build_tokenizer, tiny_qwen25vl_config
from qzoom.schemas import PIXELS_PER_TOKEN, AskOptions

QWEN25_VOCAB = 152064


@dataclass(frozen=True)
class Shape:
    """The text and vision sizes of the benchmark's model and its Q-Zoom split."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    mlp: int
    vision_hidden: int
    vision_depth: int
    vision_heads: int
    vision_mlp: int
    full_attention: tuple[int, ...]
    split: int  # K

    @property
    def name(self) -> str:
        text = f"L={self.layers} K={self.split} d={self.hidden} heads={self.heads}/{self.kv_heads}"
        return f"{text}, ViT {self.vision_depth}x{self.vision_hidden}"


QWEN25_7B = Shape(3584, 28, 28, 4, 18944, 1280, 32, 16, 3420, (7, 15, 23, 31), 18)
SMALL = Shape(128, 8, 4, 2, 256, 64, 4, 2, 128, (3,), 4)
PAPER_BASELINE_TOKENS = 4096
PAPER_QZOOM_TOKENS = (576, 1024)


def paper_config(shape: Shape) -> Any:
    """The Qwen2.5-VL config of ``shape`` with the Q-Zoom fields (SD-RPN after K, T = 3; the gate)."""
    config = tiny_qwen25vl_config(
        build_tokenizer(),
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        intermediate_size=shape.mlp,
        vision_hidden_size=shape.vision_hidden,
        vision_depth=shape.vision_depth,
        vision_heads=shape.vision_heads,
        vocab_size=QWEN25_VOCAB,
    )
    vision: Any = config.vision_config
    vision.intermediate_size = shape.vision_mlp
    vision.fullatt_block_indexes = list(shape.full_attention)
    return enable_qzoom(config, twig_K=shape.split, twig_T=3)


def build_paper_model(shape: Shape, device: str | torch.device, dtype: torch.dtype, seed: int = 0) -> QZoomEngine:
    """A Qwen2.5-VL of ``shape`` with random weights, built directly on ``device`` in ``dtype``."""
    config = paper_config(shape)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):  # no float32 copy on the host first: 7B weights straight into device memory
            model = QZoomQwen2_5_VLForConditionalGeneration(config).eval()
            model.init_branches_from_backbone()
    finally:
        torch.set_default_dtype(previous)
    engine = QZoomEngine(model, build_processor(build_tokenizer()), name=f"random Qwen2.5-VL ({shape.name})")
    # Random weights: every answer runs to new_tokens, the same work in every variant and in stock `generate`.
    engine.stop_ids = set()
    model.generation_config.eos_token_id = None
    return engine


def paper_image(width: int = 3024, height: int = 2268) -> Image.Image:
    """A picture larger than every budget (6.9 M px > 4096 x 28^2), so each view is resized to its budget."""
    image = Image.new("RGB", (width, height), (205, 200, 190))
    draw = ImageDraw.Draw(image)
    for i in range(40):
        x, y = (i * 613) % (width - 200), (i * 389) % (height - 120)
        draw.rectangle((x, y, x + 180, y + 100), fill=((i * 40) % 256, (i * 90) % 256, (i * 150) % 256))
        draw.text((x + 10, y + 40), f"K{i:02d}", fill=(0, 0, 0))
    return image


def _run_zoomed(engine: QZoomEngine, states: list[SequenceState], box_frac: float) -> None:
    """The Q-Zoom pipeline with the gate forced open and the box forced to a centred ``box_frac`` of each side."""
    engine.prepare(states)
    engine.encode(states)
    engine.prefill(states)
    engine.gate(states)  # evaluated (its cost is part of the path), its decision overridden
    proposals = []
    for st in states:
        h, w = st.blocks[0].grid_hw
        bw, bh = max(1, round(w * box_frac)), max(1, round(h * box_frac))
        x0, y0 = (w - bw) // 2, (h - bh) // 2
        proposals.append(engine.proposal_from_grid_boxes(st, [roi.GridBox(x0, y0, x0 + bw, y0 + bh)]))
    engine.zoom(states, proposals)
    engine.finish(states)
    engine.decode(states)


def _variant(
    engine: QZoomEngine, image: Image.Image, batch: int, tokens: int, mode: str, new_tokens: int, box_frac: float
) -> Callable[[], Any]:
    from qzoom.agent.zoom import run

    low = min(tokens, 256 if mode != "baseline" else tokens)  # Q-Zoom's views: 256 .. N tokens (RoI too)
    opts = AskOptions(
        max_pixels=tokens * PIXELS_PER_TOKEN,
        min_pixels=low * PIXELS_PER_TOKEN,
        max_new_tokens=new_tokens,
        force_zoom=False if mode == "baseline" else None,
        gate_thresh=1.0 if mode == "closed" else None,
    )
    query = "What is written on the label in the middle?"

    def go() -> None:
        states = [engine.new_state(image, query, opts) for _ in range(batch)]
        if mode == "zoom":
            _run_zoomed(engine, states, box_frac)
        else:
            run(engine, states, max_batch=batch)

    return go


@torch.no_grad()  # the whole benchmark, not the process: tests run after it
def run_paper_scale(
    *,
    small: bool = False,
    device: str | None = None,
    dtype: str | None = None,
    batches: tuple[int, ...] = (1, 8),
    repeats: int = 3,
    new_tokens: int = 16,
    box_frac: float = 0.5,
    gate_rate: float = 0.6,
    echo: Callable[[str], Any] = print,
) -> dict[str, float]:
    """Run the three measurements of the module docstring; returns the ratios by name."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dt = getattr(torch, dtype, None) if dtype else (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise ValueError(f"--dtype {dtype!r} is not a floating-point torch dtype (float32, bfloat16, float16)")
    shape = SMALL if small else QWEN25_7B
    started = time.perf_counter()
    engine = build_paper_model(shape, dev, dt)
    sync(dev)
    echo(
        f"model: {engine.name}, vocabulary {QWEN25_VOCAB}, random weights; "
        f"built in {time.perf_counter() - started:.0f} s"
    )
    echo(environment(engine))
    # --small keeps the whole run to seconds on a CPU: views of a quarter of the paper's budgets.
    scale = 16 if small else 1
    base_tokens = PAPER_BASELINE_TOKENS // scale
    qz_tokens = tuple(t // scale for t in PAPER_QZOOM_TOKENS)
    image = paper_image(1008, 756) if small else paper_image()
    results: dict[str, float] = {}

    echo(f"\n1. throughput, answers of {new_tokens} tokens, zoom box {box_frac:g} of each side, {repeats} runs each")
    for batch in batches:
        variants = {
            f"baseline@{base_tokens}": _variant(engine, image, batch, base_tokens, "baseline", new_tokens, box_frac)
        }
        for t in qz_tokens:
            variants[f"qzoom@{t} zoomed"] = _variant(engine, image, batch, t, "zoom", new_tokens, box_frac)
        variants[f"qzoom@{qz_tokens[0]} gate closed"] = _variant(
            engine, image, batch, qz_tokens[0], "closed", new_tokens, box_frac
        )
        for fn in variants.values():
            fn()  # warm-up: allocator, kernels, every path once
        ms = alternate(variants, repeats, dev)
        base_ms = ms[f"baseline@{base_tokens}"]
        echo(f"   batch {batch}")
        for name, value in ms.items():
            sps = batch / (value / 1000)
            ratio = base_ms / value
            echo(f"     {name:24s} {value:10.1f} ms/batch  {sps:8.2f} samples/s  {ratio:6.2f}x the baseline's")
            results[f"b{batch}_{name}"] = ratio
        closed = ms[f"qzoom@{qz_tokens[0]} gate closed"]
        zoomed = ms[f"qzoom@{qz_tokens[0]} zoomed"]
        blended = gate_rate * zoomed + (1 - gate_rate) * closed
        echo(f"     qzoom@{qz_tokens[0]}, gate fires on {gate_rate:.0%}: {base_ms / blended:6.2f}x the baseline's")
        results[f"b{batch}_qzoom@{qz_tokens[0]}_gate{gate_rate:g}"] = base_ms / blended

    echo(f"\n2. gate-closed path vs stock generate at {qz_tokens[0]} tokens (batch 1)")
    gate, same = gate_closed_vs_stock(engine, image, qz_tokens[0], repeats, new_tokens)
    echo(
        f"   qzoom gate-closed {gate['ours']:9.1f} ms; stock generate {gate['stock']:9.1f} ms; "
        f"ratio {gate['ours'] / gate['stock']:.3f}x; same tokens: {'yes' if same else 'no (float noise)'}"
    )
    results["gate_closed_vs_stock"] = gate["ours"] / gate["stock"]

    echo(f"\n3. second prefill with KV reuse vs recompute at {qz_tokens[0]} tokens")
    kv = kv_reuse_vs_recompute(engine, image, qz_tokens[0], repeats)
    echo(
        f"   {kv['total']} tokens, {kv['total'] - kv['prefix']} after the kept prefix: reuse {kv['reuse']:.1f} ms, "
        f"recompute {kv['recompute']:.1f} ms, ratio {kv['reuse'] / kv['recompute']:.3f}x"
    )
    results["kv_reuse_vs_recompute"] = kv["reuse"] / kv["recompute"]
    echo(f"\ntotal {time.perf_counter() - started:.0f} s")
    return results
