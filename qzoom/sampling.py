"""Choosing the next token of each sequence in a decoding batch: greedy, or sampled with temperature and top-p.

`choose_tokens(logits, samplers)` takes the batch's next-token logits (B, vocab) and one `Sampler` (or None) per row.
A row without a sampler, or with temperature 0, takes the argmax: exactly the greedy token the engine chose before
sampling existed, so greedy answers stay bit-identical. A sampling row draws from softmax(logits / temperature),
restricted to the smallest set of tokens whose probability reaches `top_p` (nucleus sampling), with the row's own
`torch.Generator`: a request's draws depend on its seed alone, not on the other requests batched beside it, so the
same seed gives the same tokens (up to the float noise a different batch can put in the logits themselves).

Draws run on the CPU: one CPU generator per request makes a seed mean the same thing on every device.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import torch

Tensor = torch.Tensor


@dataclass
class Sampler:
    """One request's sampling settings and its random stream (seeded once, advanced by every draw)."""

    temperature: float
    top_p: float = 1.0
    seed: int | None = None
    generator: torch.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"temperature must be >= 0 and top_p in (0, 1]; got {self.temperature}, {self.top_p}")
        # No seed: a fresh random one, so unseeded requests differ from each other as users expect.
        seed = self.seed if self.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator(device="cpu").manual_seed(seed)

    def draw(self, logits: Tensor) -> int:
        """One token id from a row of logits (vocab,)."""
        probs = torch.softmax(logits.detach().float().cpu() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            # Keep a token while the mass before it is below top_p: the first token is always kept.
            keep = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) < self.top_p
            sorted_probs = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
            return int(order[torch.multinomial(sorted_probs, 1, generator=self.generator)])
        return int(torch.multinomial(probs, 1, generator=self.generator))


def choose_tokens(logits: Tensor, samplers: list[Sampler | None]) -> Tensor:
    """The next token per row of `logits` (B, vocab): argmax, or a draw where the row's sampler has temperature > 0."""
    next_ids = logits.argmax(dim=-1)
    for i, sampler in enumerate(samplers):
        if sampler is not None and sampler.temperature > 0:
            next_ids[i] = sampler.draw(logits[i])
    return next_ids
