"""The offline building blocks: byte tokenizer, chat template, torchvision-free processor, tiny configs."""

from __future__ import annotations

import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from conftest import scene
from qzoom.offline import (
    SPECIAL_TOKENS,
    build_processor,
    build_tokenizer,
    load_processor,
    save_processor,
    tiny_qwen25vl_config,
)


def test_tokenizer_is_byte_level_with_qwen_specials():
    tok = build_tokenizer()
    assert len(tok) == 270
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(256, 270))
    text = "K7X-42 ünï <|image_pad|>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[-1] == tok.convert_tokens_to_ids("<|image_pad|>")
    assert len(ids) == len("K7X-42 ünï ".encode()) + 1  # one id per byte, specials atomic
    assert tok.decode(ids) == text


def test_chat_template_matches_qwen():
    proc = build_processor()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi?"}]}]
    text = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>Hi?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_demo_model_template_drops_only_the_default_system_prompt(tmp_path):
    from qzoom.checkpoint import save_checkpoint
    from qzoom.demo.model import BaseRecipe, build_demo_model

    model, proc = build_demo_model(BaseRecipe(hidden_size=32, vision_hidden_size=32, num_heads=2, num_kv_heads=1))
    user = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi?"}]}]
    expected = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hi?<|im_end|>\n<|im_start|>assistant\n"
    assert proc.apply_chat_template(user, add_generation_prompt=True, tokenize=False) == expected
    system = [{"role": "system", "content": "Be brief."}, *user]
    rendered = proc.apply_chat_template(system, add_generation_prompt=True, tokenize=False)
    assert rendered == "<|im_start|>system\nBe brief.<|im_end|>\n" + expected  # a caller's own is kept
    save_checkpoint(model, proc, tmp_path)
    assert load_processor(tmp_path).apply_chat_template(user, add_generation_prompt=True, tokenize=False) == expected


def test_processor_saves_and_reloads_as_an_hf_directory(tmp_path):
    proc = build_processor(min_pixels=16 * 784, max_pixels=64 * 784)
    save_processor(proc, tmp_path)
    assert {"tokenizer.json", "preprocessor_config.json"} <= {p.name for p in tmp_path.iterdir()}
    again = load_processor(tmp_path)
    text = proc.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"}]}], add_generation_prompt=True
    )
    image = scene(500, 300, 9)
    a = proc(text=[text], images=[image], return_tensors="pt")
    b = again(text=[text], images=[image], return_tensors="pt")
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])
    assert int(a["image_grid_thw"].prod()) // 4 <= 64  # the budget survived the round trip


def test_tiny_config_builds_a_stock_model_that_generates():
    torch.manual_seed(0)
    tok = build_tokenizer()
    config = tiny_qwen25vl_config(
        tok, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1
    )
    assert sum(config.text_config.rope_parameters["mrope_section"]) * 2 == 32 // 2
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    proc = build_processor(tok, min_pixels=4 * 784, max_pixels=16 * 784)
    text = proc.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"}]}], add_generation_prompt=True
    )
    inputs = proc(text=[text], images=[scene(100, 80, 1)], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]
