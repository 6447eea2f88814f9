"""Choosing each row's next token: greedy or seeded sampling, OpenAI's penalties and logit bias,
and the log-probabilities a request asked for.

Log-probabilities are those of the model's own distribution (log-softmax of the raw logits), before
penalties, bias and temperature, as lm-eval's loglikelihood scoring expects.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch


@dataclass
class Sampling:
    """One request's decoding settings (the OpenAI fields of the same names)."""

    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None  # None: a fresh random seed per request
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's and k alternatives
    echo: bool = False  # also the prompt tokens' log-probabilities

    @property
    def plain(self) -> bool:
        """Greedy on the raw logits: the batched argmax is enough."""
        return self.temperature < 1e-4 and not self.logit_bias and not self.penalized

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty)

    def generator(self) -> torch.Generator:
        seed = self.seed if self.seed is not None else int(torch.seed() % (2**63))
        return torch.Generator().manual_seed(seed)


def adjusted(logits: torch.Tensor, s: Sampling, counts: Counter) -> torch.Tensor:
    """Penalties (OpenAI: minus count·frequency minus presence, over generated tokens) and bias."""
    logits = logits.float().clone()  # (V,)
    if s.penalized and counts:
        ids = torch.tensor(list(counts), dtype=torch.long)
        n = torch.tensor([counts[i] for i in counts], dtype=torch.float32)
        logits[ids] -= n * s.frequency_penalty + s.presence_penalty
    for token, bias in s.logit_bias.items():
        if 0 <= token < logits.shape[0]:
            logits[token] += bias
    return logits


def choose(logits: torch.Tensor, s: Sampling, counts: Counter, gen: torch.Generator) -> int:
    """The next token of one row from its logits (V,)."""
    logits = adjusted(logits, s, counts)
    if s.temperature < 1e-4:  # so low it is greedy (and logits / t would overflow)
        return int(logits.argmax())
    probs = torch.softmax(logits / s.temperature, dim=-1)
    if s.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < s.top_p  # the smallest set reaching top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=gen))


def token_logprob(logprobs: torch.Tensor, token: int, k: int) -> dict:
    """{"id", "logprob", "top": [(id, logprob), ...k]} for one position's log-softmax (V,)."""
    entry = {"id": token, "logprob": float(logprobs[token]), "top": []}
    if k > 0:
        values, ids = logprobs.topk(min(k, logprobs.shape[0]))
        entry["top"] = [(int(i), float(v)) for i, v in zip(ids, values, strict=True)]
    return entry


def prompt_logprobs(logits: torch.Tensor, ids: list[int], k: int) -> list[dict | None]:
    """Each prompt token's log-probability given the tokens before it; None for the first.
    `logits` (T, V) are the prompt positions' logits."""
    out: list[dict | None] = [None]
    if len(ids) < 2:
        return out
    lp = torch.log_softmax(logits[:-1].float(), dim=-1)  # (T-1, V): position t predicts t+1
    for t, token in enumerate(ids[1:]):
        out.append(token_logprob(lp[t], token, k))
    return out
