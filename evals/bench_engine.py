"""Engine benchmark: two ratios measured side by side in one run, on a random model shaped like Qwen2.5-VL-7B.

1. Gate-closed path vs stock `generate`: the same image, question, budget and weights; ours runs the whole Q-Zoom
   pipeline with the gate evaluated and closed (preprocess, ViT, layers < K, gate, layers >= K, decode), stock runs
   the processor and `Qwen2_5_VLForConditionalGeneration.generate`. Target: at most 1.10x.
2. The zoom step's second prefill with KV reuse (layers < K on the new tail only, layers >= K over the fused sequence)
   vs a full recompute of the fused sequence through all layers, with K/L as in the 7B model (18/28).

Runs alternate between the variants (A, B, A, B, ...) so that load on the machine hits both alike; medians reported;
the device is synchronised around each run and the output names device, dtype, threads and machine load.
`gate_closed_vs_stock` and `kv_reuse_vs_recompute` take any engine (`qzoom bench paper-scale` runs them at 7B size).
`qzoom bench engine --help` lists the knobs; the defaults take about a minute on 2 CPU cores.
"""

from __future__ import annotations

import os
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


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that a timer read after it measures the work (CUDA is asynchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def environment(engine: QZoomEngine) -> str:
    """One line naming where a benchmark ran: device (GPU name), dtype, torch threads, CPUs and the load average."""
    device = engine.device
    where = f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device)
    load = f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "n/a"
    dtype = str(engine.dtype).removeprefix("torch.")
    return (
        f"device {where}; dtype {dtype}; torch threads {torch.get_num_threads()} of {os.cpu_count()} CPUs; load {load}"
    )


def alternate(variants: dict[str, Callable[[], Any]], repeats: int, device: torch.device) -> dict[str, float]:
    """Median milliseconds of each variant over ``repeats`` runs, taken in turn (A, B, A, B, ...) so that load on
    the machine hits all alike; the device is synchronised around every run."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: _median_ms(t) for name, t in times.items()}


def gate_closed_vs_stock(
    engine: QZoomEngine, image: Image.Image, tokens: int, repeats: int, new_tokens: int
) -> tuple[dict[str, float], bool]:
    """Median ms of the whole pipeline with the gate evaluated and closed vs the processor + stock `generate` on the
    same image, budget and weights; and whether both produced the same tokens (also the warm-up)."""
    model, processor = engine.model, engine.processor
    query = "What is written in the blue box?"
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
        ).to(engine.device)
        out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
        return [t for t in out[0, inputs["input_ids"].shape[1] :].tolist() if t not in engine.stop_ids]

    same = ours() == stock()
    return alternate({"ours": ours, "stock": stock}, repeats, engine.device), same


def kv_reuse_vs_recompute(engine: QZoomEngine, image: Image.Image, tokens: int, repeats: int) -> dict[str, Any]:
    """The zoom step's second prefill with KV reuse (layers < K on the new tail only, layers >= K over the fused
    sequence) vs a full recompute of the fused sequence through all layers: median ms of each, sequence sizes."""
    budget = tokens * 28 * 28
    query = "What is written in the blue box?"
    st = engine.new_state(
        image, query, AskOptions(force_zoom=True, roi_thresh=0.0, min_pixels=budget, max_pixels=budget)
    )
    engine.prepare([st])
    engine.encode([st])
    engine.prefill([st])
    engine.zoom([st], engine.propose([st]))
    split, model = engine.split, engine.model
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
    ms = alternate({"reuse": reuse, "recompute": recompute}, repeats, engine.device)
    return {**ms, "total": st.input_ids.numel(), "prefix": prefix, "global": st.blocks[0].num_tokens}


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
    image = bench_image()
    gate, same = gate_closed_vs_stock(engine, image, tokens, repeats, new_tokens)
    assert same, "gate-closed tokens differ from stock generate"
    gate_ratio = gate["ours"] / gate["stock"]
    kv = kv_reuse_vs_recompute(engine, image, tokens, repeats)
    reuse_ratio = kv["reuse"] / kv["recompute"]
    n_total, prefix = kv["total"], kv["prefix"]
    echo(f"model: random Qwen2.5-VL, L={layers} K={split} hidden={hidden}; {tokens}-token views; {repeats} runs each")
    echo(environment(engine))
    echo("")
    echo("1. gate-closed path vs stock generate (same image, budget, weights; identical tokens)")
    echo(f"   qzoom gate-closed  {gate['ours']:9.1f} ms")
    echo(f"   stock generate     {gate['stock']:9.1f} ms")
    echo(f"   ratio              {gate_ratio:9.3f}x   (target <= 1.10x)")
    echo("")
    echo(f"2. second prefill of the fused sequence ({n_total} tokens, {n_total - prefix} after the kept prefix)")
    echo(f"   KV reuse           {kv['reuse']:9.1f} ms")
    echo(f"   full recompute     {kv['recompute']:9.1f} ms")
    echo(
        f"   ratio              {reuse_ratio:9.3f}x   (saving {(1 - reuse_ratio) * 100:.0f}%; "
        f"ideal {(split * (n_total - prefix) + (layers - split) * n_total) / (layers * n_total):.3f}x by token-layers)"
    )
    echo(f"   global view tokens: {kv['global']}")
    return {
        "gate_closed_ms": gate["ours"],
        "stock_generate_ms": gate["stock"],
        "gate_closed_ratio": gate_ratio,
        "kv_reuse_ms": kv["reuse"],
        "recompute_ms": kv["recompute"],
        "kv_reuse_ratio": reuse_ratio,
    }
