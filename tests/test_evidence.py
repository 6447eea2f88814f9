"""`selector.evidence` (routing.eval.evidence): each task adapter's reference-likelihood gain over
the mixed adapter on its own validation rows, written to the manifest; the router sends routes to
adapters without evidence back to mixed; `compare` scores it as the `evidence` option."""

from __future__ import annotations

import json

import pytest
from conftest import make_tokenizer, tiny_model
from test_compare import blind_store, held_out, router
from test_nested import grouped_rows

from lorachain.cli import main
from lorachain.config import ConfigError, from_dict
from lorachain.data import DataError
from lorachain.metrics import paired_bootstrap
from lorachain.routing.config import RouteConfig
from lorachain.routing.eval.answers import AnswerCache
from lorachain.routing.eval.compare import compare, select_all
from lorachain.routing.eval.evidence import add_evidence, evidence_choices
from lorachain.routing.gate import gain
from lorachain.store import MIXED, read_manifest, write_manifest


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return blind_store(tmp_path_factory.mktemp("evidence"), evidence="validation")


def with_routes(store, routes: list[str]) -> None:
    m = read_manifest(store)
    m.selector["evidence"]["routes"] = routes
    write_manifest(store, m)


def test_evidence_is_the_paired_gain_on_each_adapters_own_validation_rows(store, tmp_path):
    with pytest.warns(UserWarning, match=r"store has none measured, so every task adapter may answer"):
        assert router(store).evidence is None  # `route_train` alone measures none: every adapter answers
    got = add_evidence(store, router(store, evidence=False))
    val = [json.loads(x) for x in (store / "splits" / "val.jsonl").read_text().splitlines()]
    r = router(store, evidence=False)
    fresh = AnswerCache(tmp_path / "cache", r)  # scored again, directly, in another cache
    assert set(got["per_task"]) == {x["task"] for x in val}
    for task, p in got["per_task"].items():
        rows = [x for x in val if x["task"] == task]
        fresh.fill(rows, [r.adapters[task], MIXED], "ref")
        gains = [gain(fresh.get("ref", r.adapters[task], x), fresh.get("ref", MIXED, x)) for x in rows]
        assert p["n"] == len(rows) and p["mean"] == pytest.approx(sum(gains) / len(gains), abs=1e-6)
        assert {k: p[k] for k in ("low", "high")} == pytest.approx(
            {k: paired_bootstrap(gains)[k] for k in ("low", "high")}, abs=1e-6
        )
        assert p["routes"] == (p["low"] > 0) and p["adapter"] == r.adapters[task]
    routes = sorted(p["adapter"] for p in got["per_task"].values() if p["routes"])
    assert got["routes"] == routes and read_manifest(store).selector["evidence"] == got
    assert router(store).evidence == set(routes) and router(store, evidence=False).evidence is None
    with pytest.raises(DataError, match=r"splits/nope.jsonl: no nope split in this store"):
        add_evidence(store, r, split="nope")


def test_the_router_sends_routes_without_evidence_to_mixed(store):
    add_evidence(store, router(store, evidence=False))
    asks = [x["instruction"] for x in grouped_rows() if x["dataset"] != "alpha_0"][:12]
    free = router(store, evidence=False, min_in_distribution=None).select(asks)
    assert any(s.adapter != MIXED for s in free)  # the selector does route some of these
    with_routes(store, [])
    none = router(store, min_in_distribution=None).select(asks)
    assert all(s.adapter == MIXED for s in none)
    assert all(s.fallback.startswith("evidence: ") for s, f in zip(none, free) if f.adapter != MIXED)
    one = next(s.adapter for s in free if s.adapter != MIXED)
    with_routes(store, [one])
    kept = router(store, min_in_distribution=None).select(asks)
    assert [s.adapter for s in kept] == [f.adapter if f.adapter in (one, MIXED) else MIXED for f in free]


def test_compare_scores_the_evidence_option_by_lookup(store, tmp_path):
    add_evidence(store, router(store, evidence=False))
    with_routes(store, [router(store).adapters["alpha"]])
    r = router(store)
    rows = held_out()
    got = compare(r, rows, tmp_path / "cache", tmp_path / "out", None, False, "held out")
    routed = [s.adapter for s in select_all(r, rows)]
    assert r.evidence == {r.adapters["alpha"]}  # restored after select_all
    assert got["per_row"]["routed"]["adapter"] == routed  # routed ignores the evidence rule
    assert got["per_row"]["evidence"]["adapter"] == evidence_choices(routed, {r.adapters["alpha"]})
    assert evidence_choices(["a", MIXED, "b"], {"b"}) == [MIXED, MIXED, "b"]


def test_selector_evidence_is_checked_and_route_evidence_prints_it(store, capsys):
    base = {"model": {"name_or_path": "x"}, "data": {"path": "x.jsonl"}}
    with pytest.raises(ConfigError, match=r"selector.evidence: expected one of \['none', 'validation'\]"):
        from_dict(RouteConfig, base | {"selector": {"evidence": "maybe"}})
    store.joinpath("answers").mkdir(exist_ok=True)
    m = read_manifest(store)
    m.base_model["name_or_path"] = str(store.parent / "tiny")
    tiny_model("llama").save_pretrained(store.parent / "tiny")
    make_tokenizer().save_pretrained(store.parent / "tiny")
    write_manifest(store, m)
    assert main(["route", "evidence", str(store)]) == 0
    printed = capsys.readouterr().out.splitlines()
    per = read_manifest(store).selector["evidence"]["per_task"]
    assert len(printed) == len(per) and all(line.startswith("evidence: ") for line in printed)
    assert all(("routes" in line) == per[line.split(":")[1].strip()]["routes"] for line in printed)
