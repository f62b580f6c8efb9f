"""Checkpoints: our layout round-trips, the released (pre-4.52) layout loads to the same model and outputs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import MAX_PIXELS, MIN_PIXELS, make_tiny_model
from qzoom.agent import ask
from qzoom.checkpoint import CheckpointError, is_legacy_layout, load_model, save_checkpoint, weight_keys
from qzoom.engine import QZoomEngine
from qzoom.modeling import QZoomSettings
from qzoom.schemas import AskOptions

OPTS = AskOptions(force_zoom=True, roi_thresh=0.1, max_new_tokens=4, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)


def to_released_layout(directory) -> None:
    """Rewrite a qzoom checkpoint the way transformers 4.51 wrote the released Q-Zoom checkpoints."""
    weights = load_file(str(directory / "model.safetensors"))
    legacy = {}
    for key, value in weights.items():
        if key.startswith("model.visual."):
            legacy["visual." + key.removeprefix("model.visual.")] = value
        elif key.startswith("model.language_model."):
            legacy["model." + key.removeprefix("model.language_model.")] = value
        else:
            legacy[key] = value
    save_file(legacy, str(directory / "model.safetensors"), metadata={"format": "pt"})
    # The released configs are flat: text fields at the top level beside the Q-Zoom flags.
    config = json.loads((directory / "config.json").read_text())
    text = config.pop("text_config")
    rope = text.pop("rope_parameters")
    config.update({k: v for k, v in text.items() if k not in ("model_type", "architectures")})
    config["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
    config["rope_theta"] = rope["rope_theta"]
    (directory / "config.json").write_text(json.dumps(config))


@pytest.fixture
def saved(tmp_path, processor):
    model = make_tiny_model(seed=3)
    return model, save_checkpoint(model, processor, tmp_path / "ckpt")


def test_qzoom_checkpoint_round_trips_with_its_settings(saved):
    model, directory = saved
    config = json.loads((directory / "config.json").read_text())
    assert config["twig_K"] == 2 and config["enable_high_res"] is True and config["reuse_src_pos"] is True
    assert not is_legacy_layout(weight_keys(directory))
    loaded = load_model(directory)
    assert loaded.qzoom == model.qzoom
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_released_layout_loads_to_the_same_weights_and_answers(saved, images):
    model, directory = saved
    ours = QZoomEngine.from_pretrained(directory)
    expected = ask(ours, images[:2], ["What is written?", "hi"], OPTS)
    to_released_layout(directory)
    assert is_legacy_layout(weight_keys(directory))
    released = QZoomEngine.from_pretrained(directory)
    assert released.settings == QZoomSettings.from_config(model.config)
    reference = model.state_dict()
    for name, tensor in released.model.state_dict().items():
        assert torch.equal(tensor, reference[name]), name
    got = ask(released, images[:2], ["What is written?", "hi"], OPTS)
    assert [r.model_dump(exclude={"timings_ms", "model"}) for r in got] == [
        r.model_dump(exclude={"timings_ms", "model"}) for r in expected
    ]


def test_branch_initialisation_copies_the_layers_after_k():
    model = make_tiny_model(seed=1)
    model.init_branches_from_backbone()
    lm = model.model.language_model
    for i, layer in enumerate(lm.twig_layers):
        for (name, a), (_, b) in zip(layer.state_dict().items(), lm.layers[2 + i].state_dict().items(), strict=True):
            assert torch.equal(a, b), name


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({}, "no config.json"),
        ({"config.json": '{"model_type": "llama"}'}, "qwen2_5_vl"),
        ({"config.json": '{"model_type": "qwen2_5_vl"}'}, "no model.safetensors"),
    ],
)
def test_unloadable_directories_say_why(tmp_path, files, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(CheckpointError, match=message):
        load_model(tmp_path)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("twig_K", 9, "twig_K=9, twig_T=.* do not fit"),
        ("box_mode", "largest", "config.json box_mode must be one of union"),
    ],
)
def test_a_config_field_that_does_not_fit_names_the_checkpoint_and_the_field(saved, field, value, message):
    _, saved = saved
    config = json.loads((saved / "config.json").read_text())
    config[field] = value
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=f"{saved}: {message}"):
        load_model(saved)


def test_branch_points_must_fit_the_decoder():
    with pytest.raises(ValueError, match="do not fit"):
        make_tiny_model(twig_K=3, twig_T=2)
