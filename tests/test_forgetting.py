"""Forgetting figures of an experiment cell: the general set's reference NLL and an unrelated task's
score, each against the base model measured once per grid."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import write_jsonl
from test_experiment import grid

from lorachain.config import ConfigError
from lorachain.data import DataError
from lorachain.experiment.forgetting import change, general_examples
from lorachain.experiment.grid import collect
from lorachain.experiment.runner import run_experiment

WORDS = [("good", "closed_book_qa"), ("bad", "closed_book_qa"), ("great", "summarization")]
WORDS += [("dull", "summarization"), ("fine", "sentiment")]
GENERAL = [
    {"instruction": f"Review : {w} film", "output": "positive" if i % 2 else "negative", "task": t}
    for i, (w, t) in enumerate(WORDS * 4)
]


def test_general_examples_are_fixed_and_exclude_other_types(tmp_path):
    path = write_jsonl(tmp_path / "mix.jsonl", GENERAL)
    a = general_examples(path, ["closed_book_qa", "summarization"], 6)
    b = general_examples(path, ["closed_book_qa", "summarization"], 6)
    assert [e.prompt for e in a] == [e.prompt for e in b] and len(a) == 6
    assert all("fine" not in e.prompt for e in a)  # the sentiment rows are not in the set
    assert sum("good" in e.prompt or "bad" in e.prompt for e in a) == 3  # drawn evenly over the types
    with pytest.raises(DataError, match="no rows of task type"):
        general_examples(path, ["topic_classification"], 4)


def test_change_is_after_minus_before():
    got = change({"general_nll": 2.5, "task_score": 0.6}, {"general_nll": 2.0, "task_score": 0.7})
    assert got == pytest.approx({"general_nll_increase": 0.5, "task_score_drop": 0.1})


def test_every_cell_records_what_it_forgot(tmp_path, tiny_dir):
    general = write_jsonl(tmp_path / "mix.jsonl", GENERAL)
    cfg = grid(
        tmp_path,
        tiny_dir,
        seeds=[0],
        lrs=[0.05],
        forgetting={
            "general": str(general),
            "general_tasks": ["closed_book_qa", "summarization"],
            "n_general": 8,
            "task": "toy_review",
            "n_task": 10,
        },
    )
    run_experiment(cfg, progress=False)
    base = json.loads((Path(cfg.output_dir) / "base_forgetting.json").read_text())
    assert base["general_rows"] == 8 and 0 <= base["task_score"] <= 1 and base["general_nll"] > 0
    rows = {r["method"]: r for r in collect(cfg.output_dir)}
    zero = rows["zero_shot"]["forgetting"]
    assert zero["general_nll_increase"] == pytest.approx(0.0, abs=1e-6)  # the base forgets nothing
    assert zero["task_score_drop"] == pytest.approx(0.0)
    lora = rows["lora"]["forgetting"]
    assert lora["general_nll_increase"] == pytest.approx(lora["general_nll"] - base["general_nll"])
    assert abs(lora["general_nll_increase"]) > 1e-6  # training at lr 0.05 moved the model


def test_bad_forgetting_settings_fail_before_training(tmp_path, tiny_dir):
    with pytest.raises(ConfigError, match="forgetting: unknown keys"):
        grid(tmp_path, tiny_dir, forgetting={"genral": "x"})
    with pytest.raises(ConfigError, match="forgetting.general_tasks"):
        grid(tmp_path, tiny_dir, forgetting={"general": "x.jsonl"})
    cfg = grid(tmp_path, tiny_dir, forgetting={"general": "/no/such.jsonl", "general_tasks": ["a"]})
    with pytest.raises(ConfigError, match="forgetting.general: /no/such.jsonl not found"):
        run_experiment(cfg, progress=False)
