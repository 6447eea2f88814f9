"""data.balance: exact rows per task type and data set on small hand-made rows."""

from __future__ import annotations

from collections import Counter

import pytest
from conftest import write_jsonl

from lorachain.config import ConfigError, from_dict
from lorachain.routing.balance import balance_rows, even_shares
from lorachain.routing.config import RouteConfig
from lorachain.routing.data import InstructionRow, read_instruction_rows, stratified_split
from lorachain.routing.folds import Row, train_rows

# task "mc" has three data sets (10, 10, 2 rows), "senti" one (12), "topic" two (6, 6)
SIZES = {("mc", "a"): 10, ("mc", "b"): 10, ("mc", "c"): 2, ("senti", "d"): 12, ("topic", "e"): 6}
SIZES[("topic", "f")] = 6


def rows() -> list[InstructionRow]:
    keys = [(task, ds) for (task, ds), n in SIZES.items() for _ in range(n)]
    return [InstructionRow(k + 1, f"{ds} {k}", "o", task, dataset=ds) for k, (task, ds) in enumerate(keys)]


def counts(kept) -> tuple[Counter, Counter]:
    return Counter(r.task for r in kept), Counter(r.dataset for r in kept)


def test_even_shares_water_fills():
    assert even_shares([10, 10, 2], 12) == [5, 5, 2]
    assert even_shares([10, 10, 2], 9) == [4, 3, 2]
    assert even_shares([1, 1], 5) == [1, 1]
    assert even_shares([3, 7, 7], 13) == [3, 5, 5]


def test_task_then_dataset_gives_every_task_the_same_rows_spread_over_its_data_sets():
    tasks, sets = counts(balance_rows(rows(), "task_then_dataset", max_per_task=12))
    assert tasks == {"mc": 12, "senti": 12, "topic": 12}
    assert sets == {"a": 5, "b": 5, "c": 2, "d": 12, "e": 6, "f": 6}
    tasks, sets = counts(balance_rows(rows(), "task_then_dataset"))  # unset: the median type's 12
    assert tasks == {"mc": 12, "senti": 12, "topic": 12}
    tiny = [*rows(), InstructionRow(99, "x", "o", "tiny", dataset="g")]  # one tiny task cuts no other
    assert counts(balance_rows(tiny, "task_then_dataset"))[0] == {
        "mc": 12,
        "senti": 12,
        "topic": 12,
        "tiny": 1,
    }
    tasks, sets = counts(balance_rows(rows(), "task_then_dataset", max_per_task=7))
    assert sets == {"a": 3, "b": 2, "c": 2, "d": 7, "e": 4, "f": 3} and tasks["mc"] == 7


def test_dataset_and_task_and_none():
    tasks, sets = counts(balance_rows(rows(), "dataset", max_per_dataset=6))
    assert sets == {"a": 6, "b": 6, "c": 2, "d": 6, "e": 6, "f": 6}
    assert tasks == {"mc": 14, "senti": 6, "topic": 12}  # the type with the most data sets gets most
    assert counts(balance_rows(rows(), "dataset"))[1] == {"a": 10, "b": 10, "c": 2, "d": 10, "e": 6, "f": 6}
    tasks, sets = counts(balance_rows(rows(), "task", max_per_task=4))
    assert tasks == {"mc": 4, "senti": 4, "topic": 4}
    assert len(balance_rows(rows(), "none")) == len(balance_rows(rows(), "task")) == 46
    a = balance_rows(rows(), "task_then_dataset", 7, seed=1)
    assert [r.line for r in a] == [r.line for r in balance_rows(rows(), "task_then_dataset", 7, seed=1)]
    assert [r.line for r in a] != [r.line for r in balance_rows(rows(), "task_then_dataset", 7, seed=2)]
    with pytest.raises(ValueError, match="balance: expected one of"):
        balance_rows(rows(), "bogus")


def test_stratified_split_of_balanced_rows_and_the_dataset_field(tmp_path):
    body = [
        {"instruction": r.instruction, "output": "o", "task": r.task, "dataset": r.dataset} for r in rows()
    ]
    read = read_instruction_rows(write_jsonl(tmp_path / "r.jsonl", body))
    assert Counter(r.dataset for r in read) == {ds: n for (_, ds), n in SIZES.items()}
    split = stratified_split(read, (0.5, 0.25, 0.25), 0, 12, "task_then_dataset")
    assert counts(split["train"])[0] == {"mc": 6, "senti": 6, "topic": 6}
    assert sum(counts(split[p])[1]["c"] for p in split) == 2  # the small data set keeps both rows


def test_holdout_folds_balance_their_training_rows_like_route_train(tmp_path):
    cfg = from_dict(
        RouteConfig,
        {"model": {"name_or_path": "tiny"}, "data": {"path": "x.jsonl", "max_per_task": 8}},
    )
    grouped = [Row(r.instruction, r.task, r.dataset) for r in rows() if r.dataset != "a"]  # "a" held out
    kept = train_rows(cfg, grouped)
    assert Counter(r.label for r in kept) == {"mc": 8, "senti": 8, "topic": 8}
    assert Counter(r.group for r in kept) == {"b": 6, "c": 2, "d": 8, "e": 4, "f": 4}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"balance": "even"}, "data.balance: expected one of"),
        (
            {"balance": "dataset", "max_per_task": 10},
            "data.max_per_task: has no effect with data.balance=dataset",
        ),
        ({"max_per_dataset": 10}, "data.max_per_dataset: has no effect with data.balance=task_then_dataset"),
    ],
)
def test_bad_balance_settings_fail_in_one_line(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(RouteConfig, {"model": {"name_or_path": "tiny"}, "data": {"path": "x.jsonl", **data}})
