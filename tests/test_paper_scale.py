"""`qzoom bench paper-scale`: the real Qwen2.5-VL-7B configuration, and the whole benchmark on its --small model on a
CPU (the path a GPU run takes, in seconds)."""

from __future__ import annotations

from typer.testing import CliRunner

from qzoom.cli import app
from qzoom.evals.paper_scale import QWEN25_7B, paper_config, run_paper_scale


def test_the_7b_configuration_is_qwen25_vl_7b():
    config = paper_config(QWEN25_7B)
    text, vision = config.text_config, config.vision_config
    assert (text.hidden_size, text.num_hidden_layers, text.intermediate_size) == (3584, 28, 18944)
    assert (text.num_attention_heads, text.num_key_value_heads) == (28, 4)
    assert text.hidden_size // text.num_attention_heads == 128
    assert text.vocab_size == 152064
    assert text.rope_parameters["mrope_section"] == [16, 24, 24]
    assert (vision.depth, vision.hidden_size, vision.num_heads, vision.intermediate_size) == (32, 1280, 16, 3420)
    assert vision.fullatt_block_indexes == [7, 15, 23, 31]
    assert (config.twig_K, config.twig_T) == (18, 3)


def test_small_run_measures_every_ratio_on_cpu():
    lines: list[str] = []
    ratios = run_paper_scale(small=True, batches=(2,), repeats=1, new_tokens=2, echo=lines.append)
    text = "\n".join(lines)
    assert "device cpu" in text and "dtype float32" in text and "torch threads" in text
    for batch in (2,):
        assert ratios[f"b{batch}_baseline@256"] == 1.0
        assert ratios[f"b{batch}_qzoom@36 zoomed"] > 0 and ratios[f"b{batch}_qzoom@36 gate closed"] > 0
    assert ratios["gate_closed_vs_stock"] > 0 and ratios["kv_reuse_vs_recompute"] > 0


def test_bad_dtype_is_one_line_exit_2():
    res = CliRunner().invoke(app, ["bench", "paper-scale", "--small", "--dtype", "int8"])
    assert res.exit_code == 2 and "floating-point" in res.output and "Traceback" not in res.output
