"""What a run's checkpoint holds, and how it is written and read back.

A checkpoint is one `checkpoint.pt` in the run folder, written atomically every `save_every` steps,
at each knot and on a stop: the step, the link and where it started, the knots tied so far (their
factors, so the base can be rebuilt exactly), the per-link summary rows, the live link's trainable
weights, the optimizer, the knot policy's state, the RNG and the grad scaler. The loop
(`training/loop.py`) rebuilds the model from it; this module only knows the format.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorachain.chain.knot import Knot
from lorachain.io import atomic_write, write_text

CHECKPOINT = "checkpoint.pt"


@dataclass
class State:
    """Everything a checkpoint holds besides the model and optimizer."""

    step: int = 0
    link: int = 0
    link_start: int = 0
    knots: list[Knot] = field(default_factory=list)
    links: list[dict] = field(default_factory=list)  # per-link summary rows


def save(out: Path, st: State, trainable: dict, optimizer, policy, scaler, base: str | None = None) -> None:
    """Write `out/checkpoint.pt` atomically (a kill mid-write leaves the previous one); `base` names
    the folder of the knotted base saved with it (`base_checkpoint.py`), if any."""
    state = {
        "step": st.step,
        "link": st.link,
        "link_start": st.link_start,
        "knots": [k.to_state() for k in st.knots],
        "links": json.dumps(st.links),
        "trainable": trainable,
        "optimizer": optimizer.state_dict(),
        "policy": json.dumps(policy.state_dict()),
        "rng": torch.get_rng_state(),
        "scaler": scaler.state_dict() if scaler else {},
        "base": base,
    }
    atomic_write(out / CHECKPOINT, lambda tmp: torch.save(state, tmp))


def load(out: Path) -> tuple[State, dict] | None:
    """The State and the raw checkpoint (weights, optimizer, policy, rng, scaler); None if none."""
    path = out / CHECKPOINT
    if not path.is_file():
        return None
    ck = torch.load(path, weights_only=True)
    knots = [Knot.from_state(k) for k in ck["knots"]]
    return State(ck["step"], ck["link"], ck["link_start"], knots, json.loads(ck["links"])), ck


def trim_metrics(out: Path, step: int) -> None:
    """Drop metrics.jsonl rows past `step` (written after the checkpoint a resume starts from).

    A row cut short by a kill mid-write is dropped too: it was written after the checkpoint.
    """
    path = out / "metrics.jsonl"
    if path.is_file():
        keep = [
            ln for ln in path.read_text().splitlines() if (row := metrics_row(ln)) and row["step"] <= step
        ]
        write_text(path, "".join(ln + "\n" for ln in keep))


def metrics_row(line: str) -> dict | None:
    """One metrics.jsonl row, or None for a line that is not one (empty, or cut by a kill mid-write)."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) and "step" in row else None


def clear(out: Path) -> None:
    """A fresh start: drop what a run killed before its first checkpoint wrote."""
    trim_metrics(out, 0)
    shutil.rmtree(out / "tb", ignore_errors=True)
