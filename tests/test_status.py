"""`lorachain experiment --status`: cell states and the time left, read from a real tiny grid's folder."""

from __future__ import annotations

import json
import os
import shutil
import statistics
from pathlib import Path

import pytest
from test_experiment import grid

from lorachain.experiment.grid import collect
from lorachain.experiment.runner import run_experiment
from lorachain.experiment.status import cell_states, render, summary


@pytest.fixture
def ran(tmp_path, tiny_dir):
    """A tiny grid whose seed 0 has run (lora and cola at two lrs, 4 steps each); seed 1 planned."""
    run_experiment(grid(tmp_path, tiny_dir, seeds=[0]), progress=False)
    return grid(tmp_path, tiny_dir, seeds=[0, 1])


def cell_dir(cfg, cell_id: str) -> Path:
    return Path(cfg.output_dir) / "cells" / cell_id


def test_states_and_the_time_left_come_from_the_grid_folder(ran):
    done = {r["method"]: [] for r in collect(ran.output_dir)}
    for r in collect(ran.output_dir):
        done[r["method"]].append(r["cost"]["cell_seconds"])
    # seed 1 of cola at lr 0.01: killed after step 2 (its run folder kept, a cut last line)
    paused = cell_dir(ran, "toy_review/cola/seed1/lr0.01")
    shutil.copytree(cell_dir(ran, "toy_review/cola/seed0/lr0.01") / "run", paused / "run")
    metrics = paused / "run" / "metrics.jsonl"
    lines = [ln for ln in metrics.read_text().splitlines() if json.loads(ln).get("step", 0) <= 2]
    metrics.write_text("\n".join(lines) + '\n{"step": 3, "lo')
    # seed 1 of lora at lr 0.05: held by a live worker (this process)
    running = cell_dir(ran, "toy_review/lora/seed1/lr0.05")
    running.mkdir(parents=True)
    (running / "cell.lock").write_text(str(os.getpid()))

    states = {s.cell.id: s for s in cell_states(ran)}
    assert sum(s.state == "done" for s in states.values()) == 5  # zero-shot, lora x 2, cola x 2
    assert (states["toy_review/cola/seed1/lr0.01"].state, states["toy_review/cola/seed1/lr0.01"].step) == (
        "paused",
        2,
    )
    assert states["toy_review/cola/seed1/lr0.01"].steps == 4
    assert states["toy_review/lora/seed1/lr0.05"].state == "running"
    assert states["toy_review/lora/seed1/lr0.01"].state == "todo"

    s = summary(ran, "native")
    assert (s["cells"], s["done"], s["running"], s["paused"], s["todo"]) == (10, 5, 1, 1, 3)
    lora, cola = statistics.median(done["lora"]), statistics.median(done["cola"])
    assert s["methods"]["cola"]["cell_s"] == pytest.approx(cola)
    # left: lora 2 cells (one running at step 0), cola one whole cell and half of the paused one
    assert s["methods"]["lora"]["left_s"] == pytest.approx(2 * lora)
    assert s["methods"]["cola"]["left_s"] == pytest.approx(1.5 * cola)
    zero_shot = statistics.median(done["zero_shot"])  # a baseline: its own time, whatever the matmuls
    assert s["left_s"] == pytest.approx(2 * lora + 1.5 * cola + zero_shot)
    text = render(s)
    assert (
        "| cola | 2 | 0 | 1 | 1 |" in text and "paused: toy_review/cola/seed1/lr0.01 at step 2 of 4" in text
    )
    assert text.rstrip().endswith("with native matmuls.") and "5 of 10 cells done" in text


def test_a_dead_workers_lock_is_paused_and_other_matmuls_are_borrowed(ran):
    stale = cell_dir(ran, "toy_review/lora/seed1/lr0.01")
    (stale / "run").mkdir(parents=True)
    (stale / "cell.lock").write_text("999999999")  # no such process
    assert {s.cell.id: s.state for s in cell_states(ran)}["toy_review/lora/seed1/lr0.01"] == "paused"
    # a machine that emulates: no finished cell ran so, so nothing can be estimated
    s = summary(ran, "emulated")
    assert s["unestimated"] == 4 and "4 cells not estimated" in render(s)
    assert s["left_s"] == s["methods"]["zero_shot"]["left_s"] > 0
    # one cola cell marked emulated at twice its native seconds per step: cola's own figure; lora
    # borrows the emulated median step, scaled by how lora's native step compares with the grid's
    path = cell_dir(ran, "toy_review/cola/seed0/lr0.01") / "result.json"
    r = json.loads(path.read_text())
    r["spec"]["matmul"], r["cost"]["cell_seconds"] = "emulated", 2 * r["cost"]["cell_seconds"]
    path.write_text(json.dumps(r))
    s = summary(ran, "emulated")
    assert s["methods"]["cola"]["cell_s"] == pytest.approx(r["cost"]["cell_seconds"])
    assert not s["methods"]["cola"]["borrowed"] and s["methods"]["lora"]["borrowed"]
    native = [x for x in collect(ran.output_dir) if x.get("spec", {}).get("matmul", "native") == "native"]
    lora = statistics.median(x["cost"]["cell_seconds"] for x in native if x["method"] == "lora")
    grid_median = statistics.median(x["cost"]["cell_seconds"] for x in native if "ranks" in x["spec"])
    expected = r["cost"]["cell_seconds"] * lora / grid_median
    assert s["methods"]["lora"]["cell_s"] == pytest.approx(expected)
    assert "≈" in render(s)


def test_status_from_the_cli_runs_nothing(tmp_path, tiny_dir, capsys):
    import yaml

    from lorachain.cli import main

    cfg = grid(tmp_path, tiny_dir, seeds=[0])
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(json.loads(cfg.to_json())))
    assert main(["experiment", str(path), "--status"]) == 0
    out = capsys.readouterr().out
    assert "0 of 5 cells done" in out and "5 cells not estimated" in out
    assert not (Path(cfg.output_dir) / "cells").exists()  # read-only


def test_a_finished_grid_says_it_is_complete(ran, tmp_path, tiny_dir):
    done = grid(tmp_path, tiny_dir, seeds=[0])  # the same folder, planned without seed 1: all ran
    s = summary(done, "native")
    assert s["done"] == s["cells"] == 5
    text = render(s)
    assert text.endswith("All 5 cells done: the grid is complete.") and "core-hours left" not in text
    assert "5 of 10 cells done" in render(summary(ran, "native"))  # with seed 1 planned: not complete
