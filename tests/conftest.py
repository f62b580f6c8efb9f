"""Shared fixtures: a tiny seeded Q-Zoom model built in code (no hub, no network) and test images."""

from __future__ import annotations

import os

import pytest
import torch
from PIL import Image, ImageDraw

from qzoom.engine import QZoomEngine
from qzoom.modeling import QZoomQwen2_5_VLForConditionalGeneration, enable_qzoom
from qzoom.offline import build_processor, build_tokenizer, tiny_qwen25vl_config

MIN_PIXELS = 16 * 28 * 28
MAX_PIXELS = 64 * 28 * 28


def make_tiny_model(
    seed: int = 0, *, reuse_src_pos: bool = True, twig_K: int = 2, twig_T: int = 2, attn: str = "sdpa"
) -> QZoomQwen2_5_VLForConditionalGeneration:
    """A 4-layer Qwen2.5-VL with gate and SD-RPN; its RPN logits are sharpened so thresholds select sub-regions."""
    torch.manual_seed(seed)
    config = enable_qzoom(
        tiny_qwen25vl_config(build_tokenizer()), twig_K=twig_K, twig_T=twig_T, reuse_src_pos=reuse_src_pos
    )
    config._attn_implementation = attn
    config.text_config._attn_implementation = attn
    model = QZoomQwen2_5_VLForConditionalGeneration(config).eval()
    with torch.no_grad():
        last = model.model.language_model.twig_layers[-1].self_attn
        last.q_proj.weight.mul_(-40.0)
        last.k_proj.weight.mul_(40.0)
    return model


@pytest.fixture(scope="session")
def processor():
    return build_processor(build_tokenizer(), min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)


@pytest.fixture(scope="session")
def tiny_model():
    return make_tiny_model()


@pytest.fixture
def engine(tiny_model, processor) -> QZoomEngine:
    """A fresh engine (and so an empty in-process feature cache) around the shared tiny model."""
    return QZoomEngine(tiny_model, processor, name="tiny")


@pytest.fixture(scope="session")
def redis_server():
    """A private redis-server on a unix socket. Missing binary: skipped locally, a failure in CI (CI=true)."""
    from qzoom.testing import RedisServer, redis_server_binary

    if redis_server_binary() is None:
        message = "redis-server is not installed (Debian: apt-get install redis-server)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    server = RedisServer().start()
    yield server
    server.stop()


def scene(width: int, height: int, seed: int) -> Image.Image:
    """A deterministic picture: a gradient, a few coloured boxes and a small text-like pattern."""
    g = torch.Generator().manual_seed(seed)
    image = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(image)
    for y in range(0, height, 4):
        draw.rectangle((0, y, width, y + 3), fill=(y * 200 // height, 90, 255 - y * 200 // height))
    for _ in range(4):
        x0 = int(torch.randint(0, max(1, width - 40), (1,), generator=g))
        y0 = int(torch.randint(0, max(1, height - 30), (1,), generator=g))
        colour = tuple(int(c) for c in torch.randint(0, 256, (3,), generator=g))
        draw.rectangle((x0, y0, x0 + 35, y0 + 25), fill=colour)
        draw.text((x0 + 3, y0 + 8), "K7X", fill=(0, 0, 0))
    return image


@pytest.fixture(scope="session")
def images() -> list[Image.Image]:
    return [scene(640, 480, 1), scene(300, 700, 2), scene(1000, 260, 3), scene(200, 200, 4)]
