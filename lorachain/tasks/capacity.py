"""A capacity task after MoRA (Jiang et al. 2024): memorise N random key → value pairs.

The pairs are generated from a seed, so there is no data file: `k:3fa2=` → `9c0e41bd` with random
hex digits (the key and value lengths are set per grid). The loss is on the value only; the model is
scored on the training keys themselves, by greedy decoding (metric `char_em`): the share of value
characters right (`char_acc`, position by position) and of values right in full (`em`). A model that
knows the format but not the pairs writes the right number of hex digits and gets 1/16 of them right by
chance (`CHANCE`); a decoded value that is not hex digits of the right length loses only the
positions it gets wrong.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from lorachain.data import DataError
from lorachain.tasks.registry import TaskExample, register

HEX = "0123456789abcdef"
CHANCE = 1 / len(HEX)  # char_acc of a model that writes values of the right form at random


@dataclass(frozen=True)
class Spec:
    """How many pairs, how long their keys and values (hex digits), and the seed that draws them."""

    n: int = 1024
    key_len: int = 4
    value_len: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n", "key_len", "value_len"):
            if getattr(self, name) < 1:
                raise DataError(f"capacity.{name}: expected >= 1, got {getattr(self, name)}")
        if self.n > len(HEX) ** self.key_len:
            raise DataError(
                f"capacity.n: {self.n} pairs need distinct keys, but {self.key_len} hex digits give only "
                f"{len(HEX) ** self.key_len}; raise capacity.key_len"
            )


def pairs(spec: Spec) -> list[tuple[str, str]]:
    """`spec.n` (key, value) pairs with distinct keys, the same for the same spec."""
    rng = random.Random(spec.seed)
    keys = rng.sample(range(len(HEX) ** spec.key_len), spec.n)  # distinct, without building them all
    out = []
    for k in keys:
        key = "".join(HEX[(k // len(HEX) ** i) % len(HEX)] for i in reversed(range(spec.key_len)))
        value = "".join(rng.choice(HEX) for _ in range(spec.value_len))
        out.append((key, value))
    return out


def examples(spec: Spec) -> list[TaskExample]:
    """The pairs as generation examples: prompt `k:KEY=`, answer the value (the only trained tokens)."""
    return [TaskExample(f"k:{key}=", answers=[value]) for key, value in pairs(spec)]


@register("capacity", metric="char_em", kind="generation", memorise=True)
def load(spec: dict | Spec) -> list[TaskExample]:
    """The task's examples from a spec mapping (`n`, `key_len`, `value_len`, `seed`)."""
    if isinstance(spec, dict):
        unknown = sorted(set(spec) - {"n", "key_len", "value_len", "seed"})
        if unknown:
            raise DataError(f"capacity.{unknown[0]}: unknown key; expected n, key_len, value_len, seed")
        spec = Spec(**spec)
    return examples(spec)
