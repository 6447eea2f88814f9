"""benchmarks/scale.py's headline figures from its cells: peak RSS, knot time and error, the ratios
(NF4/bf16, checkpointing, packing, lorachain/Trainer)."""

from __future__ import annotations

SPEC_KEYS = (
    "kind",
    "size",
    "base",
    "ckpt",
    "method",
    "seq",
    "batch",
    "steps",
    "knot",
    "packing",
    "max_steps",
)


def spec_of(cell: dict) -> dict:
    return {k: cell.get(k) for k in SPEC_KEYS}


def pick(results: list[dict], **match) -> dict | None:
    found = [r for r in results if all(r.get(k) == v for k, v in match.items()) and "error" not in r]
    return found[0] if found else None


def ratio(a: dict | None, b: dict | None, key: str) -> float | None:
    return a[key] / b[key] if a and b else None


def summarise(results: list[dict]) -> dict:
    def lc(**m):
        return pick(results, kind="lorachain", **m)

    seven = lc(size="7b", base="nf4", method="cola")
    pairs = []
    for size, base, ckpt, seq in (
        ("135m", "bf16", False, 128),
        ("135m", "nf4", True, 128),
        ("1b", "nf4", True, 128),
    ):
        ours = lc(size=size, base=base, ckpt=ckpt, method="lora", seq=seq)
        peer = pick(results, kind="trainer", size=size, base=base, ckpt=ckpt)
        if ours and peer:
            pairs.append(
                {
                    "size": size,
                    "base": base,
                    "step_time_ratio": ratio(ours, peer, "cpu_seconds_per_step"),
                    "rss_ratio": ratio(ours, peer, "peak_rss_gib"),
                }
            )
    packed, padded = pick(results, kind="packing", packing=True), pick(results, kind="packing", packing=False)
    return {
        "peak_rss_gib_7b_nf4_cola": seven and seven["peak_rss_gib"],
        "knot_seconds_7b": seven and seven["knot_seconds"],
        "rss_ratio_nf4_vs_bf16_1b": ratio(
            lc(size="1b", base="nf4"), lc(size="1b", base="bf16"), "peak_rss_gib"
        ),
        "grad_ckpt_rss_ratio_1024": ratio(lc(seq=1024, ckpt=True), lc(seq=1024, ckpt=False), "peak_rss_gib"),
        "grad_ckpt_step_time_ratio_1024": ratio(
            lc(seq=1024, ckpt=True), lc(seq=1024, ckpt=False), "seconds_per_step"
        ),
        "packing_tokens_per_s_ratio": ratio(packed, padded, "tokens_per_s"),
        "knot_rel_fro_nf4_side_135m": (lc(size="135m", method="cola", knot=None) or {}).get("knot_rel_fro"),
        "knot_rel_fro_nf4_requantize_135m": (lc(size="135m", knot="requantize") or {}).get("knot_rel_fro"),
        "sst2_accuracy": {
            b: (pick(results, kind="accuracy", base=b) or {}).get("accuracy") for b in ("fp32", "bf16", "nf4")
        },
        "packing_first_step_loss": packed and padded and [padded["first_loss"], packed["first_loss"]],
        "lorachain_vs_trainer_step_time_ratio": max((p["step_time_ratio"] for p in pairs), default=None),
        "lorachain_vs_trainer": pairs,
    }
