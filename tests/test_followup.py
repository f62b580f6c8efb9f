"""Follow-up questions on an image already seen: the vision tower and the image prefix are not computed again,
in the same process (L1) and from a fresh process sharing Redis (L2); answers equal uncached ones."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import MAX_PIXELS, MIN_PIXELS
from qzoom.agent import run
from qzoom.cache import FeatureCache
from qzoom.checkpoint import save_checkpoint
from qzoom.engine import QZoomEngine
from qzoom.schemas import AskOptions

OPTS = AskOptions(gate_thresh=0.0, roi_thresh=0.1, max_new_tokens=6, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
FIRST, SECOND = "What is written in the red box?", "What colour is the big square?"
PREFIX_KINDS = {"vision", "prefix", "prefix-gate", "prefix-twig", "prefix-above"}


class Counter:
    """Counts vision-tower calls and the tokens layer 0 processes (the prefix prefill shows up there)."""

    def __init__(self, model):
        self.vision_patches: list[int] = []
        self.layer0_tokens: list[int] = []
        lm = model.model.language_model
        self.hooks = [
            model.model.visual.register_forward_hook(lambda m, a, k: self.vision_patches.append(a[0].shape[0])),
            lm.layers[0].register_forward_hook(lambda m, a, k: self.layer0_tokens.append(a[0].shape[1])),
        ]

    def close(self):
        for h in self.hooks:
            h.remove()


def ask_state(engine, image, query):
    st = engine.new_state(image, query, OPTS)
    run(engine, [st])
    return st


def test_follow_up_in_process_skips_vision_and_prefix(tiny_model, processor, images):
    engine = QZoomEngine(tiny_model, processor, name="tiny")
    first = ask_state(engine, images[0], FIRST)
    assert first.cache_hits == []
    counter = Counter(tiny_model)
    try:
        second = ask_state(engine, images[0], SECOND)
    finally:
        counter.close()
    assert set(second.cache_hits) >= PREFIX_KINDS
    global_patches = int(second.grid_thw.prod())
    assert global_patches not in counter.vision_patches  # the coarse view was not encoded again
    # The prefix prefill was skipped: layer 0 first ran only the question's tokens after the cached image prefix.
    fresh = engine.new_state(images[0], SECOND, OPTS)
    engine.prepare([fresh])
    assert counter.layer0_tokens[0] == fresh.input_ids.numel() - second.blocks[0].end
    reference = ask_state(QZoomEngine(tiny_model, processor, name="tiny"), images[0], SECOND)
    assert reference.cache_hits == []
    assert [b.box for b in second.blocks] == [b.box for b in reference.blocks]
    torch.testing.assert_close(second.next_logits, reference.next_logits, rtol=1e-5, atol=1e-5)
    assert second.answer_ids == reference.answer_ids
    assert second.gate_scores == pytest.approx(reference.gate_scores, abs=1e-6)


def test_follow_up_from_a_fresh_process_hits_redis(tiny_model, processor, images, redis_server, tmp_path):
    model_dir = save_checkpoint(tiny_model, processor, tmp_path / "tiny")
    image_path = tmp_path / "image.png"
    images[0].save(image_path)
    url = redis_server.url
    secret = b"shared by the replicas"  # Redis values are HMAC-signed: replicas share them only with the secret
    cache = FeatureCache.from_url(url, secret=secret)
    first = ask_state(QZoomEngine.from_pretrained(model_dir, cache=cache), images[0], FIRST)
    assert first.cache_hits == []

    script = textwrap.dedent(
        f"""
        import json
        from qzoom.agent import run
        from qzoom.cache import FeatureCache
        from qzoom.engine import QZoomEngine
        from qzoom.images import load_image
        from qzoom.schemas import AskOptions
        cache = FeatureCache.from_url({url!r}, secret={secret!r})
        engine = QZoomEngine.from_pretrained({str(model_dir)!r}, cache=cache)
        opts = AskOptions.model_validate_json({OPTS.model_dump_json()!r})
        st = engine.new_state(load_image({str(image_path)!r}), {SECOND!r}, opts)
        run(engine, [st])
        l2_hits = sum(k.get("l2_hits", 0) for k in cache.stats()["kinds"].values())
        boxes = [b.box.as_list() for b in st.blocks]
        print(json.dumps({{"hits": st.cache_hits, "answer_ids": st.answer_ids, "boxes": boxes, "l2_hits": l2_hits}}))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    child = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(child["hits"]) >= PREFIX_KINDS and child["l2_hits"] >= len(PREFIX_KINDS)
    reference = ask_state(QZoomEngine(tiny_model, processor, name="tiny"), images[0], SECOND)
    assert child["answer_ids"] == reference.answer_ids
    assert child["boxes"] == [b.box.as_list() for b in reference.blocks]


def test_redis_killed_mid_run_fails_open_and_recovers(tiny_model, processor, images, redis_server):
    cache = FeatureCache.from_url(redis_server.url)
    engine = QZoomEngine(tiny_model, processor, name="tiny", cache=cache)
    reference = ask_state(QZoomEngine(tiny_model, processor, name="tiny"), images[1], FIRST)
    redis_server.kill()
    try:
        down = ask_state(engine, images[1], FIRST)  # Redis is gone: computed, answered, errors counted
        assert down.answer_ids == reference.answer_ids
        assert cache.stats()["l2"]["errors"] > 0
    finally:
        redis_server.start()
    # Back up: a new replica (empty L1) writes and then reads through Redis again.
    writer = QZoomEngine(tiny_model, processor, name="tiny", cache=FeatureCache.from_url(redis_server.url))
    ask_state(writer, images[2], FIRST)
    reader_cache = FeatureCache.from_url(redis_server.url)
    again = ask_state(QZoomEngine(tiny_model, processor, name="tiny", cache=reader_cache), images[2], SECOND)
    assert set(again.cache_hits) >= PREFIX_KINDS


def test_zoomed_follow_up_on_the_same_region_reuses_it_through_its_end(tiny_model, processor, images):
    same_region = AskOptions(
        force_zoom=True, roi_thresh=0.0, max_new_tokens=4, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS
    )  # τ_roi = 0: every cell passes, so both questions zoom into the same box
    engine = QZoomEngine(tiny_model, processor, name="tiny")
    first = engine.new_state(images[1], FIRST, same_region)
    run(engine, [first])
    counter = Counter(tiny_model)
    try:
        second = engine.new_state(images[1], SECOND, same_region)
        run(engine, [second])
    finally:
        counter.close()
    assert [b.box for b in second.blocks] == [b.box for b in first.blocks] and len(second.blocks) == 2
    assert second.cache_hits.count("prefix") == 2  # the coarse prefix, then the prefix through the region
    roi_end = second.blocks[1].end
    # Layer 0 ran the question after the coarse view, then only the question after the cached region.
    assert counter.layer0_tokens[1] == second.input_ids.numel() - roi_end
    reference = engine.new_state(images[1], SECOND, same_region)
    run(QZoomEngine(tiny_model, processor, name="tiny"), [reference])
    torch.testing.assert_close(second.next_logits, reference.next_logits, rtol=1e-5, atol=1e-5)
    assert second.answer_ids == reference.answer_ids
