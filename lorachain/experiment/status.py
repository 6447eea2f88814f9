"""`lorachain experiment CONFIG --status`: where a grid stands and what is left, without running it.

Each planned cell is done (its result.json), running (its lock is held by a live process), paused
(a run folder without a live lock: a later `lorachain experiment` resumes it from its checkpoint) or
to do. A started cell's progress is the last step in its run's metrics.jsonl. The time left is
estimated from the finished cells: per method, the median cell seconds of its cells that ran with the
same matmul kind this machine will use (native or emulated low precision); a method with none
borrows the median step of every such cell, times its planned steps and how much slower than the
grid's median step it ran with the other kind. Read-only: nothing is written.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from lorachain.experiment.config import ExperimentConfig
from lorachain.experiment.grid import collect, lock_holder
from lorachain.experiment.runner import Cell, plan, run_config
from lorachain.training.resume import metrics_row


@dataclass
class CellState:
    cell: Cell
    state: str  # done | running | paused | todo
    step: int = 0  # last logged training step of a started cell
    steps: int = 0  # its planned steps (0 when unknown)


def _last_step(metrics: Path) -> int:
    if not metrics.is_file():
        return 0
    rows = (metrics_row(line) for line in reversed(metrics.read_text().splitlines()))
    return next((int(row["step"]) for row in rows if row), 0)  # past a line cut by a kill


def planned_steps(cfg: ExperimentConfig, cell: Cell) -> int:
    """The optimizer steps a training cell is planned for, as the loop counts them (0: a baseline)."""
    from lorachain.data.batching import steps_per_epoch
    from lorachain.tasks import get_task

    m = cfg.methods[cell.method]
    if m.get("baseline"):
        return 0
    t = run_config(cfg, cell, get_task(cell.task), Path(cfg.output_dir)).train
    spe = steps_per_epoch(m.get("n_train", cfg.n_train), t.batch_size, t.grad_accum)
    return t.max_steps or max(1, round((t.epochs or 1) * spe))


def cell_states(cfg: ExperimentConfig) -> list[CellState]:
    out, planned = [], {}
    for cell in plan(cfg):
        folder = Path(cfg.output_dir) / "cells" / cell.id
        if cell.method not in planned:  # the same for every cell of a method
            planned[cell.method] = planned_steps(cfg, cell)
        steps = planned[cell.method]
        if (folder / "result.json").is_file():
            out.append(CellState(cell, "done", steps, steps))
            continue
        step = _last_step(folder / "run" / "metrics.jsonl")
        if lock_holder(folder / "cell.lock") is not None:
            out.append(CellState(cell, "running", step, steps))
        elif (folder / "run").is_dir():
            out.append(CellState(cell, "paused", step, steps))
        else:
            out.append(CellState(cell, "todo", 0, steps))
    return out


def estimate(cfg: ExperimentConfig, states: list[CellState], matmul: str) -> dict[str, tuple[float, bool]]:
    """Seconds per cell of each method on a machine whose low-precision matmuls are `matmul`, and
    whether the figure is borrowed (no finished cell of that method with that matmul kind)."""
    steps = {s.cell.method: s.steps for s in states}
    results = collect(cfg.output_dir)
    done = [r for r in results if steps.get(r["method"])]  # training cells

    def kind(r: dict) -> str:
        return r.get("spec", {}).get("matmul", "native")

    def per_step(rows: list[dict]) -> float | None:
        xs = [r["cost"]["cell_seconds"] / steps[r["method"]] for r in rows]
        return statistics.median(xs) if xs else None

    base = per_step([r for r in done if kind(r) == matmul])
    out: dict[str, tuple[float, bool]] = {}
    for m in cfg.methods:
        own = [r["cost"]["cell_seconds"] for r in results if r["method"] == m and kind(r) == matmul]
        anykind = [r["cost"]["cell_seconds"] for r in results if r["method"] == m]
        if own:
            out[m] = (statistics.median(own), False)
        elif not steps.get(m) and anykind:  # a baseline: no training, its own time wherever it ran
            out[m] = (statistics.median(anykind), False)
        elif base is not None and steps.get(m):
            other = [r for r in done if r["method"] == m]  # its cells of the other kind, if any:
            scale = 1.0  # how much slower than the grid's median step it ran there
            if other:
                scale = per_step(other) / per_step([r for r in done if kind(r) == kind(other[0])])
            out[m] = (base * scale * steps[m], True)
    return out


def summary(cfg: ExperimentConfig, matmul: str) -> dict:
    """Counts, each method's row and the time left (None where nothing has finished to go by)."""
    states = cell_states(cfg)
    per_cell = estimate(cfg, states, matmul)
    rows, left, unknown = {}, 0.0, 0
    for s in states:
        empty = {"done": 0, "running": 0, "paused": 0, "todo": 0, "left_s": 0.0}
        row = rows.setdefault(s.cell.method, empty)
        row[s.state] += 1
        if s.state == "done":
            continue
        if s.cell.method not in per_cell:
            unknown += 1
            continue
        est = per_cell[s.cell.method][0]
        share = 1 - min(s.step, s.steps) / s.steps if s.steps else 1.0
        row["left_s"] += est * share
        left += est * share
    for m, row in rows.items():
        row["cell_s"], row["borrowed"] = per_cell.get(m, (None, False))
    counts = {k: sum(s.state == k for s in states) for k in ("done", "running", "paused", "todo")}
    started = [s for s in states if s.state in ("running", "paused")]
    return {
        "cells": len(states),
        **counts,
        "methods": rows,
        "left_s": left,
        "unestimated": unknown,
        "started": started,
        "matmul": matmul,
    }


def render(s: dict) -> str:
    head = ["method", "done", "running", "paused", "to do", "s per cell", "hours left"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, r in s["methods"].items():
        per = "–" if r["cell_s"] is None else f"{'≈' * r['borrowed']}{r['cell_s']:,.0f}"
        row = [m, r["done"], r["running"], r["paused"], r["todo"], per, f"{r['left_s'] / 3600:.1f}"]
        lines.append("| " + " | ".join(str(x) for x in row) + " |")
    lines.append("")
    lines += [f"{st.state}: {st.cell.id} at step {st.step} of {st.steps or '?'}" for st in s["started"]]
    if s["done"] == s["cells"]:
        return "\n".join(lines) + f"\nAll {s['cells']} cells done: the grid is complete."
    hours, workers = s["left_s"] / 3600, max(1, s["running"])
    tail = f"{s['done']} of {s['cells']} cells done; about {hours:.1f} core-hours left"
    tail += f" (~{hours / workers:.1f} h with {workers} worker{'s' * (workers > 1)})"
    tail += f", from the finished cells' times with {s['matmul']} matmuls"
    if any(r["borrowed"] for r in s["methods"].values()):
        tail += (
            " (≈: none of the method's cells ran with them; the grid's median step, scaled by the method's"
        )
        tail += " own time on the other kind where it has one)"
    if s["unestimated"]:
        tail += f"; {s['unestimated']} cells not estimated (no finished cell to go by)"
    return "\n".join(lines) + "\n" + tail + "."
