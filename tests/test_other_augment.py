"""Issue 43's selector options for "do no harm": an explicit `other` class learned from data sets held
back from the task adapters (`selector.other_datasets`, routing.other) and re-templated selector
training rows (`selector.augment`, routing.augment); their settings refused in one line."""

from __future__ import annotations

import json
import random

import pytest
from conftest import FILL, NEG, POS, make_tokenizer, tiny_model, write_jsonl
from test_selectors import route_cfg, tiny_encoder

from lorachain.config import ConfigError, from_dict
from lorachain.routing.augment import STYLES, augment_rows, retemplate
from lorachain.routing.config import RouteConfig
from lorachain.routing.data import InstructionRow
from lorachain.routing.other import OTHER, held_back_datasets
from lorachain.routing.train import route_train
from lorachain.serve.router import Router
from lorachain.store import MIXED, read_manifest

TASKS = ("alpha", "beta", "gamma")
VOCAB = [*FILL, *POS, *NEG][:18]  # two words of its own for each of the 9 data sets


def sourced_rows(n_per_dataset: int = 10) -> list[dict]:
    """Three task types of three data sets each; every data set has its own two words, so a data set
    the selector never saw as its task's is told apart only by being unfamiliar."""
    rng, rows = random.Random(0), []
    for t, task in enumerate(TASKS):
        for k in range(3):
            words = VOCAB[2 * (3 * t + k) : 2 * (3 * t + k) + 2]
            for _ in range(n_per_dataset):
                text = " ".join(rng.choice(words) for _ in range(3))
                rows.append(
                    {"instruction": text, "output": ("one", "two", "three")[t], "task": task}
                    | {"dataset": f"{task}_{k}"}
                )
    rng.shuffle(rows)
    return rows


def split_rows(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x]


@pytest.fixture(scope="module")
def other_store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("other")
    enc = tiny_encoder(tmp / "tiny-bert")
    data = write_jsonl(tmp / "rows.jsonl", sourced_rows())
    cfg = route_cfg(tmp, data, "embedding", enc, other_datasets=1, prototypes="dataset")
    cfg.data.exclude_datasets = ["alpha_0", "beta_0"]  # a fold's held-out data sets
    cfg.data.split = [0.5, 0.2, 0.3]
    assert route_train(cfg, tiny_model("llama"), make_tokenizer(), False)
    return tmp / "store"


def test_other_is_learned_from_held_back_data_sets_and_never_from_a_folds_held_out_ones(other_store):
    entry = read_manifest(other_store).selector
    held = entry["other"]["datasets"]
    assert entry["labels"] == [*TASKS, OTHER] and read_manifest(other_store).labels == list(TASKS)
    # one data set of every type that has more than one left after the fold's two
    assert len(held) == 3 and {h.split("_")[0] for h in held} == set(TASKS)
    assert not set(held) & {"alpha_0", "beta_0"}
    selector = [
        r for part in ("train", "val") for r in split_rows(other_store / "splits/selector" / f"{part}.jsonl")
    ]
    assert not {r["dataset"] for r in selector} & {"alpha_0", "beta_0"}  # no fold held-out row, any label
    assert {r["dataset"] for r in selector if r["task"] == OTHER} == set(held)
    assert entry["other"]["train_rows"] == sum(
        r["task"] == OTHER for r in split_rows(other_store / "splits/selector/train.jsonl")
    )
    for task in TASKS:  # the task adapters never learn from a held-back data set; the mixed one does
        mine = split_rows(other_store / "splits" / "by_task" / f"{task}.train.jsonl")
        assert mine and not {r["dataset"] for r in mine} & set(held)
    assert set(held) <= {r["dataset"] for r in split_rows(other_store / "splits" / "train.jsonl")}


def test_other_sends_a_held_back_source_to_the_mixed_adapter(other_store):
    r = Router.from_store(other_store, model=tiny_model("llama"), tokenizer=make_tokenizer())
    held = set(read_manifest(other_store).selector["other"]["datasets"])
    test = split_rows(other_store / "splits" / "test.jsonl")  # rows the selector never read
    theirs = [x["instruction"] for x in test if x["dataset"] in held]
    known = [x for x in test if x["dataset"] not in held]
    assert len(theirs) >= 6 and len(known) >= 6
    sels = r.select(theirs)
    assert [s.ranked[0] for s in sels] == [OTHER] * len(theirs)
    assert [s.adapter for s in sels] == [MIXED] * len(theirs)
    assert all(s.fallback == f"no adapter for task {OTHER!r}" for s in sels)
    mine = r.select([x["instruction"] for x in known])  # a familiar source still goes to its adapter
    assert [s.adapter for s in mine] == [x["task"] for x in known]


def test_held_back_data_sets_are_seeded_and_need_more_than_k():
    rows = [
        InstructionRow(i, "x", "y", t, dataset=f"{t}_{k}")
        for i, (t, k) in enumerate([(t, k) for t in TASKS for k in range(3)] + [("solo", 0)])
    ]
    one = held_back_datasets(rows, 1, 0)
    assert len(one) == 3 and "solo_0" not in one and one == held_back_datasets(rows, 1, 0)
    assert len(held_back_datasets(rows, 2, 0)) == 6
    with pytest.raises(
        ValueError, match=r"rows.jsonl: selector.other_datasets=3: no task type has more than 3"
    ):
        held_back_datasets(rows, 3, 0, "rows.jsonl")
    with pytest.raises(
        ValueError, match=r"selector.other_datasets needs a data set on every row \(row of line 7\)"
    ):
        held_back_datasets([InstructionRow(7, "x", "y", "alpha")], 1, 0)


def test_augmentation_adds_the_expected_rows_with_the_labels_kept():
    rows = [
        {"instruction": f"Passage: {w} film\nQuestion: is it {w}?\nAnswer:", "task": t, "output": "o"}
        for w, t in (("good", "alpha"), ("bad", "beta"), ("dull", "gamma"))
    ]
    plain = [{"instruction": "one line", "task": "alpha", "output": "o"}]  # nothing to re-template
    for copies in (1, 2, 3):
        got = augment_rows(rows + plain, copies, list(STYLES), seed=0)
        assert len(got) == 4 + 3 * copies  # every style changes a three-part row, none the plain one
        assert got[:4] == rows + plain
        assert sorted(x["task"] for x in got[4:]) == sorted([t for t in ("alpha", "beta", "gamma")] * copies)
        assert all(x["output"] == "o" for x in got) and len({x["instruction"] for x in got}) == len(got)
    text = rows[0]["instruction"]
    rng = random.Random(0)
    assert retemplate(text, "swap", rng) == "Question: is it good?\n\nPassage: good film\n\nAnswer:"
    assert retemplate(text, "strip", rng) == "good film\nis it good?"
    assert retemplate(text, "separator", rng).count("\n") in (0, 4)


def test_augmented_store_trains_on_the_copies(tmp_path):
    enc = tiny_encoder(tmp_path / "tiny-bert")
    rows = [r | {"instruction": f"Passage: {r['instruction']}\nQuestion: which?"} for r in sourced_rows(4)]
    cfg = route_cfg(tmp_path, write_jsonl(tmp_path / "rows.jsonl", rows), "embedding", enc, augment=2)
    assert route_train(cfg, tiny_model("llama"), make_tokenizer(), False)
    store = tmp_path / "store"
    train, own = split_rows(store / "splits/selector/train.jsonl"), split_rows(store / "splits/train.jsonl")
    assert len(train) == 3 * len(own)  # two-part rows: every style changes each one
    assert read_manifest(store).selector["augment"] == {
        "copies": 2,
        "styles": list(STYLES),
        "added_rows": 2 * len(own),
    }
    task_of = {x["line"]: x["task"] for x in own}
    assert all(c["task"] == task_of[c["line"]] for c in train[len(own) :])
    assert split_rows(store / "splits/selector/val.jsonl") == split_rows(store / "splits/val.jsonl")


@pytest.mark.parametrize(
    "selector, message",
    [
        (
            {"other_datasets": -1},
            r"^selector.other_datasets: expected a whole number >= 0 \(0: off\), got -1$",
        ),
        ({"augment": 1.5}, r"^selector.augment: expected an integer, got 1.5$"),
        (
            {"kind": "lora", "other_datasets": 1},
            r"^selector.other_datasets: needs selector.kind encoder or embedding, got 'lora'$",
        ),
        (
            {"kind": "full", "augment": 2},
            r"^selector.augment: needs selector.kind encoder or embedding, got 'full'$",
        ),
        (
            {"second_opinion": "embedding", "augment": 1},
            r"^selector.augment: cannot be combined with selector.second_opinion$",
        ),
        ({"augment": 1, "augment_styles": ["swap", "shout"]}, r"^selector.augment_styles: expected some of"),
    ],
)
def test_bad_settings_are_refused_in_one_line_naming_the_key(selector, message):
    base = {"model": {"name_or_path": "x"}, "data": {"path": "x.jsonl"}}
    with pytest.raises(ConfigError, match=message):
        from_dict(RouteConfig, base | {"selector": selector})
    got = from_dict(RouteConfig, base).selector
    assert (got.other_datasets, got.augment) == (0, 0)  # off by default


def test_a_task_named_other_is_refused(tmp_path):
    enc = tmp_path / "enc"
    rows = [r | {"task": OTHER if r["task"] == "gamma" else r["task"]} for r in sourced_rows(3)]
    cfg = route_cfg(tmp_path, write_jsonl(tmp_path / "rows.jsonl", rows), "embedding", enc, other_datasets=1)
    with pytest.raises(
        ValueError, match=r"rows.jsonl: selector.other_datasets: the data already has a task named 'other'"
    ):
        route_train(cfg, tiny_model("llama"), make_tokenizer(), False)
    assert not (tmp_path / "store" / "splits").exists()


def test_held_out_folds_fit_on_the_augmented_rows(tmp_path):
    from lorachain.routing.folds import Fitter, Row

    enc = tiny_encoder(tmp_path / "tiny-bert")
    texts = {f"Passage: {r['instruction']}\nQuestion: which?": r for r in sourced_rows(2)}  # distinct
    rows = [Row(t, r["task"], r["dataset"]) for t, r in texts.items()]
    for copies in (0, 2):
        cfg = route_cfg(tmp_path, tmp_path / "x.jsonl", "embedding", enc, augment=copies)
        fitter = Fitter("embedding", cfg, tmp_path / "work")
        fitter.fit(rows, list(TASKS))
        embedded = {k for k in fitter.cache if k != "enc"}  # every text the prototypes were fitted to
        plain = {r.text for r in rows}
        assert plain <= embedded and len(embedded) == (len(plain) * 3 if copies else len(plain))
        swapped = {retemplate(t, "swap", random.Random(0)) for t in plain}  # swap is not random
        assert bool(swapped & embedded) == bool(copies)
