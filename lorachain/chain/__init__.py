"""COLA, the residual chain of LoRA: tie a knot, extend the chain, place knots, export."""

from lorachain.chain.knot import Factors, Knot, KnotError, apply_factors, extend, tie_knot, total_delta
from lorachain.chain.policy import POLICIES, link_steps, make_policy, register

__all__ = [
    "POLICIES",
    "Factors",
    "Knot",
    "KnotError",
    "apply_factors",
    "extend",
    "link_steps",
    "make_policy",
    "register",
    "tie_knot",
    "total_delta",
]
