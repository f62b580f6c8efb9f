"""Engine benchmark: two ratios measured side by side in one run, on a random model shaped like Qwen2.5-VL-7B.

1. Gate-closed path vs stock `generate`: the same image, question, budget and weights; ours runs the whole Q-Zoom
   pipeline with the gate evaluated and closed (preprocess, ViT, layers < K, gate, layers >= K, decode), stock runs
   the processor and `Qwen2_5_VLForConditionalGeneration.generate`. Target: at most 1.10x.
2. The zoom step's second prefill with KV reuse (layers < K on the new tail only, layers >= K over the fused sequence)
   vs a full recompute of the fused sequence through all layers, with K/L as in the 7B model (18/28).

Runs alternate between the variants (A, B, A, B, ...) so that load on the machine hits both alike; medians reported.
`qzoom bench engine --help` lists the knobs; the defaults take about a minute on 2 CPU cores.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image, ImageDraw

from qzoom.agent import run
from qzoom.cache import FeatureCache
from qzoom.engine import QZoomEngine, _run_layers
from qzoom.modeling import QZoomQwen2_5_VLForConditionalGeneration, enable_qzoom
from qzoom.offline import build_processor, build_tokenizer, tiny_qwen25vl_config
from qzoom.schemas import AskOptions


def bench_image(width: int = 1024, height: int = 768) -> Image.Image:
    image = Image.new("RGB", (width, height), (200, 205, 210))
    draw = ImageDraw.Draw(image)
    for i in range(12):
        x, y = (i * 173) % (width - 60), (i * 97) % (height - 40)
        draw.rectangle((x, y, x + 50, y + 30), fill=((i * 40) % 256, (i * 90) % 256, (i * 150) % 256))
        draw.text((x + 4, y + 10), f"A{i}", fill=(0, 0, 0))
    return image


def build_engine(layers: int, split: int, hidden: int, seed: int = 0) -> QZoomEngine:
    """Random weights; 8 query heads on 4 KV heads and a 5.3x MLP as in the 7B, a ViT about 1/3 of prefill."""
    torch.manual_seed(seed)
    tok = build_tokenizer()
    config = tiny_qwen25vl_config(
        tok,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        intermediate_size=hidden * 16 // 3,
        vision_hidden_size=hidden,
        vision_depth=4,
        vision_heads=4,
    )
    enable_qzoom(config, twig_K=split, twig_T=3)
    model = QZoomQwen2_5_VLForConditionalGeneration(config).eval()
    model.init_branches_from_backbone()
    return QZoomEngine(model, build_processor(tok), name=f"bench-{layers}L")


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000.0


@torch.no_grad()  # the whole benchmark, not the process: tests run after it
def run_engine_benchmark(
    *,
    layers: int = 28,
    split: int = 18,
    hidden: int = 256,
    tokens: int = 576,
    repeats: int = 5,
    new_tokens: int = 8,
    echo: Callable[[str], Any] = print,
) -> dict[str, float]:
    engine = build_engine(layers, split, hidden)
    model, processor = engine.model, engine.processor
    image, query = bench_image(), "What is written in the blue box?"
    budget = tokens * 28 * 28
    closed = AskOptions(gate_thresh=1.0, max_new_tokens=new_tokens, min_pixels=budget, max_pixels=budget)

    def ours() -> list[int]:
        engine.cache = FeatureCache.from_url(None)  # every run cold: the comparison is per request, not follow-ups
        st = engine.new_state(image, query, closed)
        run(engine, [st])
        return st.answer_ids

    def stock() -> list[int]:
        inputs = processor(
            text=[engine.prompt_text(query)],
            images=[image],
            images_kwargs={"size": {"shortest_edge": budget, "longest_edge": budget}},
            return_tensors="pt",
        )
        out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
        return [t for t in out[0, inputs["input_ids"].shape[1] :].tolist() if t not in engine.stop_ids]

    assert ours() == stock(), "gate-closed tokens differ from stock generate"  # also the warm-up
    t_ours: list[float] = []
    t_stock: list[float] = []
    for _ in range(repeats):
        for fn, sink in ((ours, t_ours), (stock, t_stock)):
            start = time.perf_counter()
            fn()
            sink.append(time.perf_counter() - start)
    gate_ratio = _median_ms(t_ours) / _median_ms(t_stock)

    # Second prefill: KV reuse vs full recompute on one fused (global + RoI) sequence.
    st = engine.new_state(
        image, query, AskOptions(force_zoom=True, roi_thresh=0.0, min_pixels=budget, max_pixels=budget)
    )
    engine.prepare([st])
    engine.encode([st])
    engine.prefill([st])
    engine.zoom([st], engine.propose([st]))
    prefix = st.blocks[0].end
    tail, tail_pos = st.embeds[prefix:], st.positions[:, prefix:]
    past = [(k[:, :prefix], v[:, :prefix]) for k, v in st.kv_below_k]
    rope, impl, lm = engine.lm.rotary_emb, engine.attn_impl, engine.lm

    def reuse() -> None:
        (h_tail,), _ = _run_layers(engine.layers[:split], rope, impl, [tail], [tail_pos], [past], keep_cache=True)
        hidden_k = torch.cat([st.hidden_k[:prefix], h_tail])
        (h,), _ = _run_layers(engine.layers[split:], rope, impl, [hidden_k], [st.positions], keep_cache=True)
        model.lm_head(lm.norm(h[-1:]))

    def recompute() -> None:
        (h,), _ = _run_layers(engine.layers, rope, impl, [st.embeds], [st.positions], keep_cache=True)
        model.lm_head(lm.norm(h[-1:]))

    reuse()
    recompute()
    t_reuse: list[float] = []
    t_full: list[float] = []
    for _ in range(repeats):
        for fn2, sink in ((reuse, t_reuse), (recompute, t_full)):
            start = time.perf_counter()
            fn2()
            sink.append(time.perf_counter() - start)
    reuse_ratio = _median_ms(t_reuse) / _median_ms(t_full)

    n_global, n_total = st.blocks[0].num_tokens, st.input_ids.numel()
    echo(f"model: random Qwen2.5-VL, L={layers} K={split} hidden={hidden}; {tokens}-token views; {repeats} runs each")
    echo(f"threads: {torch.get_num_threads()}; device: {engine.device}")
    echo("")
    echo("1. gate-closed path vs stock generate (same image, budget, weights; identical tokens)")
    echo(f"   qzoom gate-closed  {_median_ms(t_ours):9.1f} ms")
    echo(f"   stock generate     {_median_ms(t_stock):9.1f} ms")
    echo(f"   ratio              {gate_ratio:9.3f}x   (target <= 1.10x)")
    echo("")
    echo(f"2. second prefill of the fused sequence ({n_total} tokens, {n_total - prefix} after the kept prefix)")
    echo(f"   KV reuse           {_median_ms(t_reuse):9.1f} ms")
    echo(f"   full recompute     {_median_ms(t_full):9.1f} ms")
    echo(
        f"   ratio              {reuse_ratio:9.3f}x   (saving {(1 - reuse_ratio) * 100:.0f}%; "
        f"ideal {(split * (n_total - prefix) + (layers - split) * n_total) / (layers * n_total):.3f}x by token-layers)"
    )
    echo(f"   global view tokens: {n_global}")
    return {
        "gate_closed_ms": _median_ms(t_ours),
        "stock_generate_ms": _median_ms(t_stock),
        "gate_closed_ratio": gate_ratio,
        "kv_reuse_ms": _median_ms(t_reuse),
        "recompute_ms": _median_ms(t_full),
        "kv_reuse_ratio": reuse_ratio,
    }
