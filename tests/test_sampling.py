"""Sampling in the decode step (`qzoom.sampling`): temperature 0 is the greedy decode bit for bit, a seed makes a
request's draws reproducible whether it is decoded alone or batched beside others, top-p narrows the draws."""

from __future__ import annotations

import pytest
import torch

from conftest import MAX_PIXELS, MIN_PIXELS
from qzoom.agent import run
from qzoom.engine import QZoomEngine, SequenceState
from qzoom.sampling import Sampler, choose_tokens
from qzoom.schemas import AskOptions

BUDGET = {"min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS, "force_zoom": False, "max_new_tokens": 8}


def answer_ids(engine: QZoomEngine, images, options: list[AskOptions]) -> list[list[int]]:
    states: list[SequenceState] = [
        engine.new_state(img, "What is written?", o) for img, o in zip(images, options, strict=True)
    ]
    run(engine, states)
    return [st.answer_ids for st in states]


def test_temperature_zero_is_the_greedy_decode_bit_for_bit(engine, images):
    greedy = answer_ids(engine, images[:2], [AskOptions(**BUDGET)] * 2)
    zero = answer_ids(engine, images[:2], [AskOptions(temperature=0, top_p=0.5, seed=1, **BUDGET)] * 2)
    assert zero == greedy
    assert engine.new_state(images[0], "q", AskOptions(temperature=0)).sampler is None


def test_a_seed_reproduces_its_draws_alone_and_in_a_batch(engine, images):
    hot = AskOptions(temperature=1.5, seed=11, **BUDGET)
    alone = answer_ids(engine, images[:1], [hot])[0]
    assert answer_ids(engine, images[:1], [hot])[0] == alone
    batched = answer_ids(engine, images[:3], [AskOptions(**BUDGET), hot, AskOptions(temperature=1.0, seed=2, **BUDGET)])
    assert answer_ids(engine, [images[1]], [hot])[0] == batched[1]
    greedy = answer_ids(engine, images[:1], [AskOptions(**BUDGET)])[0]
    draws = {
        tuple(answer_ids(engine, images[:1], [AskOptions(temperature=1.5, seed=s, **BUDGET)])[0]) for s in range(4)
    }
    assert len(draws | {tuple(greedy)}) > 1  # sampling really leaves the greedy path


def test_top_p_keeps_the_nucleus_and_the_top_token_always():
    logits = torch.tensor([[4.0, 3.0, 0.0, -1.0], [0.0, 0.0, 9.0, 0.0]])
    narrow = [Sampler(temperature=1.0, top_p=0.5, seed=s) for s in range(20)]
    # Row 0: p(token 0) ≈ 0.71 ≥ 0.5, so the nucleus is token 0 alone.
    assert {int(choose_tokens(logits.clone(), [s, None])[0]) for s in narrow} == {0}
    wide = [Sampler(temperature=1.0, top_p=0.99, seed=s) for s in range(40)]
    assert {int(choose_tokens(logits.clone(), [s, None])[0]) for s in wide} >= {0, 1}
    assert int(choose_tokens(logits.clone(), [wide[0], None])[1]) == 2  # a greedy row beside a sampled one


@pytest.mark.parametrize(("temperature", "top_p"), [(-0.1, 1.0), (1.0, 0.0), (1.0, 1.5)])
def test_bad_sampling_settings_are_refused(temperature, top_p):
    with pytest.raises(ValueError, match="temperature"):
        Sampler(temperature=temperature, top_p=top_p)
