"""What a grid cell records besides its scores: how its links start and learn, and its curve."""

from __future__ import annotations

import json
from pathlib import Path

from lorachain.config import RunConfig

# spec keys (`link_kind`, and ReLoRA's restarts) that make a cell a peer of LoRA rather than LoRA
PEER_KEYS = frozenset({"init", "dora", "rslora", "loraplus", "restart_per_link"})


def link_kind(run_cfg: RunConfig) -> dict:
    """How a cell's links start and learn, where not the default (absent keys keep old cells' specs)."""
    c, out = run_cfg.chain, {}
    inits = {c.link_init(i) for i in range(len(c.links))}
    if inits != {"gaussian"} and c.method == "lora":
        out["init"] = "+".join(sorted(inits))
    if c.use_dora:
        out["dora"] = True
    if c.use_rslora:
        out["rslora"] = True
    if run_cfg.optim.loraplus_lr_ratio:
        out["loraplus"] = run_cfg.optim.loraplus_lr_ratio
    return out


def curve(metrics: Path) -> list[dict]:
    """The run's evaluations during training (`train.eval_every`), one row per step, in order."""
    if not metrics.is_file():
        return []
    rows = (json.loads(line) for line in metrics.read_text().splitlines() if line.strip())
    return [{"step": r["step"], **r["eval"]} for r in rows if "eval" in r]
