"""The `zoom` tool as an OpenAI function in the Chat Completions and the Responses shapes: strict-valid, and equal
to the committed snapshots `tests/snapshots/openai_zoom_{chat,responses}.json`.

A snapshot change is an API change for every OpenAI caller: regenerate it deliberately with
``python -c "import json; from qzoom.tools.schema import openai_tool; print(json.dumps(openai_tool('chat'),
indent=2, sort_keys=True))" > tests/snapshots/openai_zoom_chat.json`` (and likewise for ``responses``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from qzoom.tools.schema import ZoomArgs, openai_tool

SNAPSHOTS = Path(__file__).parent / "snapshots"


@pytest.mark.parametrize("api", ["chat", "responses"])
def test_matches_committed_snapshot(api):
    expected = json.loads((SNAPSHOTS / f"openai_zoom_{api}.json").read_text())
    assert openai_tool(api) == expected  # type: ignore[arg-type]


def test_shapes_and_strict_validity():
    chat, responses = openai_tool("chat"), openai_tool("responses")
    assert chat["type"] == "function" and set(chat) == {"type", "function"}
    assert set(chat["function"]) == {"name", "description", "parameters", "strict"}
    assert set(responses) == {"type", "name", "description", "parameters", "strict"}  # flat
    assert chat["function"] == {k: v for k, v in responses.items() if k != "type"}
    for fn in (chat["function"], responses):
        assert fn["strict"] is True and re.fullmatch(r"[a-zA-Z0-9_-]{1,64}", fn["name"])
        assert fn["parameters"] == ZoomArgs.model_json_schema()  # strict as pydantic writes it
        assert fn["parameters"]["required"] == list(ZoomArgs.model_fields)


def test_a_strict_mode_call_validates_as_zoom_args():
    # In strict mode the model must send every property, null for the ones it does not use.
    sent = {"image_id": "abc", "image_data": None, "image_path": None, "query": None, "margin": None,
            "output_max_side": None, "box": {"coords": [0.1, 0.2, 0.3, 0.4], "frame": "unit",
                                            "resized_width": None, "resized_height": None}}  # fmt: skip
    args = ZoomArgs.model_validate(sent)
    assert args.box is not None and args.box.coords == [0.1, 0.2, 0.3, 0.4]
