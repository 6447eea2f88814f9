"""`selector.gate`: route only where the answer side agrees, else answer with the mixed adapter.

The `likelihood` gate (issue 43, "do no harm"): after the selector has chosen a task adapter, the
instruction's mean per-token log-likelihood is scored under that adapter and under the mixed
adapter (one batched teacher-forced pass per adapter: they share the base, only the active LoRA
changes). The task adapter answers only when its score beats the mixed adapter's by more than
`selector.gate_margin` nats per token; otherwise the mixed adapter does. The margin is chosen on the
nested folds (`routing.eval.compare.choose_margin`), never on the lockbox.
"""

from __future__ import annotations

from lorachain.data import Example
from lorachain.training.evaluate import sequence_logprobs

GATES = ("none", "likelihood")
EVIDENCE = ("none", "validation")  # selector.evidence (routing.eval.evidence)
# A margin of infinity (the gate never lets a task adapter answer: every row to the mixed adapter)
# is written to JSON as this string: strict parsers reject `Infinity`. `margin_value` reads it back.
NEVER = "inf"


def margin_json(margin: float | None) -> float | str | None:
    """A margin as JSON can hold it: infinity as NEVER, anything else as is."""
    return NEVER if margin == float("inf") else margin


def margin_value(margin: float | str | None) -> float | None:
    """A margin read from JSON (`margin_json`'s output, or a number)."""
    if margin is None:
        return None
    return float("inf") if margin == NEVER else float(margin)


def gate_entry(kind: str, margin: float) -> dict:
    """The manifest's `selector.gate` entry ({} for no gate)."""
    return {} if kind == "none" else {"gate": {"kind": kind, "margin": margin}}


def instruction_logprobs(
    router, instructions: list, adapter: str | None, batch: int = 8
) -> list[tuple[float, int]]:
    """(summed log-prob, scored tokens) of each instruction's answer prompt under `adapter` (None:
    whatever is active), every prompt token after the first, as `router.answer_prompt` renders it."""
    seqs = [Example(ids, list(ids)) for ids in map(router.answer_prompt, instructions)]
    if adapter is not None:
        router.activate(adapter)
    return sequence_logprobs(router.model, seqs, router.tok.pad_token_id, batch)


def gain(candidate: tuple[float, int], mixed: tuple[float, int]) -> float:
    """Nats per token by which the candidate adapter finds the instruction likelier than mixed."""
    return (candidate[0] - mixed[0]) / max(candidate[1], 1)


def passes(candidate: tuple[float, int], mixed: tuple[float, int], margin: float) -> bool:
    """Whether the candidate adapter may answer: its gain over the mixed adapter exceeds `margin`."""
    return gain(candidate, mixed) > margin


def apply_gate(router, sels: list, instructions: list, fallback: str, margin: float) -> None:
    """Send each routed selection (adapter != `fallback`) back to `fallback` unless its adapter
    passes the likelihood gate; the reason is recorded in `sel.fallback`."""
    routed = [i for i, s in enumerate(sels) if s.adapter != fallback]
    if not routed:
        return
    base = dict(
        zip(routed, instruction_logprobs(router, [instructions[i] for i in routed], fallback), strict=True)
    )
    for name in dict.fromkeys(sels[i].adapter for i in routed):
        idx = [i for i in routed if sels[i].adapter == name]
        own = instruction_logprobs(router, [instructions[i] for i in idx], name)
        for i, lp in zip(idx, own, strict=True):
            g = gain(lp, base[i])
            if g <= margin:
                sels[i].adapter = fallback
                sels[
                    i
                ].fallback = f"gate: {name!r} gains {g:+.3f} nats/token over {fallback!r} <= margin {margin}"


def routes_of(selector: dict) -> set[str] | None:
    """The adapters a store's evidence lets answer (None: the store has no evidence rule)."""
    got = selector.get("evidence")
    return None if not got else set(got["routes"])


def apply_evidence(sels: list, routes: set[str], fallback: str) -> None:
    """Send each selection routed to an adapter without evidence back to `fallback`, saying why."""
    for s in sels:
        if s.adapter != fallback and s.adapter not in routes:
            s.fallback = f"evidence: {s.adapter!r} did not beat {fallback!r} on its validation rows"
            s.adapter = fallback
