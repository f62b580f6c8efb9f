"""A chat about images that the one-image Q-Zoom graph cannot hold: several images, tool results carrying images,
the function calls of client tools. Runs on the engine's append-only sequence, like the thinking-with-images loop.

    reply = await converse(worker, image, text, later_turns, options=..., system_prompt=..., max_new_tokens=64)

The sequence opens the way every qzoom request does (`QZoomEngine.new_state`: the system prompt, then a user turn
holding `image` and `text`); that prefix goes through every layer once (`observe` + `finish`, the coarse view's
features from the feature cache). Each later `ChatTurn` is then appended in the Qwen chat template's own format
(`QZoomEngine.append`): user turns with their images, assistant turns as written (function calls in Hermes
`<tool_call>` form), and a run of tool results as one user turn of `<tool_response>` blocks, images inside (the
template's layout; OpenAI-style servers refuse images in tool results, this does not). The reply is generated on
top (greedy, or sampled when the options ask), ending at a stop token, one of `stop`, or `max_new_tokens`.

Zooming is the client's here (a tool it runs, results sent back as tool turns); the gate and SD-RPN do not run.
A scripted `Policy` (`agent.thinking`'s seam) may write the reply instead of the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from PIL import Image

from qzoom.agent.thinking import Policy
from qzoom.engine import ImagePiece, SequenceState
from qzoom.schemas import AskOptions, check_prompt_text
from qzoom.worker import Worker

Role = Literal["user", "assistant", "tool"]


@dataclass
class ChatTurn:
    """One message after the opening one: its role and its text and images, in order."""

    role: Role
    parts: list[str | Image.Image] = field(default_factory=list)


@dataclass
class Conversation:
    reply: str  # what the model wrote (stop strings kept; stop tokens dropped)
    prompt_tokens: int  # the sequence the reply was conditioned on, image tokens included
    completion_tokens: int  # tokens of the reply
    state: SequenceState


def _pieces(parts: Sequence[str | Image.Image], field_name: str) -> list[str | ImagePiece]:
    out: list[str | ImagePiece] = []
    for part in parts:
        if isinstance(part, str):
            check_prompt_text(part, field_name)
            out.append(part)
        else:
            out.append(ImagePiece(part, None))
    return out


def render_turns(turns: Sequence[ChatTurn]) -> list[str | ImagePiece]:
    """The text and images to append after the opening prompt (which ends in an open assistant turn), ending in a
    new open assistant turn. Raises `PromptTextError` when caller text holds a chat control token."""
    out: list[str | ImagePiece] = []
    open_assistant = True  # the opening prompt ends with "<|im_start|>assistant\n"
    i = 0
    while i < len(turns):
        turn = turns[i]
        if turn.role == "assistant":
            if not open_assistant:
                out.append("<|im_start|>assistant\n")
            out += [*_pieces(turn.parts, "messages.assistant"), "<|im_end|>\n"]
            open_assistant = False
            i += 1
            continue
        if open_assistant:
            out.append("<|im_end|>\n")  # an empty assistant turn between two user turns
            open_assistant = False
        if turn.role == "user":
            out += ["<|im_start|>user\n", *_pieces(turn.parts, "messages.user"), "<|im_end|>\n"]
            i += 1
            continue
        # A run of tool results is one user turn of <tool_response> blocks (the Qwen2.5 / Qwen3 chat templates).
        out.append("<|im_start|>user")
        while i < len(turns) and turns[i].role == "tool":
            out += ["\n<tool_response>\n", *_pieces(turns[i].parts, "messages.tool"), "\n</tool_response>"]
            i += 1
        out.append("<|im_end|>\n")
    if not open_assistant:
        out.append("<|im_start|>assistant\n")
    return out


async def converse(
    worker: Worker,
    image: Image.Image,
    text: str,
    later: Sequence[ChatTurn],
    *,
    options: AskOptions | None = None,
    system_prompt: str | None = None,
    stop: Sequence[str] = (),
    max_new_tokens: int = 32,
    policy: Policy | None = None,
) -> Conversation:
    """The assistant's next reply to the conversation; see the module docstring. Raises `Overloaded` at once when
    the worker is full, `PromptTextError` for caller text holding a control token."""
    pieces = render_turns(later)
    with worker.admit():
        seq = worker.engine.new_state(image, text, options, system_prompt)
        await worker.call("observe", seq)
        await worker.call("finish", seq)
        if pieces:
            await worker.call("append", seq, pieces)
        prompt_tokens = int(seq.input_ids.numel())
        tokenizer = worker.engine.processor.tokenizer
        if policy is not None:
            reply = policy(1, tokenizer.decode(seq.input_ids.tolist()))
            completion_tokens = len(tokenizer(reply, add_special_tokens=False)["input_ids"])
        else:
            reply = str(await worker.call("generate", seq, (tuple(stop), max_new_tokens)))
            completion_tokens = len(seq.answer_ids)
    return Conversation(reply, prompt_tokens, completion_tokens, seq)
