"""`qzoom.images.patchify` against the Hugging Face Qwen2-VL PIL image processor it replaces.

Every comparison first asserts that the fast path is the one taken (`fast_patchify_unsupported` is None and the HF
pipeline is not called), so an equality here is the fast path's, not the fallback's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from conftest import MAX_PIXELS, MIN_PIXELS, scene
from qzoom.images import fast_patchify_unsupported, padded_to_aspect, patchify
from qzoom.models import DEMO_MODEL
from qzoom.offline import build_image_processor, load_processor

# A checkpoint written by the released Q-Zoom code: its preprocessor_config.json is the released Qwen2.5-VL one
# (top-level min_pixels/max_pixels, "Qwen2VLImageProcessor"), loaded the way the engine loads every checkpoint.
OFFICIAL_CHECKPOINT = Path(__file__).parent / "fixtures" / "official_qzoom_tiny" / "checkpoint"
QWEN_BUDGET = (56 * 56, 28 * 28 * 1280)  # the released Qwen2.5-VL preprocessor_config.json
TEST_BUDGET = (MIN_PIXELS, MAX_PIXELS)  # the tests' offline processor: small images are upsampled


def noisy(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    """A scene with per-pixel noise on top, so most of the 256 levels of each channel occur and resampling
    sees sharp edges everywhere; then converted to `mode`."""
    rng = np.random.default_rng(seed)
    base = np.asarray(scene(width, height, seed), dtype=np.int16)
    pixels = np.clip(base + rng.integers(-60, 61, base.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    if mode == "RGBA":
        alpha = Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8))
        image.putalpha(alpha)
        return image
    if mode == "LA":
        image = image.convert("L")
        image.putalpha(Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8)))
        return image
    if mode == "P+transparency":
        image = image.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
        image.info["transparency"] = 3
        return image
    if mode == "RGB+transparency":
        image.info["transparency"] = tuple(int(v) for v in pixels[0, 0])
        return image
    return image.convert(mode) if mode != "RGB" else image


IMAGES = {
    "tiny-20x30-upsampled": noisy(20, 30, 1),
    "native-56x56": noisy(56, 56, 2),
    "native-448x448": noisy(448, 448, 3),
    "300x170": noisy(300, 170, 4),
    "1000x700-downscaled": noisy(1000, 700, 5),
    "wide-4096x900": noisy(4096, 900, 6),
    "tall-90x1300": noisy(90, 1300, 7),
    "grey-L": noisy(210, 160, 8, "L"),
    "RGBA": noisy(170, 230, 9, "RGBA"),
    "LA": noisy(120, 90, 10, "LA"),
    "palette-P": noisy(240, 180, 11, "P"),
    "palette-P-transparency": noisy(240, 180, 12, "P+transparency"),
    "RGB-transparency-key": noisy(100, 140, 13, "RGB+transparency"),
    "1-bit": noisy(130, 70, 14, "1"),
    "CMYK": noisy(150, 110, 15, "CMYK"),
}


def offline_processor() -> Qwen2VLImageProcessorPil:
    return build_image_processor(MIN_PIXELS, MAX_PIXELS)


def stock_processor() -> Qwen2VLImageProcessorPil:
    """The class defaults: OpenAI-CLIP mean/std, as in the released Qwen2-VL and Qwen2.5-VL configs."""
    return Qwen2VLImageProcessorPil()


def odd_processor() -> Qwen2VLImageProcessorPil:
    """Non-default everything: patch 16, merge 3, 3 temporal slots, own mean/std/rescale, bilinear filter."""
    return Qwen2VLImageProcessorPil(
        patch_size=16,
        merge_size=3,
        temporal_patch_size=3,
        image_mean=[0.3, 0.55, 0.71],
        image_std=[0.11, 0.42, 0.23],
        rescale_factor=1 / 127.5,
        resample=Image.Resampling.BILINEAR,
    )


def scalar_lanczos_processor() -> Qwen2VLImageProcessorPil:
    """One number for mean and std (HF repeats it per channel), Lanczos, temporal_patch_size 1, merge 1."""
    return Qwen2VLImageProcessorPil(
        patch_size=10, merge_size=1, temporal_patch_size=1, image_mean=0.5, image_std=0.25, resample=1
    )


def no_normalize_processor() -> Qwen2VLImageProcessorPil:
    return Qwen2VLImageProcessorPil(do_normalize=False, resample=Image.Resampling.NEAREST)


def no_rescale_processor() -> Qwen2VLImageProcessorPil:
    return Qwen2VLImageProcessorPil(do_rescale=False, image_mean=[120.0, 110.5, 100.25], image_std=[60.0, 64.0, 70.0])


def raw_processor() -> Qwen2VLImageProcessorPil:
    return Qwen2VLImageProcessorPil(do_rescale=False, do_normalize=False, resample=Image.Resampling.BOX)


PROCESSORS = {
    "offline": offline_processor,
    "shipped-model": lambda: load_processor(DEMO_MODEL).image_processor,
    "official-checkpoint": lambda: load_processor(OFFICIAL_CHECKPOINT).image_processor,
    "stock": stock_processor,
    "odd": odd_processor,
    "scalar-lanczos": scalar_lanczos_processor,
    "no-normalize": no_normalize_processor,
    "no-rescale": no_rescale_processor,
    "raw": raw_processor,
}
BUDGETS = {"offline": [TEST_BUDGET, QWEN_BUDGET], "stock": [QWEN_BUDGET, TEST_BUDGET]}


def hf(image_processor, image: Image.Image, budget: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    out = image_processor(
        images=[image], size={"shortest_edge": budget[0], "longest_edge": budget[1]}, return_tensors="pt"
    )
    return out["pixel_values"], out["image_grid_thw"][0]


@pytest.fixture
def hf_calls(monkeypatch) -> list[int]:
    """Counts calls into the HF pipeline (its `_preprocess`); the class attribute is patched for every instance."""
    calls: list[int] = []
    original = Qwen2VLImageProcessorPil._preprocess

    def counted(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Qwen2VLImageProcessorPil, "_preprocess", counted)
    return calls


def assert_same(fast: tuple[torch.Tensor, torch.Tensor], ref: tuple[torch.Tensor, torch.Tensor]) -> None:
    assert fast[1].dtype == ref[1].dtype == torch.int64
    assert torch.equal(fast[1], ref[1]), (fast[1], ref[1])
    assert fast[0].dtype == ref[0].dtype == torch.float32
    assert fast[0].shape == ref[0].shape
    assert fast[0].is_contiguous()
    # Bit-identical: the same float operations on the same uint8 pixels, in the same order.
    assert torch.equal(fast[0], ref[0]), (fast[0] - ref[0]).abs().max()


CASES = [(proc, budget, name) for proc in PROCESSORS for budget in BUDGETS.get(proc, [QWEN_BUDGET]) for name in IMAGES]


@pytest.mark.parametrize(("proc", "budget", "name"), CASES)
def test_patchify_equals_the_hf_processor(proc, budget, name, hf_calls):
    image_processor = PROCESSORS[proc]()
    image = IMAGES[name]
    ref = hf(image_processor, image, budget)
    hf_calls.clear()
    assert fast_patchify_unsupported(image_processor, image) is None
    fast = patchify(image, image_processor, *budget)
    assert hf_calls == []  # the fast path ran, not the HF pipeline
    assert_same(fast, ref)


def test_the_cases_cover_upsampling_native_size_and_downscaling():
    ip = offline_processor()
    _, grid = patchify(IMAGES["tiny-20x30-upsampled"], ip, *TEST_BUDGET)
    assert int(grid.prod()) * 14 * 14 >= MIN_PIXELS  # upsampled to the minimum budget
    _, grid = patchify(IMAGES["native-56x56"], stock_processor(), *QWEN_BUDGET)
    assert grid.tolist() == [1, 4, 4]  # 56x56 is already on the 28-pixel grid: no resize
    _, grid = patchify(IMAGES["wide-4096x900"], ip, *TEST_BUDGET)
    assert int(grid.prod()) * 14 * 14 <= MAX_PIXELS


def test_the_patch_layout_without_hf():
    # Independent of HF: with rescale and normalize off and the image already on the 28-pixel grid (no resize), patch
    # k is pixels (patch row, patch col) of merge block (k // 4), channel-major, repeated over the temporal slots.
    image = IMAGES["native-448x448"]
    pixels, grid = patchify(image, raw_processor(), 448 * 448, 448 * 448)
    assert grid.tolist() == [1, 32, 32]
    rgb = torch.from_numpy(np.asarray(image).astype(np.float32)).permute(2, 0, 1)  # (C, H, W)
    patches = pixels.view(32 * 32, 3, 2, 14, 14)
    assert torch.equal(patches[:, :, 0], patches[:, :, 1])
    # Patch 1: top-right of the first 2x2 merge block; patch 2: its bottom-left; patch 4: the next block to the right.
    for k, (row, col) in {0: (0, 0), 1: (0, 1), 2: (1, 0), 3: (1, 1), 4: (0, 2), 16 * 4: (2, 0)}.items():
        assert torch.equal(patches[k, :, 0], rgb[:, row * 14 : row * 14 + 14, col * 14 : col * 14 + 14]), k


def test_the_engine_preprocess_equals_the_hf_processor_on_the_padded_view(engine):
    panorama = noisy(3000, 20, 21)  # aspect 150: padded to 100 before the processor sees it
    for image in (panorama, IMAGES["300x170"]):
        fast = engine._preprocess(image, MIN_PIXELS, MAX_PIXELS)
        ref = hf(engine.processor.image_processor, padded_to_aspect(image), (MIN_PIXELS, MAX_PIXELS))
        assert_same(fast, ref)
        assert torch.equal(fast[1], engine._grid(image, MIN_PIXELS, MAX_PIXELS))


class DoubledNormalize(Qwen2VLImageProcessorPil):
    """A subclass whose normalize differs: the fast path must not assume the base class's."""

    def normalize(self, image, mean, std, **kwargs):
        return super().normalize(image, mean, std, **kwargs) * 2


class NotQwen:
    """A different image processor (e.g. the torchvision backend): anything callable with the HF signature."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, images, size, return_tensors):
        self.calls += 1
        return {"pixel_values": torch.ones(4, 8), "image_grid_thw": torch.tensor([[1, 2, 2]])}


def with_attribute(name: str, value) -> Qwen2VLImageProcessorPil:
    ip = offline_processor()
    setattr(ip, name, value)
    return ip


FALLBACKS = {
    "subclass-overrides-normalize": (DoubledNormalize, "300x170", "normalize is overridden"),
    "min_pixels-attribute": (lambda: with_attribute("min_pixels", 40 * 28 * 28), "300x170", "min_pixels"),
    "do_resize-off": (lambda: with_attribute("do_resize", False), "native-448x448", "do_resize"),
    "no-rgb-conversion-of-grey": (lambda: with_attribute("do_convert_rgb", False), "grey-L", "do_convert_rgb"),
    "instance-overrides-rescale": (
        lambda: with_attribute("rescale", lambda image, scale, **kw: image * 0.0),
        "300x170",
        "rescale is overridden",
    ),
}


# HF warns that processor-level min_pixels is deprecated; that processor is the point of one case.
@pytest.mark.filterwarnings("ignore:Passing `min_pixels`:FutureWarning")
@pytest.mark.parametrize("case", FALLBACKS)
def test_unsupported_settings_fall_back_to_the_hf_call(case, hf_calls):
    make, name, reason = FALLBACKS[case]
    image_processor, image = make(), IMAGES[name]
    assert reason in (fast_patchify_unsupported(image_processor, image) or "")
    try:
        ref = hf(image_processor, image, TEST_BUDGET)
    except ValueError as err:  # HF refuses it (one grey channel against three means): so must patchify
        with pytest.raises(ValueError, match="mean must have"):
            patchify(image, image_processor, *TEST_BUDGET)
        assert "mean must have" in str(err)
        return
    hf_calls.clear()
    fast = patchify(image, image_processor, *TEST_BUDGET)
    assert hf_calls == [1]
    assert_same(fast, ref)


def test_a_fallback_result_differs_from_the_fast_path():
    # Guards the test above: the overriding subclass really computes something else than the base processor.
    image = IMAGES["300x170"]
    base = patchify(image, offline_processor(), *TEST_BUDGET)
    doubled = patchify(image, DoubledNormalize(), *TEST_BUDGET)
    assert not torch.equal(base[0], doubled[0])


def test_a_foreign_processor_is_called_as_is():
    foreign = NotQwen()
    assert "not the PIL-backend" in (fast_patchify_unsupported(foreign, IMAGES["300x170"]) or "")
    pixels, grid = patchify(IMAGES["300x170"], foreign, *TEST_BUDGET)
    assert foreign.calls == 1 and grid.tolist() == [1, 2, 2] and pixels.shape == (4, 8)


def test_errors_are_the_processors():
    ip = offline_processor()
    with pytest.raises(ValueError, match="aspect ratio must be smaller than 200"):
        patchify(Image.new("RGB", (4100, 20)), ip, *TEST_BUDGET)
    with pytest.raises(ValueError, match="shortest_edge"):
        patchify(IMAGES["300x170"], ip, 0, MAX_PIXELS)
