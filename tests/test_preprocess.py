"""`qzoom.images.patchify` / `patchify_prefit` against the processor the official Q-Zoom code runs.

The reference is transformers' torchvision-backend `Qwen2VLImageProcessor` (what `AutoProcessor(..., use_fast=True)`
loads), and for the Qwen3-VL global view qwen-vl-utils' `fetch_image` before it, computed in a separate process by
tests/preprocess_reference.py from the PyPI wheels torchvision==0.29.1 and qwen-vl-utils==0.0.14 installed with
`pip install --no-deps --target .preprocess-ref` (.ci/run does; torchvision imports beside torch 2.13 through
`qzoom.evals.torchvision_shim`). Without that directory the reference comparisons are skipped, except under CI=true,
where they fail. Every comparison first asserts that the fast path is the one taken (`fast_patchify_unsupported`
is None and the HF PIL pipeline is not called), so an equality here is the fast path's, not a fallback's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from conftest import MAX_PIXELS, MIN_PIXELS, scene
from qzoom.images import fast_patchify_unsupported, padded_to_aspect, patchify, patchify_prefit, qwen_vl_utils_resize
from qzoom.models import DEMO_MODEL
from qzoom.offline import build_image_processor, load_processor

ROOT = Path(__file__).resolve().parent.parent
REF_DIR = Path(os.environ.get("QZOOM_PREPROCESS_REF", ROOT / ".preprocess-ref"))
REF_INSTALL = f"python3 -m pip install --no-deps --target {REF_DIR} torchvision==0.29.1 qwen-vl-utils==0.0.14"
# A checkpoint written by the released Q-Zoom code: its preprocessor_config.json is the released Qwen2.5-VL one
# (top-level min_pixels/max_pixels, "Qwen2VLImageProcessor"), loaded the way the engine loads every checkpoint.
OFFICIAL_CHECKPOINT = Path(__file__).parent / "fixtures" / "official_qzoom_tiny" / "checkpoint"
QWEN_BUDGET = (56 * 56, 28 * 28 * 1280)  # the released Qwen2.5-VL preprocessor_config.json
TEST_BUDGET = (MIN_PIXELS, MAX_PIXELS)  # the tests' offline processor: small images are upsampled
QWEN3_BUDGETS = [(256 * 32 * 32, 576 * 32 * 32), (16 * 32 * 32, 64 * 32 * 32)]  # lmms-eval's Qwen3-VL default; small


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


IMAGES["panorama-padded"] = padded_to_aspect(noisy(3000, 20, 21))  # aspect 150, padded to 100 (the engine's view)


def offline_processor() -> Qwen2VLImageProcessorPil:
    return build_image_processor(MIN_PIXELS, MAX_PIXELS)


def stock_processor() -> Qwen2VLImageProcessorPil:
    """The class defaults: OpenAI-CLIP mean/std, bicubic, as in the released Qwen2-VL and Qwen2.5-VL configs."""
    return Qwen2VLImageProcessorPil()


def qwen3_processor() -> Qwen2VLImageProcessorPil:
    """Qwen3-VL's settings: patch 16, merge 2, mean and std 0.5."""
    return Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3)


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


def scalar_nearest_processor() -> Qwen2VLImageProcessorPil:
    """One number for mean and std (HF repeats it per channel), nearest, temporal_patch_size 1, merge 1."""
    return Qwen2VLImageProcessorPil(
        patch_size=10, merge_size=1, temporal_patch_size=1, image_mean=0.5, image_std=0.25, resample=0
    )


def no_normalize_processor() -> Qwen2VLImageProcessorPil:
    return Qwen2VLImageProcessorPil(do_normalize=False)


def no_rescale_processor() -> Qwen2VLImageProcessorPil:
    return Qwen2VLImageProcessorPil(do_rescale=False, image_mean=[120.0, 110.5, 100.25], image_std=[60.0, 64.0, 70.0])


def raw_processor() -> Qwen2VLImageProcessorPil:
    """Neither rescale nor normalise: HF's torchvision backend hands back the uint8 values."""
    return Qwen2VLImageProcessorPil(do_rescale=False, do_normalize=False)


PROCESSORS = {
    "offline": offline_processor,
    "shipped-model": lambda: load_processor(DEMO_MODEL).image_processor,
    "official-checkpoint": lambda: load_processor(OFFICIAL_CHECKPOINT).image_processor,
    "stock": stock_processor,
    "qwen3": qwen3_processor,
    "odd": odd_processor,
    "scalar-nearest": scalar_nearest_processor,
    "no-normalize": no_normalize_processor,
    "no-rescale": no_rescale_processor,
    "raw": raw_processor,
}
BUDGETS = {"offline": [TEST_BUDGET, QWEN_BUDGET], "stock": [QWEN_BUDGET, TEST_BUDGET], "qwen3": QWEN3_BUDGETS}
# The Qwen settings see every image; the unusual settings a sample of sizes and modes (they exercise the settings).
QWEN_SETTINGS = ("offline", "shipped-model", "official-checkpoint", "stock", "qwen3")
SAMPLE = ("tiny-20x30-upsampled", "300x170", "1000x700-downscaled", "tall-90x1300", "RGBA", "palette-P")
CASES = [
    (proc, budget, name)
    for proc in PROCESSORS
    for budget in BUDGETS.get(proc, [QWEN_BUDGET])
    for name in (IMAGES if proc in QWEN_SETTINGS else SAMPLE)
]
PREFIT_CASES = [(budget, name) for budget in QWEN3_BUDGETS for name in IMAGES]


@cache
def processor(proc: str) -> Qwen2VLImageProcessorPil:
    """One instance per setting for the module (loading a checkpoint's processor reads its tokenizer too)."""
    return PROCESSORS[proc]()


def case_id(kind: str, proc: str, budget: tuple[int, int], name: str) -> str:
    return f"{kind}-{proc}-{budget[0]}-{budget[1]}-{name}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, torch.Tensor]:
    """The torchvision-backend processor's outputs for every case, computed once in a separate process."""
    if not (REF_DIR / "torchvision").is_dir() or not (REF_DIR / "qwen_vl_utils").is_dir():
        message = f"the reference processor is not installed in {REF_DIR}; install it with: {REF_INSTALL}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    work = tmp_path_factory.mktemp("preprocess-reference")
    for proc, make in PROCESSORS.items():
        make().save_pretrained(str(work / proc))
    for name, image in IMAGES.items():
        # CMYK has no PNG form; TIFF keeps it. Both are lossless, and both sides read the same file.
        image.save(work / f"{name}.{'tiff' if image.mode == 'CMYK' else 'png'}")
    cases = [
        {
            "id": case_id("processor", p, b, n),
            "processor": p,
            "image": image_file(work, n),
            "budget": b,
            "kind": "processor",
        }
        for p, b, n in CASES
    ] + [
        {
            "id": case_id("prefit", "qwen3", b, n),
            "processor": "qwen3",
            "image": image_file(work, n),
            "budget": b,
            "kind": "prefit",
        }
        for b, n in PREFIT_CASES
    ]
    (work / "cases.json").write_text(json.dumps(cases))
    out = work / "reference.safetensors"
    script = Path(__file__).parent / "preprocess_reference.py"
    done = subprocess.run(
        [sys.executable, str(script), str(REF_DIR), str(work), str(out)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return {**load_file(str(out)), "_dir": work}  # type: ignore[dict-item]


def image_file(work: Path, name: str) -> str:
    return f"{name}.{'tiff' if IMAGES[name].mode == 'CMYK' else 'png'}"


def reloaded(reference: dict, name: str) -> Image.Image:
    image = Image.open(reference["_dir"] / image_file(reference["_dir"], name))
    image.load()
    return image


@pytest.fixture
def hf_calls(monkeypatch) -> list[int]:
    """Counts calls into the HF PIL pipeline (its `_preprocess`); the class attribute is patched for every instance."""
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
    assert fast[0].dtype == ref[0].dtype
    assert fast[0].shape == ref[0].shape
    assert fast[0].is_contiguous()
    # Bit-identical: the same resize and the same float operations on the same uint8 pixels, in the same order.
    assert torch.equal(fast[0], ref[0]), (fast[0].double() - ref[0].double()).abs().max()


def expected(reference: dict, cid: str) -> tuple[torch.Tensor, torch.Tensor]:
    if f"{cid}.error" in reference:
        pytest.fail(f"the reference processor raised: {bytes(reference[f'{cid}.error'].tolist()).decode()}")
    return reference[f"{cid}.pixel_values"], reference[f"{cid}.grid_thw"]


@pytest.mark.parametrize(("proc", "budget", "name"), CASES)
def test_patchify_equals_the_torchvision_processor(reference, proc, budget, name, hf_calls):
    image_processor = processor(proc)
    image = reloaded(reference, name)
    assert fast_patchify_unsupported(image_processor, image) is None
    fast = patchify(image, image_processor, *budget)
    assert hf_calls == []  # the fast path ran, not the HF pipeline
    assert_same(fast, expected(reference, case_id("processor", proc, budget, name)))


@pytest.mark.parametrize(("budget", "name"), PREFIT_CASES)
def test_prefit_equals_qwen_vl_utils_then_the_processor_without_resize(reference, budget, name, hf_calls):
    image = reloaded(reference, name)
    cid = case_id("prefit", "qwen3", budget, name)
    if f"{cid}.error" in reference:  # qwen-vl-utils refuses it (a side floored to 0 px): so must patchify_prefit
        with pytest.raises(ValueError):
            patchify_prefit(image, processor("qwen3"), *budget)
        return
    fast = patchify_prefit(image, processor("qwen3"), *budget)
    assert hf_calls == []
    assert_same(fast, expected(reference, cid))


def test_the_fast_path_differs_from_the_pil_backend():
    # Guards the comparison above: the PIL backend (Pillow's bicubic, unfused normalise) computes other values, so
    # an equality with the reference is the torchvision processor's, not something any resize would give.
    image, ip = IMAGES["1000x700-downscaled"], offline_processor()
    fast = patchify(image, ip, *TEST_BUDGET)
    pil = ip(
        images=[image], size={"shortest_edge": TEST_BUDGET[0], "longest_edge": TEST_BUDGET[1]}, return_tensors="pt"
    )
    assert torch.equal(fast[1], pil["image_grid_thw"][0])
    assert not torch.equal(fast[0], pil["pixel_values"])


def test_the_cases_cover_upsampling_native_size_and_downscaling():
    ip = offline_processor()
    _, grid = patchify(IMAGES["tiny-20x30-upsampled"], ip, *TEST_BUDGET)
    assert int(grid.prod()) * 14 * 14 >= MIN_PIXELS  # upsampled to the minimum budget
    _, grid = patchify(IMAGES["native-56x56"], stock_processor(), *QWEN_BUDGET)
    assert grid.tolist() == [1, 4, 4]  # 56x56 is already on the 28-pixel grid: no resize
    _, grid = patchify(IMAGES["wide-4096x900"], ip, *TEST_BUDGET)
    assert int(grid.prod()) * 14 * 14 <= MAX_PIXELS
    # The Qwen3-VL pre-fit moves every side to a multiple of 32 inside the budget before the processor sees it.
    fitted = qwen_vl_utils_resize(IMAGES["300x170"], 32, *QWEN3_BUDGETS[1])
    assert fitted.width % 32 == fitted.height % 32 == 0 and fitted.size != IMAGES["300x170"].size


def test_the_patch_layout_without_hf():
    # Independent of HF: with rescale and normalize off and the image already on the 28-pixel grid (no resize), patch
    # k is pixels (patch row, patch col) of merge block (k // 4), channel-major, repeated over the temporal slots.
    image = IMAGES["native-448x448"]
    pixels, grid = patchify(image, raw_processor(), 448 * 448, 448 * 448)
    assert grid.tolist() == [1, 32, 32]
    assert pixels.dtype == torch.uint8
    rgb = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)  # (C, H, W)
    patches = pixels.view(32 * 32, 3, 2, 14, 14)
    assert torch.equal(patches[:, :, 0], patches[:, :, 1])
    # Patch 1: top-right of the first 2x2 merge block; patch 2: its bottom-left; patch 4: the next block to the right.
    for k, (row, col) in {0: (0, 0), 1: (0, 1), 2: (1, 0), 3: (1, 1), 4: (0, 2), 16 * 4: (2, 0)}.items():
        assert torch.equal(patches[k, :, 0], rgb[:, row * 14 : row * 14 + 14, col * 14 : col * 14 + 14]), k


def test_the_resize_is_torchs_antialiased_bicubic_on_uint8():
    # Independent of HF: with rescale and normalise off, the values are F.interpolate's on the uint8 image.
    image = IMAGES["300x170"]
    pixels, grid = patchify(image, raw_processor(), *TEST_BUDGET)
    _, gh, gw = grid.tolist()
    u8 = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None]
    resized = torch.nn.functional.interpolate(u8, size=(gh * 14, gw * 14), mode="bicubic", antialias=True)[0]
    first = pixels.view(-1, 3, 2, 14, 14)[0, :, 0]
    assert torch.equal(first, resized[:, :14, :14])


def test_the_engine_preprocess_is_the_fast_path_on_the_padded_view(engine, reference):
    panorama = noisy(3000, 20, 21)  # aspect 150: padded to 100 before the processor sees it
    assert engine.processor.image_processor.to_dict() == offline_processor().to_dict()
    fast = engine._preprocess(panorama, *TEST_BUDGET)
    assert_same(fast, expected(reference, case_id("processor", "offline", TEST_BUDGET, "panorama-padded")))
    assert torch.equal(fast[1], engine._grid(panorama, *TEST_BUDGET))
    image = IMAGES["300x170"]
    assert torch.equal(engine._preprocess(image, *TEST_BUDGET)[1], engine._grid(image, *TEST_BUDGET))


class NotQwen:
    """A different image processor: anything callable with the HF signature."""

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
    "lanczos": (lambda: with_attribute("resample", Image.Resampling.LANCZOS), "300x170", "not nearest, bilinear"),
    "no-rgb-conversion-of-grey": (lambda: with_attribute("do_convert_rgb", False), "grey-L", "do_convert_rgb"),
    "zero-std": (lambda: with_attribute("image_std", [0.2, 0.0, 0.2]), "300x170", "zero"),
}


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # the PIL backend divides by the zero std
@pytest.mark.parametrize("case", FALLBACKS)
def test_unsupported_settings_fall_back_to_the_processors_call(case, hf_calls):
    make, name, reason = FALLBACKS[case]
    image_processor, image = make(), IMAGES[name]
    assert reason in (fast_patchify_unsupported(image_processor, image) or "")
    size = {"shortest_edge": TEST_BUDGET[0], "longest_edge": TEST_BUDGET[1]}
    try:
        ref = image_processor(images=[image], size=size, return_tensors="pt")
    except ValueError as err:  # HF refuses it: so must patchify
        hf_calls.clear()
        with pytest.raises(ValueError):
            patchify(image, image_processor, *TEST_BUDGET)
        assert hf_calls == [1] or str(err)
        return
    hf_calls.clear()
    fast = patchify(image, image_processor, *TEST_BUDGET)
    assert hf_calls == [1]
    assert_same(fast, (ref["pixel_values"], ref["image_grid_thw"][0]))


def test_a_foreign_processor_is_called_as_is():
    foreign = NotQwen()
    assert "not a Qwen2-VL image processor" in (fast_patchify_unsupported(foreign, IMAGES["300x170"]) or "")
    pixels, grid = patchify(IMAGES["300x170"], foreign, *TEST_BUDGET)
    assert foreign.calls == 1 and grid.tolist() == [1, 2, 2] and pixels.shape == (4, 8)


def test_errors_are_the_processors():
    ip = offline_processor()
    with pytest.raises(ValueError, match="aspect ratio must be smaller than 200"):
        patchify(Image.new("RGB", (4100, 20)), ip, *TEST_BUDGET)
    with pytest.raises(ValueError, match="shortest_edge"):
        patchify(IMAGES["300x170"], ip, 0, MAX_PIXELS)
    with pytest.raises(ValueError, match="multiples of 28"):
        patchify(IMAGES["300x170"], ip, *TEST_BUDGET, do_resize=False)
    with pytest.raises(ValueError, match="aspect ratio must be smaller than 200"):
        patchify_prefit(Image.new("RGB", (4100, 20)), qwen3_processor(), *QWEN3_BUDGETS[0])
