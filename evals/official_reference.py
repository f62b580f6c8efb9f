"""Generate `tests/fixtures/official_qzoom_tiny/`: reference outputs of the OFFICIAL Q-Zoom code on a tiny model.

This script is not part of the package's runtime and is not imported by the tests: it needs a second Python
environment with the transformers version the official Qwen2.5-VL fork was written against.

    python3 -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install torch==2.13.0 transformers==4.51.3 pillow numpy safetensors \
        matplotlib scipy scikit-image        # the last three: imported at module level by qwen_src/ana_utils.py
    /tmp/refvenv/bin/pip install --no-deps torchvision==0.29.1   # the fast processor; see "Environment" below
    git --git-dir=<Q-Zoom git dir> --work-tree=/tmp/qzref checkout HEAD -- .     # or any checkout
    /tmp/refvenv/bin/python evals/official_reference.py --official-repo /tmp/qzref \
        --official-git-dir <Q-Zoom git dir> --out tests/fixtures/official_qzoom_tiny

`--official-git-dir` is only needed when the checkout is a bare work tree; it lets the script record the commit and
refuse a checkout whose qwen_src/ or lmms-eval/ differ from it. The output is deterministic (seeded, 1 thread).

What it does, all with the official classes imported at run time from `--official-repo` (YuHengsss/Q-Zoom,
`qwen_src/qwen2_5_vl/modeling_qwen2_5_vl.py` + `qwen_src/mm_utils.py` + `qwen_src/ana_utils.py`); no official code is
copied here:

1. Builds a tiny legacy-layout (pre-4.52 keys: `model.layers.*`, `model.twig_layers.*`, `model.high_res_layers.*`,
   `model.high_res_head.*`, `visual.*`, `lm_head.*`) Qwen2.5-VL Q-Zoom checkpoint with the official
   `Qwen2_5_VLForConditionalGeneration`: text 64 x 4 layers (4 heads, 2 KV heads), vision 32 x 2, twig K=2 T=2,
   gate K=2 T=2, `reuse_src_pos=True`, seeded random init plus a few documented rescalings so that the gate
   probability and the RoI logit map are not degenerate. A byte-level Qwen2 tokenizer (270 ids, no merges; the same
   ids as `qzoom.offline.build_tokenizer()`) and the Qwen2.5-VL image processor are saved beside it.
2. Draws two deterministic synthetic images and drives the official model the way lmms-eval does with
   `two_stage_roi=True` (`lmms-eval/lmms_eval/models/simple/qwen2_5_vl.py` constructor +
   `lmms-eval/lmms_eval/models/chat/qwen2_5_vl.py::generate_until`): the suffix "\\nAnswer the question using a single
   word or phrase." is appended, the Qwen chat template adds the default system prompt, the PIL image goes through
   qwen_vl_utils' `fetch_image` resize (re-implemented below: `smart_resize` to multiples of 28 with its default
   4*28*28 .. 16384*28*28 budget, then PIL `Image.resize`; the image sizes are chosen so that this is the identity),
   then `AutoProcessor(min_pixels, max_pixels, use_fast=True)`, and `model.generate(..., src_images=[original image],
   processor=processor)` greedy, float32, CPU, sdpa, batch 1.
3. Captures, with wrappers around the official module-level functions and forward hooks (which observe and return
   the values unchanged): the gate probability, the raw RoI logit map, the grid box and the source-pixel box, the
   RoI crop's pixel values and grid, the spliced input ids and float M-RoPE position ids, the logits of every
   generated step and the greedy tokens.

Cases: `a` (gate fires, one RoI), `b` (gate closed: the official output is the stock model's output) and
`b_fallback` (same input as `b`, gate forced open with tau_gate = 0 but tau_roi = 1.0 so no RoI cell survives: the
RoI map of a portrait image, and the documented fallback to the direct answer).

Environment (recorded in reference.json): the official path needs torchvision, for lmms-eval's
`AutoProcessor(..., use_fast=True)` (`Qwen2VLImageProcessorFast`: uint8 resize with torch's antialiased bicubic, fused
rescale + normalise) and for `torchvision.transforms.functional.gaussian_blur` in `qwen_src/mm_utils.py`. The PyPI
wheel torchvision==0.29.1 is installed beside torch 2.13.0 without its dependencies
(`pip install --no-deps torchvision==0.29.1` in the second environment) and imported through
`evals/torchvision_shim.py` (loaded by file path), which defines the two operator schemas its import registers fake
kernels for; its compiled extension does not load, and nothing on this path needs it. The script refuses to run when
the processor it gets is not `Qwen2VLImageProcessorFast`. Nothing in the official files is edited.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import json
import math
import platform
import random
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import torch
from PIL import Image, ImageDraw

# ---------------------------------------------------------------------------------------------------------------------
# Fixed settings of the fixture
# ---------------------------------------------------------------------------------------------------------------------

SEED = 0
MIN_PIXELS = 64 * 28 * 28  # 50176, global view and RoI alike (official: the RoI reuses the processor's budget)
MAX_PIXELS = 256 * 28 * 28  # 200704
MAX_NEW_TOKENS = 8
LMMS_SUFFIX = "\nAnswer the question using a single word or phrase."

TEXT_HIDDEN = 64
TEXT_LAYERS = 4
TEXT_HEADS = 4
TEXT_KV_HEADS = 2
TEXT_INTERMEDIATE = 128
VISION_HIDDEN = 32
VISION_DEPTH = 2
VISION_HEADS = 2
TWIG_K = 2
TWIG_T = 2
HIGH_RES_K = 2
HIGH_RES_T = 2
CONFIG_HIGH_RES_THRESH = 0.5  # written into config.json; the cases set the lmms-eval thresholds explicitly

# Rescalings applied after the seeded init (documented in reference.json). With the HF init (normal(0, 0.02)) the
# twig Q/K logits are ~1e-2 (sigmoid ~0.5 everywhere: every cell passes any tau_roi < 0.5) and the gate sits at 0.5.
TWIG_QK_SCALE = 12.0  # twig_layers[-1].self_attn.{q,k}_proj.weight *= this -> RoI logits spread over several units
GATE_HEAD_SCALE = 300.0  # high_res_head.weight *= this -> the gate logit depends visibly on the prompt
GATE_HEAD_BIAS = 0.89  # high_res_head.bias := this -> centres the two cases around p = 0.5
LM_HEAD_SCALE = 8.0  # lm_head.weight *= this -> greedy margins well above float noise

# Thresholds (lmms-eval `roi_conf_thresh` = tau_roi, `high_res_thresh` = tau_gate), per case.
CASES: dict[str, dict[str, Any]] = {
    "a": {
        "image": "case_a.png",
        "size": (644, 476),  # (w, h); 23 x 17 cells of 28 px, so qwen_vl_utils' pre-resize is the identity
        "question": "What is written in the red box?",
        "tau_gate": 0.5,
        "tau_roi": 0.935,
        "expect_fire": True,
        "expect_roi": True,
    },
    "b": {
        "image": "case_b.png",
        "size": (308, 700),
        "question": "How many blue circles are there?",
        "tau_gate": 0.5,
        "tau_roi": 0.935,
        "expect_fire": False,
        "expect_roi": False,
    },
    "b_fallback": {
        "image": "case_b.png",
        "size": (308, 700),
        "question": "How many blue circles are there?",
        "tau_gate": 0.0,
        "tau_roi": 1.0,
        "expect_fire": True,
        "expect_roi": False,
    },
}

QWEN_VL_CHAT_TEMPLATE = (  # the Qwen2-VL / Qwen2.5-VL chat template (same text as qzoom.offline)
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]

PATCHES: list[str] = []  # every environment patch applied, for reference.json


# ---------------------------------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------------------------------


def _gaussian_blur(img: torch.Tensor, kernel_size: int, sigma: float) -> torch.Tensor:
    """torchvision's tensor Gaussian blur (informational numbers of reference.json)."""
    from torchvision.transforms.functional import gaussian_blur

    blurred: torch.Tensor = gaussian_blur(img, [kernel_size, kernel_size], [sigma, sigma])
    return blurred


def import_torchvision() -> None:
    """Import the real torchvision through the shim beside this script (before transformers looks for it)."""
    path = Path(__file__).resolve().parent / "torchvision_shim.py"
    spec = importlib.util.spec_from_file_location("torchvision_shim", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {path}")
    shim = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shim)
    try:
        torchvision = shim.import_torchvision()
    except ImportError as err:
        raise SystemExit(f"{err}: run `pip install --no-deps torchvision==0.29.1` in this environment") from err
    PATCHES.append(
        f"torchvision {torchvision.__version__} (PyPI wheel, installed with --no-deps beside torch "
        f"{torch.__version__}) imported through evals/torchvision_shim.py: the schemas of torchvision::nms and "
        "torchvision::qnms defined before its import; its compiled extension did not load and is not used"
    )


def import_official(repo: Path) -> dict[str, Any]:
    """Import the official Qwen2.5-VL modules from a checkout of YuHengsss/Q-Zoom."""
    if not (repo / "qwen_src" / "qwen2_5_vl" / "modeling_qwen2_5_vl.py").is_file():
        raise SystemExit(f"{repo} is not a Q-Zoom checkout (qwen_src/qwen2_5_vl/modeling_qwen2_5_vl.py missing)")
    sys.path.insert(0, str(repo))
    import_torchvision()
    modeling = importlib.import_module("qwen_src.qwen2_5_vl.modeling_qwen2_5_vl")
    configuration = importlib.import_module("qwen_src.qwen2_5_vl.configuration_qwen2_5_vl")
    mm_utils = importlib.import_module("qwen_src.mm_utils")
    return {"modeling": modeling, "configuration": configuration, "mm_utils": mm_utils}


def git_head(repo: Path, git_dir: Path | None) -> tuple[str, bool | None]:
    """The official commit, and whether the checkout's tracked files equal it (None when that cannot be told)."""
    base = ["git", f"--git-dir={git_dir}", f"--work-tree={repo}"] if git_dir else ["git", "-C", str(repo)]
    try:
        head = subprocess.run([*base, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown", None
    diff = subprocess.run([*base, "diff", "--quiet", "HEAD", "--", "qwen_src", "lmms-eval"], capture_output=True)
    return head, diff.returncode == 0


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer, processor, checkpoint
# ---------------------------------------------------------------------------------------------------------------------


def bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 / Qwen byte-level alphabet."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def build_tokenizer(workdir: Path) -> Any:
    """Byte-level Qwen2 tokenizer, no merges: bytes 0..255, <|endoftext|> 256, the other specials 257..269."""
    # transformers 4.x class (5.x merged it into Qwen2Tokenizer); imported by module path so either version parses.
    fast_module = importlib.import_module("transformers.models.qwen2.tokenization_qwen2_fast")

    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    (workdir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (workdir / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    tok = fast_module.Qwen2TokenizerFast(
        vocab_file=str(workdir / "vocab.json"), merges_file=str(workdir / "merges.txt")
    )
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tok.chat_template = QWEN_VL_CHAT_TEMPLATE
    ids = tok.convert_tokens_to_ids(SPECIAL_TOKENS)
    if len(tok) != 270 or ids != list(range(256, 270)):
        raise RuntimeError(f"unexpected tokenizer layout: len={len(tok)} specials={ids}")
    return tok


def build_processor(tok: Any) -> Any:
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor

    image_processor = Qwen2VLImageProcessor(
        min_pixels=MIN_PIXELS,
        max_pixels=MAX_PIXELS,
        patch_size=14,
        temporal_patch_size=2,
        merge_size=2,
        image_mean=IMAGE_MEAN,
        image_std=IMAGE_STD,
    )
    return Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tok, chat_template=QWEN_VL_CHAT_TEMPLATE)


def build_checkpoint(official: dict[str, Any], tok: Any, out: Path) -> dict[str, Any]:
    """Random tiny Q-Zoom model with the official classes; returns the rescalings applied."""
    c = tok.convert_tokens_to_ids
    config = official["configuration"].Qwen2_5_VLConfig(
        vocab_size=len(tok),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=TEXT_INTERMEDIATE,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=TEXT_HEADS,
        num_key_value_heads=TEXT_KV_HEADS,
        max_position_embeddings=32768,
        max_window_layers=TEXT_LAYERS,
        rms_norm_eps=1e-6,
        rope_theta=1e6,
        tie_word_embeddings=False,
        rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
        vision_config={
            "depth": VISION_DEPTH,
            "hidden_size": VISION_HIDDEN,
            "intermediate_size": VISION_HIDDEN * 2,
            "num_heads": VISION_HEADS,
            "out_hidden_size": TEXT_HIDDEN,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [1],
            "in_channels": 3,
            "hidden_act": "silu",
            "tokens_per_second": 2,
        },
        bos_token_id=None,
        eos_token_id=c("<|im_end|>"),
        pad_token_id=c("<|endoftext|>"),
        image_token_id=c("<|image_pad|>"),
        video_token_id=c("<|video_pad|>"),
        vision_start_token_id=c("<|vision_start|>"),
        vision_end_token_id=c("<|vision_end|>"),
        vision_token_id=c("<|vision_pad|>"),
    )
    # Q-Zoom fields, as train_qwen.py writes them (+ the optional gate keys read with hasattr at M25:1151-1156).
    config.enable_twig = True
    config.twig_K = TWIG_K
    config.twig_T = TWIG_T
    config.roi_source = "qk"
    config.roi_loss = "bce"
    config.roi_super_type = "v1"
    config.roi_multi_head = True
    config.enable_high_res = True
    config.high_res_K = HIGH_RES_K
    config.high_res_T = HIGH_RES_T
    config.high_res_thresh = CONFIG_HIGH_RES_THRESH
    config.roi_post_training = False
    config.reuse_src_pos = True
    config.add_noise_to_roi = False
    config.min_pixels = MIN_PIXELS
    config.max_pixels = MAX_PIXELS
    config.torch_dtype = "float32"
    config._attn_implementation = "sdpa"

    torch.manual_seed(SEED)
    model = official["modeling"].Qwen2_5_VLForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.model.twig_layers[-1].self_attn.q_proj.weight.mul_(TWIG_QK_SCALE)
        model.model.twig_layers[-1].self_attn.k_proj.weight.mul_(TWIG_QK_SCALE)
        model.model.high_res_head.weight.mul_(GATE_HEAD_SCALE)
        model.model.high_res_head.bias.fill_(GATE_HEAD_BIAS)
        model.lm_head.weight.mul_(LM_HEAD_SCALE)
    model.save_pretrained(str(out), safe_serialization=True)
    build_processor(tok).save_pretrained(str(out))
    return {
        "seed": SEED,
        "init": "official Qwen2_5_VLForConditionalGeneration(config) after torch.manual_seed(seed) (HF _init_weights)",
        "model.twig_layers[-1].self_attn.q_proj.weight *=": TWIG_QK_SCALE,
        "model.twig_layers[-1].self_attn.k_proj.weight *=": TWIG_QK_SCALE,
        "model.high_res_head.weight *=": GATE_HEAD_SCALE,
        "model.high_res_head.bias =": GATE_HEAD_BIAS,
        "lm_head.weight *=": LM_HEAD_SCALE,
    }


# ---------------------------------------------------------------------------------------------------------------------
# Images and lmms-eval preprocessing
# ---------------------------------------------------------------------------------------------------------------------


def _gradient(
    w: int, h: int, c0: tuple[int, int, int], c1: tuple[int, int, int], c2: tuple[int, int, int]
) -> Image.Image:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    u, v = xx / max(w - 1, 1), yy / max(h - 1, 1)
    arr = np.zeros((h, w, 3), dtype=np.float64)
    for ch in range(3):
        arr[..., ch] = c0[ch] * (1 - u) * (1 - v) + c1[ch] * u * (1 - v) + c2[ch] * v
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB")


def _glyphs(draw: ImageDraw.ImageDraw, rng: random.Random, x0: int, y0: int, n: int, size: int) -> None:
    """A row of text-like glyphs built from strokes (no font rendering, so it does not depend on FreeType)."""
    for i in range(n):
        gx = x0 + i * (size + 3)
        for _ in range(3):
            if rng.random() < 0.5:  # vertical stroke
                sx = gx + rng.randrange(0, size - 1)
                draw.rectangle([sx, y0, sx + 1, y0 + size + 2], fill=(10, 10, 10))
            else:  # horizontal stroke
                sy = y0 + rng.randrange(0, size + 1)
                draw.rectangle([gx, sy, gx + size - 1, sy + 1], fill=(10, 10, 10))


def make_image_a(size: tuple[int, int]) -> Image.Image:
    w, h = size
    rng = random.Random(1234)
    img = _gradient(w, h, (40, 90, 160), (200, 220, 240), (235, 225, 200))
    d = ImageDraw.Draw(img)
    d.rectangle([40, 300, 190, 420], fill=(40, 160, 70))  # green block
    d.rectangle([470, 40, 600, 130], fill=(240, 200, 30))  # yellow block
    d.rectangle([520, 330, 610, 450], fill=(60, 70, 200))  # blue block
    for _ in range(12):  # seeded clutter
        x, y = rng.randrange(0, w - 30), rng.randrange(0, h - 30)
        col = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
        d.rectangle([x, y, x + rng.randrange(6, 30), y + rng.randrange(6, 30)], fill=col)
    d.rectangle([250, 170, 420, 250], fill=(250, 250, 245), outline=(220, 20, 20), width=5)  # the red box
    _glyphs(d, rng, 268, 200, 9, 12)
    return img


def make_image_b(size: tuple[int, int]) -> Image.Image:
    w, h = size
    rng = random.Random(4321)
    img = _gradient(w, h, (250, 240, 220), (180, 200, 170), (90, 60, 80))
    d = ImageDraw.Draw(img)
    for cx, cy, r in [(80, 120, 35), (220, 260, 28), (120, 480, 45)]:
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(30, 60, 210))
    d.rectangle([180, 560, 290, 660], fill=(200, 40, 40))
    for _ in range(10):
        x, y = rng.randrange(0, w - 20), rng.randrange(0, h - 20)
        col = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
        d.rectangle([x, y, x + rng.randrange(4, 20), y + rng.randrange(4, 20)], fill=col)
    _glyphs(d, rng, 30, 620, 6, 10)
    return img


def qwen_vl_utils_smart_resize(height: int, width: int, factor: int = 28) -> tuple[int, int]:
    """qwen_vl_utils' image budget check with its defaults (min 4*28*28, max 16384*28*28), as used by lmms-eval."""
    min_pixels, max_pixels = 4 * 28 * 28, 16384 * 28 * 28
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def lmms_fetch_image(img: Image.Image) -> Image.Image:
    """What `process_vision_info` hands to the processor for an image message without min/max pixels."""
    img = img.convert("RGB")
    h, w = qwen_vl_utils_smart_resize(img.height, img.width)
    return img.resize((w, h))


# ---------------------------------------------------------------------------------------------------------------------
# Pixel values <-> resized image (so the fixture stores the exact ViT input as a PNG instead of 1 MB of floats)
# ---------------------------------------------------------------------------------------------------------------------


def unpatchify_to_uint8(pixel_values: torch.Tensor, grid_thw: list[int]) -> np.ndarray:
    """Invert Qwen2-VL patchification + normalisation: (N, 3*2*14*14) -> (H, W, 3) uint8 of the resized image."""
    t, gh, gw = grid_thw
    m, p, tp = 2, 14, 2
    x = pixel_values.double().reshape(t, gh // m, gw // m, m, m, 3, tp, p, p)
    x = x.permute(0, 6, 5, 1, 3, 7, 2, 4, 8).reshape(t * tp, 3, gh * p, gw * p)
    mean = torch.tensor(IMAGE_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD, dtype=torch.float64).view(1, 3, 1, 1)
    u8 = torch.round((x * std + mean) * 255.0)
    if not torch.equal(u8[0], u8[-1]) or u8.min() < 0 or u8.max() > 255:
        raise RuntimeError("pixel values are not a temporally repeated uint8 image")
    return u8[0].permute(1, 2, 0).to(torch.uint8).numpy()


def repatchify(image_u8: np.ndarray) -> torch.Tensor:
    """The forward direction (for the round-trip check): uint8 (H, W, 3) -> Qwen2-VL pixel values, float32."""
    h, w, _ = image_u8.shape
    m, p, tp = 2, 14, 2
    x = torch.from_numpy(image_u8).permute(2, 0, 1).double() / 255.0
    mean = torch.tensor(IMAGE_MEAN, dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor(IMAGE_STD, dtype=torch.float64).view(3, 1, 1)
    x = ((x - mean) / std).unsqueeze(0).repeat(tp, 1, 1, 1)  # (tp, 3, H, W)
    gh, gw = h // p, w // p
    x = x.reshape(1, tp, 3, gh // m, m, p, gw // m, m, p).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gh * gw, 3 * tp * p * p).float()


# ---------------------------------------------------------------------------------------------------------------------
# Running one case through the official model
# ---------------------------------------------------------------------------------------------------------------------


class Capture:
    """Wraps official module-level functions and hooks modules; every wrapper returns the wrapped result unchanged."""

    def __init__(self, official: dict[str, Any], model: Any, processor: Any) -> None:
        self.data: dict[str, Any] = {"visual_calls": [], "lm_head_last": [], "rope_index_calls": []}
        self._restore: list[tuple[Any, str, Any]] = []
        self._hooks: list[Any] = []
        modeling, mm_utils = official["modeling"], official["mm_utils"]
        self._wrap(modeling, "get_batched_sub_images_v2", self._on_sub_images)
        self._wrap(modeling, "insert_sub_feat_v2", self._on_insert)
        self._wrap(mm_utils, "get_bbox4src", self._on_bbox4src)
        self._wrap(model, "get_rope_index", self._on_rope_index)
        self._wrap(processor.image_processor, "preprocess", self._on_preprocess)
        self._hooks.append(model.visual.register_forward_hook(self._on_visual, with_kwargs=True))
        self._hooks.append(model.lm_head.register_forward_hook(self._on_lm_head))

    def _wrap(self, owner: Any, name: str, observer: Callable[..., None]) -> None:
        original = getattr(owner, name)
        self._restore.append((owner, name, owner.__dict__.get(name) if hasattr(owner, "__dict__") else None))

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            result = original(*args, **kwargs)
            observer(args, kwargs, result)
            return result

        setattr(owner, name, wrapper)

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        for owner, name, previous in reversed(self._restore):
            if previous is None:
                delattr(owner, name)
            else:
                setattr(owner, name, previous)

    def _on_sub_images(self, args: tuple[Any, ...], kwargs: dict[str, Any], result: Any) -> None:
        pred_roi_maps = args[0]
        self.data["pred_roi_map"] = None if pred_roi_maps[0] is None else pred_roi_maps[0].detach().clone()
        self.data["conf_thresh_passed"] = float(args[5]) if len(args) > 5 else float(kwargs["conf_thresh"])
        _, sub_img_nums, bbox_grid_thw, roi_mask, surrounding_bbox = result
        self.data["sub_img_nums"] = list(sub_img_nums)
        if sub_img_nums[0] > 0:
            self.data["roi_grid_box"] = surrounding_bbox[0].detach().clone()
            self.data["roi_image_grid_thw"] = bbox_grid_thw[0].detach().clone()
            self.data["roi_mask_final"] = roi_mask[0].detach().clone()

    def _on_insert(self, args: tuple[Any, ...], kwargs: dict[str, Any], result: Any) -> None:
        _, attention_mask, _, input_ids, inserted, position_ids = result
        self.data["spliced_input_ids"] = input_ids.detach().clone()
        self.data["spliced_position_ids"] = position_ids.detach().clone()
        self.data["spliced_attention_mask"] = attention_mask.detach().clone()
        self.data["spliced_inserted_mask"] = inserted.detach().clone()
        self.data["image_token_start"] = int(args[4])

    def _on_bbox4src(self, args: tuple[Any, ...], kwargs: dict[str, Any], result: Any) -> None:
        self.data["roi_pixel_box"] = result.detach().clone()
        self.data["bbox4src_kwargs"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in kwargs.items()}

    def _on_rope_index(self, args: tuple[Any, ...], kwargs: dict[str, Any], result: Any) -> None:
        self.data["rope_index_calls"].append((result[0].detach().clone(), result[1].detach().clone()))

    def _on_preprocess(self, args: tuple[Any, ...], kwargs: dict[str, Any], result: Any) -> None:
        images = args[0] if args else kwargs["images"]
        first = images[0] if isinstance(images, list | tuple) else images
        self.data.setdefault("preprocess_calls", []).append(
            {"image": first.copy() if isinstance(first, Image.Image) else None, "kwargs": dict(kwargs)}
        )

    def _on_visual(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        pixel_values = args[0] if args else kwargs["hidden_states"]
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        if grid is None:
            raise RuntimeError("the vision tower was called without grid_thw")
        self.data["visual_calls"].append((pixel_values.detach().clone(), grid.detach().clone()))

    def _on_lm_head(self, module: Any, args: tuple[Any, ...], output: torch.Tensor) -> None:
        self.data["lm_head_last"].append(output[0, -1].detach().clone())


def load_official_model(official: dict[str, Any], ckpt: Path) -> Any:
    cls = official["modeling"].Qwen2_5_VLForConditionalGeneration
    return cls.from_pretrained(str(ckpt), torch_dtype=torch.float32, attn_implementation="sdpa").eval()


def run_case(
    official: dict[str, Any], ckpt: Path, name: str, spec: dict[str, Any], image: Image.Image
) -> dict[str, Any]:
    """One lmms-eval `generate_until` request with `two_stage_roi=True`, batch size 1, greedy."""
    from transformers import AutoProcessor, AutoTokenizer

    model = load_official_model(official, ckpt)  # fresh model per case: the official forward is stateful
    # lmms-eval simple/qwen2_5_vl.py __init__ (two_stage_roi=True) and chat/qwen2_5_vl.py generate_until:
    processor = AutoProcessor.from_pretrained(str(ckpt), max_pixels=MAX_PIXELS, min_pixels=MIN_PIXELS, use_fast=True)
    if type(processor.image_processor).__name__ != "Qwen2VLImageProcessorFast":
        raise SystemExit(
            f"got {type(processor.image_processor).__name__}, not Qwen2VLImageProcessorFast: no torchvision?"
        )
    tokenizer = AutoTokenizer.from_pretrained(str(ckpt))
    model.model.enable_twig = True
    model.model.roi_enable2stage = True
    model.model.two_stage_vanilla = True
    model.model.is_debug = False
    model.model.roi_conf_thresh = spec["tau_roi"]
    model.model.high_res_thresh = spec["tau_gate"]

    question = spec["question"] + LMMS_SUFFIX
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    processor_input = lmms_fetch_image(image)
    inputs = processor(text=[text], images=[processor_input], videos=None, padding=True, return_tensors="pt")
    n_prompt = int(inputs["input_ids"].shape[1])
    inputs.data["src_images"] = [image.convert("RGB")]
    inputs.data["processor"] = processor

    cap = Capture(official, model, processor)
    try:
        with torch.no_grad():
            cont = model.generate(
                **inputs,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                do_sample=False,
                temperature=None,
                top_p=None,
                num_beams=1,
                max_new_tokens=MAX_NEW_TOKENS,
                top_k=None,
                use_cache=True,
            )
    finally:
        cap.close()
    d = cap.data
    new_tokens = cont[0, n_prompt:].tolist()
    step_logits = torch.stack(d["lm_head_last"][: len(new_tokens)])
    top2 = step_logits.topk(2, dim=-1).values
    fired = bool((model.model.high_res_pred >= spec["tau_gate"]).any())
    roi = bool(d.get("sub_img_nums", [0])[0] > 0)
    if fired != spec["expect_fire"] or roi != spec["expect_roi"]:
        raise RuntimeError(
            f"case {name}: gate p={model.model.high_res_pred.tolist()} fired={fired} roi={roi}, "
            f"expected fire={spec['expect_fire']} roi={spec['expect_roi']}; retune the thresholds"
        )
    return {
        "name": name,
        "text": text,
        "question": question,
        "inputs": inputs,
        "n_prompt": n_prompt,
        "processor_input": processor_input,
        "new_tokens": new_tokens,
        "decoded": tokenizer.decode(new_tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False),
        "step_logits": step_logits,
        "min_top2_margin": float((top2[:, 0] - top2[:, 1]).min()),
        "gate_p": model.model.high_res_pred.detach().clone(),
        "fired": fired,
        "roi": roi,
        "eos_token_id": int(tokenizer.eos_token_id),
        "pad_token_id": int(tokenizer.pad_token_id),
        "layer_idx_after": [int(layer.self_attn.layer_idx) for layer in model.model.layers],
        "capture": d,
    }


# ---------------------------------------------------------------------------------------------------------------------
# Writing the fixture
# ---------------------------------------------------------------------------------------------------------------------


def pixel_fingerprint(prefix: str, pixel_values: torch.Tensor, tensors: dict[str, torch.Tensor]) -> None:
    pv = pixel_values.float()
    tensors[f"{prefix}_pixel_values_rowsum"] = pv.sum(dim=1).contiguous()
    tensors[f"{prefix}_pixel_values_colsum"] = pv.sum(dim=0).contiguous()
    tensors[f"{prefix}_pixel_values_head"] = pv[:8].contiguous()


def save_resized_png(pixel_values: torch.Tensor, grid: list[int], path: Path) -> dict[str, Any]:
    """Store the ViT input as the resized uint8 image; verify it reproduces the pixel values.

    An identical image already written for an earlier case is referenced instead of written again.
    """
    u8 = unpatchify_to_uint8(pixel_values, grid)
    back = repatchify(u8)
    err = float((back - pixel_values.float()).abs().max())
    if err > 1e-5:
        raise RuntimeError(f"pixel value round trip failed for {path.name}: {err}")
    for other in sorted(path.parent.glob("*_resized.png")):
        if np.array_equal(np.asarray(Image.open(other).convert("RGB")), u8):
            path = other
            break
    else:
        Image.fromarray(u8, "RGB").save(path, optimize=True)
    return {"file": path.name, "size_wh": [int(u8.shape[1]), int(u8.shape[0])], "roundtrip_max_abs_err": err}


def write_fixture(
    out: Path, results: list[dict[str, Any]], images: dict[str, Image.Image], meta: dict[str, Any]
) -> None:
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    cases_meta: dict[str, Any] = {}
    for r in results:
        n, d, inputs = r["name"], r["capture"], r["inputs"]
        p = f"{n}"
        global_pv, global_grid = d["visual_calls"][0]
        if not torch.equal(global_pv, inputs["pixel_values"].float()):
            raise RuntimeError("the ViT did not see the processor's pixel values")
        tensors[f"{p}.input_ids"] = inputs["input_ids"][0].clone()
        tensors[f"{p}.image_grid_thw"] = inputs["image_grid_thw"].clone()
        pixel_fingerprint(f"{p}.global", global_pv, tensors)
        tensors[f"{p}.gate_p"] = r["gate_p"].float().reshape(-1).clone()
        tensors[f"{p}.first_token_logits"] = r["step_logits"][0].clone()
        tensors[f"{p}.step_logits"] = r["step_logits"].contiguous()
        tensors[f"{p}.generated_ids"] = torch.tensor(r["new_tokens"], dtype=torch.long)
        prompt_pos, rope_deltas = d["rope_index_calls"][0]
        tensors[f"{p}.prompt_position_ids"] = prompt_pos[:, 0].float().contiguous()
        tensors[f"{p}.rope_deltas"] = rope_deltas.reshape(-1).clone()
        png = save_resized_png(global_pv, global_grid[0].tolist(), out / f"{n}_global_resized.png")
        case_meta: dict[str, Any] = {
            "image": CASES[n]["image"],
            "image_size_wh": list(images[n].size),
            "processor_input_size_wh": list(r["processor_input"].size),
            "lmms_pre_resize_is_identity": r["processor_input"].size == images[n].size,
            "question": CASES[n]["question"],
            "question_with_suffix": r["question"],
            "prompt_text": r["text"],
            "n_prompt_tokens": r["n_prompt"],
            "tau_gate": CASES[n]["tau_gate"],
            "tau_roi": CASES[n]["tau_roi"],
            "gate_p": r["gate_p"].tolist(),
            "gate_fired": r["fired"],
            "roi_produced": r["roi"],
            "global_image_grid_thw": inputs["image_grid_thw"][0].tolist(),
            "global_resized_png": png,
            "generated_ids": r["new_tokens"],
            "generated_text": r["decoded"],
            "min_top2_logit_margin": r["min_top2_margin"],
            "eos_token_id_passed_to_generate": r["eos_token_id"],
            "pad_token_id_passed_to_generate": r["pad_token_id"],
            "decoder_layer_idx_after_run": r["layer_idx_after"],
        }
        case_meta["gate_margin_to_tau"] = float((r["gate_p"] - CASES[n]["tau_gate"]).abs().min())
        if d.get("pred_roi_map") is not None:
            tensors[f"{p}.roi_logit_map"] = d["pred_roi_map"].float().contiguous()
            case_meta["roi_logit_map_shape"] = list(d["pred_roi_map"].shape)
            # Informational, computed here (not by the official code): how far the blurred probabilities are from
            # tau_roi, and which cells pass (no sink mask applies: the map has <= 256 cells).
            blurred = _gaussian_blur(d["pred_roi_map"].float().sigmoid()[None, None], 3, 1.0)[0, 0]
            case_meta["roi_sink_mask_applies"] = d["pred_roi_map"].numel() > 256
            case_meta["roi_blurred_prob_max"] = float(blurred.max())
            case_meta["roi_blurred_prob_margin_to_tau"] = float((blurred - CASES[n]["tau_roi"]).abs().min())
            case_meta["roi_cells_passing_rc"] = (blurred > CASES[n]["tau_roi"]).nonzero().tolist()
        if r["roi"]:
            roi_pv, roi_grid = d["visual_calls"][1]
            tensors[f"{p}.roi_grid_box_xyxy"] = d["roi_grid_box"].reshape(-1).clone()
            tensors[f"{p}.roi_pixel_box_xyxy"] = d["roi_pixel_box"].reshape(-1).clone()
            tensors[f"{p}.roi_image_grid_thw"] = roi_grid.clone()
            pixel_fingerprint(f"{p}.roi", roi_pv, tensors)
            tensors[f"{p}.spliced_input_ids"] = d["spliced_input_ids"][0].clone()
            tensors[f"{p}.spliced_position_ids"] = d["spliced_position_ids"][:, 0].contiguous()
            tensors[f"{p}.spliced_attention_mask"] = d["spliced_attention_mask"][0].clone()
            tensors[f"{p}.spliced_inserted_mask"] = d["spliced_inserted_mask"][0].to(torch.uint8).clone()
            roi_png = save_resized_png(roi_pv, roi_grid[0].tolist(), out / f"{n}_roi_resized.png")
            crop_calls = [c for c in d.get("preprocess_calls", []) if "min_pixels" in c["kwargs"]]
            crop = crop_calls[-1]["image"]
            crop.save(out / f"{n}_roi_crop.png", optimize=True)
            box = d["roi_pixel_box"].reshape(-1).tolist()
            if crop.size != (box[2] - box[0], box[3] - box[1]):
                raise RuntimeError("crop size does not match the pixel box")
            image_token_start = d["image_token_start"]
            n_global = int(inputs["image_grid_thw"][0].prod()) // 4
            case_meta.update(
                {
                    "roi_grid_box_xyxy_end_exclusive": d["roi_grid_box"].reshape(-1).tolist(),
                    "roi_pixel_box_xyxy": box,
                    "roi_crop_png": f"{n}_roi_crop.png",
                    "roi_crop_size_wh": list(crop.size),
                    "roi_processor_kwargs": {
                        k: v for k, v in crop_calls[-1]["kwargs"].items() if k in ("min_pixels", "max_pixels")
                    },
                    "roi_image_grid_thw": roi_grid[0].tolist(),
                    "roi_resized_png": roi_png,
                    "roi_tokens": int(roi_grid[0].prod()) // 4,
                    "image_token_start": image_token_start,
                    "n_global_image_tokens": n_global,
                    "kv_reuse_prefix_len_P": image_token_start + n_global,
                    "spliced_len": int(d["spliced_input_ids"].shape[1]),
                    "bbox4src_kwargs": d["bbox4src_kwargs"],
                }
            )
        cases_meta[n] = case_meta
    meta["cases"] = cases_meta
    meta["tensors"] = {
        k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")} for k, v in tensors.items()
    }
    save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, str(out / "reference.safetensors"))
    (out / "reference.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official-repo", type=Path, required=True, help="checkout of YuHengsss/Q-Zoom")
    parser.add_argument("--out", type=Path, required=True, help="fixture directory to (re)write")
    parser.add_argument(
        "--official-git-dir", type=Path, default=None, help="git dir of that checkout when it is not inside it"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: bit-reproducible)")
    args = parser.parse_args(argv)

    import transformers

    if not transformers.__version__.startswith("4.51."):
        print(f"warning: transformers {transformers.__version__}; the official fork targets 4.51.3", file=sys.stderr)
    torch.set_num_threads(args.threads)
    repo = args.official_repo.resolve()
    commit, clean = git_head(repo, args.official_git_dir)
    if clean is False:
        raise SystemExit(f"{repo} differs from the official commit {commit}; use an unmodified checkout")
    official = import_official(repo)

    out: Path = args.out
    if out.exists():
        shutil.rmtree(out)
    ckpt = out / "checkpoint"
    ckpt.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        tok = build_tokenizer(Path(tmp))
    perturbation = build_checkpoint(official, tok, ckpt)

    images = {"a": make_image_a(CASES["a"]["size"]), "b": make_image_b(CASES["b"]["size"])}
    images["b_fallback"] = images["b"]
    images["a"].save(out / CASES["a"]["image"])
    images["b"].save(out / CASES["b"]["image"])
    # Re-read the PNGs so the run sees exactly what a consumer of the fixture loads.
    images = {k: Image.open(out / CASES[k]["image"]).convert("RGB") for k in CASES}

    results = [run_case(official, ckpt, name, spec, images[name]) for name, spec in CASES.items()]
    b, fb = results[1], results[2]
    if not torch.equal(b["step_logits"][0], fb["step_logits"][0]):
        print("warning: gate-open-no-RoI fallback logits differ from the gate-closed ones", file=sys.stderr)

    meta: dict[str, Any] = {
        "description": "Reference outputs of the official Q-Zoom Qwen2.5-VL inference path on a tiny random model",
        "generator": "evals/official_reference.py",
        "official_repo": "YuHengsss/Q-Zoom",
        "official_commit": commit,
        "official_checkout_unmodified": clean,
        "official_files_sha256": {
            rel: file_sha256(repo / rel)
            for rel in (
                "qwen_src/qwen2_5_vl/modeling_qwen2_5_vl.py",
                "qwen_src/mm_utils.py",
                "qwen_src/ana_utils.py",
                "lmms-eval/lmms_eval/models/chat/qwen2_5_vl.py",
                "lmms-eval/lmms_eval/models/simple/qwen2_5_vl.py",
            )
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "numpy": np.__version__,
            "pillow": PIL.__version__,
        },
        "run": {
            "device": "cpu",
            "dtype": "float32",
            "attn_implementation": "sdpa",
            "torch_threads": args.threads,
            "batch_size": 1,
            "decoding": "greedy (do_sample=False, num_beams=1)",
            "max_new_tokens": MAX_NEW_TOKENS,
            "driver": "lmms-eval chat Qwen2_5_VL.generate_until with two_stage_roi=True, re-enacted in this script",
            "image_processor": "transformers Qwen2VLImageProcessorFast (AutoProcessor use_fast=True, as lmms-eval): "
            "uint8 resize with torch's antialiased bicubic, fused rescale + normalise in float32",
        },
        "min_pixels": MIN_PIXELS,
        "max_pixels": MAX_PIXELS,
        "image_mean": IMAGE_MEAN,
        "image_std": IMAGE_STD,
        "checkpoint": {
            "dir": "checkpoint",
            "layout": "pre-4.52 (model.layers.*, model.twig_layers.*, model.high_res_layers.*, model.high_res_head.*, "
            "visual.*, lm_head.*)",
            "twig_K": TWIG_K,
            "twig_T": TWIG_T,
            "high_res_K": HIGH_RES_K,
            "high_res_T": HIGH_RES_T,
            "reuse_src_pos": True,
            "config_high_res_thresh": CONFIG_HIGH_RES_THRESH,
            "perturbation": perturbation,
        },
        "patches": PATCHES,
        "notes": [
            "pixel values are stored as the exact resized uint8 image (<case>_global_resized.png, "
            "<case>_roi_resized.png; patchify + CLIP-normalise reproduces them to <1e-5) plus row/column sums "
            "and the first 8 rows in float32",
            "position ids are float32 (3, seq); the spliced ones are what the official code feeds the second prefill",
            "step_logits[i] are the logits that chose generated_ids[i]; first_token_logits == step_logits[0]",
            "the official Qwen2_5_VLForConditionalGeneration constructor prints 'Warning: Error loading "
            "AutoProcessor' (it tries AutoProcessor.from_pretrained(config.name_or_path) while self.training is True "
            "at construction); harmless",
            "after a fired forward the official model renumbers layers[K:].self_attn.layer_idx to i + T - 1 "
            "(decoder_layer_idx_after_run); each case therefore loads a fresh model",
            "boxes are xyxy; the grid box is end-exclusive in merged-cell units, the pixel box is in source-image "
            "pixels after the 28-px minimum-size growth and .long() truncation",
        ],
    }
    write_fixture(out, results, images, meta)
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({total / 1e6:.2f} MB)")
    for r in results:
        print(
            r["name"],
            "p=",
            [round(x, 4) for x in r["gate_p"].tolist()],
            "fired",
            r["fired"],
            "roi",
            r["roi"],
            "tokens",
            r["new_tokens"],
            "margin",
            round(r["min_top2_margin"], 4),
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
