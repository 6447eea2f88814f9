"""Knot placement: where in the one fixed budget each link ends.

A small registry of policies. `fixed` ties knots at the links' shares (the paper's Algorithm 1).
`auto` ties a knot when the smoothed training loss stops improving (the paper's future work), within
the chain's maximum length; the last link always runs to the end of the budget.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

from lorachain.config import ChainConfig, ConfigError, LinkConfig


class KnotPolicy(Protocol):
    def should_tie(self, step: int, link: int, link_start: int, loss: float) -> str | None:
        """After optimizer step `step` (1-based count), a reason to tie a knot now, or None."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


POLICIES: dict[str, Callable[[ChainConfig, int, int], KnotPolicy]] = {}


def register(name: str):
    """Register a policy factory `(chain, total_steps, steps_per_epoch) -> KnotPolicy`."""

    def deco(factory):
        if name in POLICIES:
            raise ValueError(f"knot policy {name!r} is already registered")
        POLICIES[name] = factory
        return factory

    return deco


def make_policy(chain: ChainConfig, total_steps: int, steps_per_epoch: int) -> KnotPolicy:
    if chain.knot.policy not in POLICIES:
        raise ConfigError(f"chain.knot.policy: expected one of {sorted(POLICIES)}, got {chain.knot.policy!r}")
    return POLICIES[chain.knot.policy](chain, total_steps, steps_per_epoch)


def link_steps(links: list[LinkConfig], total: int, steps_per_epoch: int) -> list[int]:
    """Each link's number of optimizer steps; they must add up to the whole budget."""
    fixed = []
    for link in links:
        if link.steps is not None:
            fixed.append(link.steps)
        elif link.epochs is not None:
            fixed.append(round(link.epochs * steps_per_epoch))
        elif link.fraction is not None:
            fixed.append(round(link.fraction * total))
        else:
            fixed.append(None)
    free = [i for i, s in enumerate(fixed) if s is None]
    left = total - sum(s for s in fixed if s is not None)
    for k, i in enumerate(free):
        fixed[i] = left // len(free) + (1 if k < left % len(free) else 0)
    if any(s <= 0 for s in fixed) or sum(fixed) != total:
        raise ConfigError(
            f"chain.links: the links' shares give {fixed} steps, which must be positive and add up "
            f"to the budget of {total} steps"
        )
    return fixed


@register("fixed")
class FixedKnots:
    """Knots at the end of every link's share (cumulative step boundaries)."""

    def __init__(self, chain: ChainConfig, total: int, steps_per_epoch: int) -> None:
        sizes = link_steps(chain.links, total, steps_per_epoch)
        self.ends = [sum(sizes[: i + 1]) for i in range(len(sizes))]

    def should_tie(self, step: int, link: int, link_start: int, loss: float) -> str | None:
        if step == self.ends[link]:
            return f"fixed: link {link} share of {step - link_start} steps done"
        return None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@register("auto")
class PlateauKnots:
    """Tie a knot when the EMA of the training loss has not improved by `min_delta` (relative)
    for `window` steps, after at least `min_link_steps` steps in the link."""

    def __init__(self, chain: ChainConfig, total: int, steps_per_epoch: int) -> None:
        k = chain.knot
        self.max_links, self.total = len(chain.links), total
        self.window, self.min_delta = k.window, k.min_delta
        self.smoothing, self.min_link_steps = k.smoothing, k.min_link_steps
        self.reset()

    def reset(self) -> None:
        self.ema, self.best, self.since_best = math.nan, math.inf, 0

    def should_tie(self, step: int, link: int, link_start: int, loss: float) -> str | None:
        s = self.smoothing
        self.ema = loss if math.isnan(self.ema) else s * self.ema + (1 - s) * loss
        if self.ema < self.best * (1 - self.min_delta):
            self.best, self.since_best = self.ema, 0
        else:
            self.since_best += 1
        if link >= self.max_links - 1 or step >= self.total:
            return None
        if step - link_start >= self.min_link_steps and self.since_best >= self.window:
            reason = (
                f"auto: smoothed loss {self.ema:.4f} did not improve by {self.min_delta:.1%} "
                f"for {self.since_best} steps"
            )
            self.reset()
            return reason
        return None

    def state_dict(self) -> dict:
        return {"ema": self.ema, "best": self.best, "since_best": self.since_best}

    def load_state_dict(self, state: dict) -> None:
        self.ema, self.best, self.since_best = state["ema"], state["best"], state["since_best"]
