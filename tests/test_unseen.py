"""Routing on data sets a store never saw: `data.exclude_datasets`, `routing.eval.unseen.unseen_rows`,
`route eval --unseen` with the routed (fallback), top-1, oracle, mixed and base answers."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import make_tokenizer, tiny_model, write_jsonl
from test_nested import grouped_rows
from test_selectors import route_cfg, tiny_encoder

from lorachain.data import DataError
from lorachain.routing.eval.store import per_task_ppl, route_eval
from lorachain.routing.eval.unseen import unseen_rows
from lorachain.routing.train import route_train
from lorachain.serve.router import Router
from lorachain.store import MIXED

HELD_OUT = ["alpha_0", "beta_0"]


def excluding(tmp, data, enc, names):
    cfg = route_cfg(tmp, data, "embedding", enc)
    cfg.data.exclude_datasets = list(names)
    return cfg


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("unseen")
    enc = tiny_encoder(tmp / "tiny-bert")
    data = write_jsonl(tmp / "rows.jsonl", grouped_rows())
    assert route_train(excluding(tmp, data, enc, HELD_OUT), tiny_model("llama"), make_tokenizer(), False)
    return tmp / "store", data, enc


def router(store, **kw) -> Router:
    return Router.from_store(store, model=tiny_model("llama"), tokenizer=make_tokenizer(), **kw)


def test_excluded_data_sets_are_in_no_split_and_are_the_unseen_rows(held_out):
    store, data, _ = held_out
    for part in ("train", "val", "test"):
        rows = [json.loads(x) for x in (store / "splits" / f"{part}.jsonl").read_text().splitlines()]
        assert rows and not {r["dataset"] for r in rows} & set(HELD_OUT)
    got = unseen_rows(store)
    every = [r for r in grouped_rows() if r["dataset"] in HELD_OUT]
    assert sorted((r["instruction"], r["task"], r["dataset"]) for r in got) == sorted(
        (r["instruction"], r["task"], r["dataset"]) for r in every
    )
    assert len(got) == 8 and {r["task"] for r in got} == {"alpha", "beta"}
    two = unseen_rows(store, max_per_task=2)  # per task, evenly over its (one) held-out data set
    assert len(two) == 4 and sum(r["task"] == "alpha" for r in two) == 2


def test_unseen_rows_refuse_what_is_not_unseen(held_out, tmp_path):
    store, data, enc = held_out
    with pytest.raises(DataError, match=r"data set 'gamma_1' is in the store's own rows"):
        unseen_rows(store, datasets=["gamma_1"])
    with pytest.raises(DataError, match=r"no row has data set 'delta_0'"):
        unseen_rows(store, datasets=["delta_0"])
    cfg = excluding(tmp_path, data, enc, ["alpha_0", "alpha_9"])
    with pytest.raises(DataError, match=r"rows.jsonl: data.exclude_datasets: no row has data set 'alpha_9'"):
        route_train(cfg, tiny_model("llama"), make_tokenizer(), False)


def test_route_eval_on_unseen_rows_compares_every_way_of_choosing(held_out, tmp_path):
    store, _, _ = held_out
    rows = unseen_rows(store)
    free = router(store, min_in_distribution=None)  # no fallback: routed is the selector's top-1
    a = route_eval(free, store, tmp_path / "a", modes=("score",), max_new_tokens=2, rows=rows, rows_from="x")
    assert a["datasets"] == HELD_OUT and a["test_rows"] == 8 and a["rows_from"] == "x"
    assert a["perplexity"]["top1"] == a["perplexity"]["routed"]
    assert a["quality"]["top1"] == a["quality"]["routed"]
    # the oracle column is each row under its own task's adapter, scored afresh
    oracle = per_task_ppl(free, rows, [free.adapters[r["task"]] for r in rows])
    assert a["perplexity"]["oracle"] == pytest.approx(oracle, rel=1e-6)
    strict = router(store, min_in_distribution=1e9)  # every row to the fallback
    b = route_eval(strict, store, tmp_path / "b", modes=("score",), max_new_tokens=2, rows=rows)
    assert strict.fallback == MIXED and b["selection"]["score"]["fallbacks"] == 1.0
    assert (
        b["perplexity"]["routed"] == b["perplexity"]["mixed"]
        and b["quality"]["routed"] == b["quality"]["mixed"]
    )
    assert b["perplexity"]["top1"] == a["perplexity"]["top1"]  # the top-1 ignores the fallback
    assert (tmp_path / "b" / "answers.png").stat().st_size > 10_000
    md = (tmp_path / "b" / "route_eval.md").read_text()
    assert "data sets: alpha_0, beta_0" in md and "| all | 8 |" in md and "routed − mixed ROUGE-L" in md
    assert md.count("+0.000 |") == 3  # routed = mixed: 2 tasks + all


def test_cli_route_eval_unseen(held_out, tmp_path, capsys):
    from lorachain.cli import main

    store, data, enc = held_out
    model_dir = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    cfg = json.loads(excluding(tmp_path, data, enc, ["gamma_2"]).to_json())
    cfg["model"]["name_or_path"] = str(model_dir)
    (tmp_path / "route.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["route", "train", str(tmp_path / "route.yaml")]) == 0
    args = ["route", "eval", str(tmp_path / "store"), "--unseen", "--modes", "score", "--max-new-tokens", "2"]
    assert main([*args, "--out", str(tmp_path / "ev")]) == 0
    got = json.loads((tmp_path / "ev" / "route_eval.json").read_text())
    assert got["datasets"] == ["gamma_2"] and got["test_rows"] == 4
    assert got["rows_from"] == "data sets the store never saw"
    assert main([*args, "--datasets", "alpha_1"]) == 2
    assert "'alpha_1' is in the store's own rows" in capsys.readouterr().err
