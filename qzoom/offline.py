"""Offline building blocks: a Qwen tokenizer, chat template, processor and tiny model configs built in code.

No model hub is reachable from our machines or from an air-gapped laptop, and torchvision is not installed (the
only pairing that imports pulls a 5.5 GB CUDA build). This module makes the stock Hugging Face Qwen2.5-VL stack work
anyway (spec/offline_stack.md §1):

- `build_tokenizer()`: a byte-level `Qwen2Tokenizer` (256 byte tokens + the Qwen special tokens, 270 ids) with the
  Qwen2-VL chat template, built from dicts, no files.
- `build_processor()`: the stock `Qwen2_5_VLProcessor` around the PIL image processor, with the video processor made
  optional (the stock class refuses `video_processor=None` without torchvision).
- `tiny_qwen25vl_config()`: a few-layer Qwen2.5-VL config for tests and the demo model.
- The same for Qwen3-VL: `build_qwen3vl_processor()` (16-px patches, mean/std 0.5, the chat template without a
  default system prompt, as Qwen3-VL's own), `load_qwen3vl_processor()`, `tiny_qwen3vl_config()` (interleaved M-RoPE,
  q/k norms, one DeepStack level).
- `save_processor()` / `load_processor()`: the processor's own `save_pretrained` fails without a video processor, so
  the parts are saved and reloaded separately; a directory written here is an ordinary HF model directory.

Real checkpoints (Qwen/Qwen2.5-VL-7B-Instruct, released Q-Zoom checkpoints) carry their own tokenizer files;
`load_processor` reads those just the same.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from transformers import Qwen2_5_VLConfig, Qwen2_5_VLProcessor, Qwen2Tokenizer, Qwen3VLConfig, Qwen3VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

# The Qwen2-VL / Qwen2.5-VL chat template, verbatim from the released models (three parts, so that the demo model's
# template below is the same without the default system prompt).
_TEMPLATE_HEAD = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
)
_TEMPLATE_DEFAULT_SYSTEM = (
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
)
_TEMPLATE_BODY = (
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
QWEN_VL_CHAT_TEMPLATE = _TEMPLATE_HEAD + _TEMPLATE_DEFAULT_SYSTEM + _TEMPLATE_BODY
# The same without the default system prompt, for the demo model trained from scratch: with the byte tokenizer its 38
# tokens were a third of every reading drill and a tenth of a coarse view's sequence, in every training step, and
# they tell a model that never saw another prompt nothing. A caller's own system message is still rendered.
NO_DEFAULT_SYSTEM_CHAT_TEMPLATE = _TEMPLATE_HEAD + _TEMPLATE_BODY

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

# Qwen2.5-VL image preprocessing constants (CLIP normalisation, 14 px patches, 2x2 merge -> 28 px per LLM token).
QWEN25_IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
QWEN25_IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]
QWEN25_PATCH = 14
QWEN25_MERGE = 2


def bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 / Qwen byte-level alphabet: every byte maps to one printable unicode character."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def build_tokenizer() -> Qwen2Tokenizer:
    """A byte-level Qwen2 tokenizer with no merges: ids 0..255 are bytes, 256 is <|endoftext|>, 257..269 specials."""
    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], extra_special_tokens=None)
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tok.chat_template = QWEN_VL_CHAT_TEMPLATE
    return tok


class _OptionalVideoProcessor:
    """Lets a Qwen VL processor be built with `video_processor=None` (needed only when torchvision is absent)."""

    def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
        if argument_name == "video_processor" and argument is None:
            return None
        return super().check_argument_for_proper_class(argument_name, argument)  # type: ignore[misc]


class OfflineQwen2_5_VLProcessor(_OptionalVideoProcessor, Qwen2_5_VLProcessor):
    """The stock Qwen2.5-VL processor, images only."""


class OfflineQwen3VLProcessor(_OptionalVideoProcessor, Qwen3VLProcessor):
    """The stock Qwen3-VL processor, images only."""


def build_image_processor(min_pixels: int = 256 * 28 * 28, max_pixels: int = 576 * 28 * 28) -> Qwen2VLImageProcessorPil:
    """The Qwen2.5-VL image processor on the PIL backend; `min_pixels`/`max_pixels` are the default pixel budget."""
    return Qwen2VLImageProcessorPil(
        patch_size=QWEN25_PATCH,
        merge_size=QWEN25_MERGE,
        temporal_patch_size=2,
        image_mean=QWEN25_IMAGE_MEAN,
        image_std=QWEN25_IMAGE_STD,
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
    )


def build_processor(
    tokenizer: Qwen2Tokenizer | None = None,
    min_pixels: int = 256 * 28 * 28,
    max_pixels: int = 576 * 28 * 28,
) -> OfflineQwen2_5_VLProcessor:
    """A Qwen2.5-VL processor from the byte tokenizer (or `tokenizer`) and the PIL image processor."""
    tok = tokenizer if tokenizer is not None else build_tokenizer()
    return OfflineQwen2_5_VLProcessor(
        image_processor=build_image_processor(min_pixels, max_pixels),
        tokenizer=tok,
        chat_template=tok.chat_template or QWEN_VL_CHAT_TEMPLATE,
    )


# Qwen3-VL image preprocessing constants (16 px patches, 2x2 merge -> 32 px per LLM token, mean = std = 0.5).
QWEN3_PATCH = 16
QWEN3_MERGE = 2
QWEN3_IMAGE_MEAN = [0.5, 0.5, 0.5]
QWEN3_IMAGE_STD = [0.5, 0.5, 0.5]


def build_qwen3vl_image_processor(
    min_pixels: int = 256 * 32 * 32, max_pixels: int = 576 * 32 * 32
) -> Qwen2VLImageProcessorPil:
    """The Qwen3-VL image processor on the PIL backend (Qwen3-VL reuses the Qwen2-VL image processor class)."""
    return Qwen2VLImageProcessorPil(
        patch_size=QWEN3_PATCH,
        merge_size=QWEN3_MERGE,
        temporal_patch_size=2,
        image_mean=QWEN3_IMAGE_MEAN,
        image_std=QWEN3_IMAGE_STD,
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
    )


def build_qwen3vl_processor(
    tokenizer: Qwen2Tokenizer | None = None, min_pixels: int = 256 * 32 * 32, max_pixels: int = 576 * 32 * 32
) -> OfflineQwen3VLProcessor:
    """A Qwen3-VL processor from the byte tokenizer (or `tokenizer`) and the PIL image processor. Qwen3-VL's own
    template has no default system prompt, so the byte tokenizer's gets none either."""
    tok = tokenizer
    if tok is None:
        tok = build_tokenizer()
        tok.chat_template = NO_DEFAULT_SYSTEM_CHAT_TEMPLATE
    return OfflineQwen3VLProcessor(
        image_processor=build_qwen3vl_image_processor(min_pixels, max_pixels),
        tokenizer=tok,
        chat_template=tok.chat_template or NO_DEFAULT_SYSTEM_CHAT_TEMPLATE,
    )


def load_qwen3vl_processor(directory: str | Path) -> OfflineQwen3VLProcessor:
    """Load the processor of a Qwen3-VL model directory: ours, a stock one, or a released Q-Zoom one."""
    tok = Qwen2Tokenizer.from_pretrained(str(directory))
    if not tok.chat_template:
        tok.chat_template = NO_DEFAULT_SYSTEM_CHAT_TEMPLATE
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(str(directory))
    return OfflineQwen3VLProcessor(image_processor=image_processor, tokenizer=tok, chat_template=tok.chat_template)


def save_processor(processor: Qwen2_5_VLProcessor | Qwen3VLProcessor, directory: str | Path) -> None:
    """Write the tokenizer and image-processor files of `processor` into `directory` (an HF model directory)."""
    processor.tokenizer.save_pretrained(str(directory))
    processor.image_processor.save_pretrained(str(directory))


def load_processor(directory: str | Path) -> OfflineQwen2_5_VLProcessor:
    """Load the processor of an HF model directory: ours, a stock Qwen2.5-VL one, or a released Q-Zoom one."""
    tok = Qwen2Tokenizer.from_pretrained(str(directory))
    if not tok.chat_template:
        tok.chat_template = QWEN_VL_CHAT_TEMPLATE
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(str(directory))
    return OfflineQwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tok, chat_template=tok.chat_template)


def vision_token_ids(tokenizer: Qwen2Tokenizer) -> dict[str, Any]:
    """The config fields naming the vision special tokens, looked up in `tokenizer`."""
    c = tokenizer.convert_tokens_to_ids
    return {
        "image_token_id": c("<|image_pad|>"),
        "video_token_id": c("<|video_pad|>"),
        "vision_start_token_id": c("<|vision_start|>"),
        "vision_end_token_id": c("<|vision_end|>"),
    }


def _tiny_text_config(
    tok: Qwen2Tokenizer,
    hidden_size: int,
    num_hidden_layers: int,
    num_attention_heads: int,
    num_key_value_heads: int,
    intermediate_size: int | None,
    vocab_size: int | None,
) -> dict[str, Any]:
    """The text-decoder fields both tiny backbones share; each adds its own RoPE (and head size)."""
    return {
        "vocab_size": vocab_size or len(tok),
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size or hidden_size * 2,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads,
        "max_position_embeddings": 32768,
        "bos_token_id": None,
        "eos_token_id": tok.convert_tokens_to_ids("<|im_end|>"),
        "pad_token_id": tok.convert_tokens_to_ids("<|endoftext|>"),
        "tie_word_embeddings": False,
    }


def tiny_qwen25vl_config(
    tokenizer: Qwen2Tokenizer | None = None,
    *,
    hidden_size: int = 64,
    num_hidden_layers: int = 4,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int | None = None,
    vision_hidden_size: int = 32,
    vision_depth: int = 2,
    vision_heads: int = 2,
    vocab_size: int | None = None,
) -> Qwen2_5_VLConfig:
    """A small Qwen2.5-VL config with the real architecture (windowed ViT, 2x2 merger, M-RoPE, GQA).

    The M-RoPE section is scaled to the head size the same way the real models split 128 into [16, 24, 24].
    """
    tok = tokenizer if tokenizer is not None else build_tokenizer()
    head_dim = hidden_size // num_attention_heads
    half = head_dim // 2
    t_sec = half // 4
    h_sec = (half - t_sec) // 2
    mrope_section = [t_sec, h_sec, half - t_sec - h_sec]
    text = _tiny_text_config(
        tok, hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads, intermediate_size, vocab_size
    )
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope_section}
    vision = {
        "depth": vision_depth,
        "hidden_size": vision_hidden_size,
        "intermediate_size": vision_hidden_size * 2,
        "num_heads": vision_heads,
        "out_hidden_size": hidden_size,
        "patch_size": QWEN25_PATCH,
        "spatial_merge_size": QWEN25_MERGE,
        "temporal_patch_size": 2,
        "window_size": 112,
        "fullatt_block_indexes": [vision_depth - 1],
    }
    config = Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, tie_word_embeddings=False, **vision_token_ids(tok)
    )
    config._attn_implementation = "sdpa"
    return config


def tiny_qwen3vl_config(
    tokenizer: Qwen2Tokenizer | None = None,
    *,
    hidden_size: int = 64,
    num_hidden_layers: int = 4,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int | None = None,
    vision_hidden_size: int = 32,
    vision_depth: int = 2,
    vision_heads: int = 2,
    vocab_size: int | None = None,
    deepstack_levels: int = 1,
) -> Qwen3VLConfig:
    """A small Qwen3-VL config with the real architecture: interleaved M-RoPE, per-head q/k norms, GQA, a ViT with
    learned position embeddings and `deepstack_levels` DeepStack mergers (from the first vision blocks; their
    features are added after decoder layers 0..levels-1)."""
    tok = tokenizer if tokenizer is not None else build_tokenizer()
    head_dim = hidden_size // num_attention_heads
    half = head_dim // 2
    # The real 4B splits 64 frequencies [24, 20, 20]; keep that proportion (interleaved: h and w take every third).
    h_sec = w_sec = (half * 5) // 16
    mrope_section = [half - h_sec - w_sec, h_sec, w_sec]
    text = _tiny_text_config(
        tok, hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads, intermediate_size, vocab_size
    )
    text["head_dim"] = head_dim
    text["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": 5e6,
        "mrope_section": mrope_section,
        "mrope_interleaved": True,
    }
    vision = {
        "depth": vision_depth,
        "hidden_size": vision_hidden_size,
        "intermediate_size": vision_hidden_size * 2,
        "num_heads": vision_heads,
        "out_hidden_size": hidden_size,
        "patch_size": QWEN3_PATCH,
        "spatial_merge_size": QWEN3_MERGE,
        "temporal_patch_size": 2,
        "num_position_embeddings": 2304,
        "deepstack_visual_indexes": list(range(deepstack_levels)),
    }
    config = Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **vision_token_ids(tok))
    config._attn_implementation = "sdpa"
    return config
