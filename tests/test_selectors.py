"""Selector kinds on tiny models: registry, embedding and encoder stores, integrity, `route add`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import SMALL, make_tokenizer, route_rows, tiny_model, write_jsonl
from transformers import BertConfig, BertModel

from lorachain.cli import main
from lorachain.config import ConfigError, from_dict
from lorachain.routing.config import RouteConfig
from lorachain.routing.selectors import KINDS, Kind, get_kind, kind_names, register
from lorachain.routing.train import route_train
from lorachain.serve.router import Router
from lorachain.store import MIXED, SELECTOR, StoreError, read_manifest


def tiny_encoder(path: Path) -> Path:
    """A 2-layer random BERT encoder and the toy tokenizer, saved as a model folder."""
    torch.manual_seed(0)
    cfg = BertConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        **SMALL,
    )
    BertModel(cfg).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def route_cfg(tmp: Path, data: Path, kind: str, encoder: Path, **selector) -> RouteConfig:
    return from_dict(
        RouteConfig,
        {
            "model": {"name_or_path": "tiny"},
            "data": {"path": str(data), "max_length": 16},
            "prompt": "{instruction} =>",
            "task_prompt": "{instruction} task:",
            "chain": {"links": [{"rank": 4, "alpha": 8}], "dropout": 0.0},
            "optim": {"lr": 0.02},
            "train": {"epochs": 1, "batch_size": 4},
            "selector_train": {"epochs": 8, "batch_size": 4},
            # no likelihood gate (the default): these stores test selection; test_compare the gate
            "selector": {
                "kind": kind,
                "encoder": str(encoder),
                "max_length": 16,
                "lr": 1e-3,
                "gate": "none",
                **selector,
            },
            "output_dir": str(tmp / "store"),
        },
    )


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> Path:
    return tiny_encoder(tmp_path_factory.mktemp("enc") / "tiny-bert")


@pytest.fixture(scope="module")
def stores(tmp_path_factory, encoder) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("selectors")
    data = write_jsonl(tmp / "rows.jsonl", route_rows(20))
    out = {}
    for kind in ("embedding", "encoder", "full"):  # reruns reuse the task adapters
        cfg = route_cfg(tmp, data, kind, encoder)
        assert route_train(cfg, tiny_model("llama"), make_tokenizer(), progress=False) is not None
        out[kind] = shutil.copytree(cfg.output_dir, tmp / kind, ignore=shutil.ignore_patterns("runs"))
    return out


def router(store: Path, **kw) -> Router:
    return Router.from_store(store, model=tiny_model("llama"), tokenizer=make_tokenizer(), **kw)


def test_registry_refuses_duplicates_and_names_unknown_kinds():
    assert kind_names() == ["embedding", "encoder", "full", "lora"]
    with pytest.raises(ValueError, match="'embedding' is already registered"):
        register(Kind("embedding", None, None))
    with pytest.raises(ConfigError, match=r"selector.kind: unknown selector kind 'bert'; known: \["):
        get_kind("bert")
    with pytest.raises(ConfigError, match="selector.kind: unknown 'knn'"):
        bad = {"model": {"name_or_path": "t"}, "data": {"path": "x"}, "selector": {"kind": "knn"}}
        from_dict(RouteConfig, bad)
    assert KINDS["lora"].fit is None  # the paper's selector is trained as an adapter
    minimal = {"model": {"name_or_path": "t"}, "data": {"path": "x"}}
    assert from_dict(RouteConfig, minimal).selector.kind == "encoder"  # the measured default (README)


@pytest.mark.parametrize("kind", ["embedding", "encoder", "full"])
def test_store_records_the_selector_and_routes_the_test_split(stores, kind):
    store = stores[kind]
    m = read_manifest(store)
    assert m.selector["kind"] == kind and m.selector["labels"] == ["alpha", "beta", "gamma"]
    assert SELECTOR not in m.adapters  # no task-selection LoRA trained for this kind
    assert m.selector["files"] and all(len(h) == 64 for h in m.selector["files"].values())
    test = [json.loads(x) for x in (store / "splits" / "test.jsonl").read_text().splitlines()]
    r = router(store)
    sels = r.select([t["instruction"] for t in test], mode="generate")  # the mode does not matter
    assert [s.ranked[0] for s in sels] == [t["task"] for t in test]
    assert all(len(s.ranked) == 3 and sum(s.scores) == pytest.approx(1) for s in sels)
    assert all(s.scores == sorted(s.scores, reverse=True) for s in sels)
    answers = r.ask(["red sky red", "blue sea blue"])
    assert [a.adapter for a in answers] == ["alpha", "beta"]
    assert answers[0].answer == r.ask(["red sky red"], adapter="alpha")[0].answer
    assert answers[0].top_k[0]["task"] == "alpha" and len(answers[0].top_k) == 3


@pytest.mark.parametrize("kind", ["embedding", "encoder", "full"])
def test_every_kind_routes_through_the_server_and_the_proxy(stores, kind):
    """`model: auto` over HTTP: the local server and a proxy in front of it pick the same adapter
    as the Router and return its answer."""
    import httpx

    from lorachain.serve.api import create_app
    from lorachain.serve.background import BackgroundServer
    from lorachain.serve.engine import Engine
    from lorachain.serve.proxy import create_proxy_app

    engine = Engine(router(stores[kind]), window_ms=1)
    local = BackgroundServer(create_app(engine, max_tokens_limit=8))
    proxy = BackgroundServer(create_proxy_app(router(stores[kind]), local.url + "/v1", max_tokens_limit=8))
    expected = router(stores[kind]).ask(["blue sea blue"], max_new_tokens=3)[0]
    try:
        for srv in (local, proxy):
            body = {"model": "auto", "prompt": "blue sea blue", "max_tokens": 3}
            r = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=60)
            assert r.status_code == 200, r.text
            assert r.json()["lorachain_route"]["adapter"] == expected.adapter == "beta"
        texts = [
            httpx.post(f"{srv.url}/v1/completions", json=body | {"model": "beta"}, timeout=60).json()
            for srv in (local, proxy)
        ]
        assert texts[0]["choices"][0]["text"] == texts[1]["choices"][0]["text"]
    finally:
        proxy.stop()
        local.stop()
        engine.close()


def test_min_confidence_sends_unsure_instructions_to_the_fallback(stores):
    r = router(stores["embedding"], min_confidence=0.999999)
    sel = r.select(["red blue green"])[0]
    assert sel.adapter == MIXED and "probability" in sel.fallback
    assert router(stores["embedding"]).select(["red blue green"])[0].adapter in {"alpha", "beta", "gamma"}


def test_bad_selector_files_kinds_and_labels_fail_in_one_line(stores, tmp_path):
    copy = tmp_path / "store"
    shutil.copytree(stores["embedding"], copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    weights = copy / "selector" / "centroids.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4])
    with pytest.raises(StoreError, match="centroids.safetensors: sha256 does not match"):
        router(copy)
    (copy / "manifest.json").write_text(json.dumps({**manifest, "selector": {"kind": "knn"}}))
    with pytest.raises(ConfigError, match=r"manifest.json: selector.kind: unknown selector kind 'knn'"):
        router(copy)
    shutil.copy2(stores["embedding"] / "selector" / "centroids.safetensors", weights)
    wrong = {**manifest["selector"], "labels": ["alpha", "beta", "delta"]}
    (copy / "manifest.json").write_text(json.dumps({**manifest, "selector": wrong}))
    with pytest.raises(StoreError, match=r"selector only: \['delta'\]; adapters only: \['gamma'\]"):
        router(copy)
    gone = {**manifest["selector"], "encoder": str(tmp_path / "no-such-encoder")}
    (copy / "manifest.json").write_text(json.dumps({**manifest, "selector": gone}))
    with pytest.raises(ConfigError, match="selector.encoder: .*no-such-encoder' cannot be loaded"):
        router(copy)


def test_a_store_without_selector_field_is_a_lora_store(stores, tmp_path):
    copy = tmp_path / "store"
    shutil.copytree(stores["embedding"], copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["selector"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert read_manifest(copy).selector == {"kind": "lora"}
    with pytest.raises(StoreError, match="no adapter named '_selector'"):
        router(copy)  # a lora store needs its selector adapter


def test_route_add_routes_a_new_task_without_retraining(stores, tmp_path):
    store = shutil.copytree(stores["embedding"], tmp_path / "store")
    before = (store / "selector" / "centroids.safetensors").stat().st_size
    rows = [{"instruction": f"one {w} two"} for w in ("one", "two", "three", "one two")]
    data = write_jsonl(tmp_path / "delta.jsonl", rows)
    assert main(["route", "add", str(store), "delta", str(store / "adapters" / "gamma"), str(data)]) == 0
    m = read_manifest(store)
    assert m.labels == ["alpha", "beta", "delta", "gamma"] and m.adapters["delta"]["task"] == "delta"
    assert (
        m.selector["labels"][-1] == "delta"
        and (store / "selector" / "centroids.safetensors").stat().st_size > before
    )
    r = router(store)
    sels = r.select(["one two one", "red sky red", "two three two"])
    assert [s.adapter for s in sels] == ["delta", "alpha", "delta"]
    assert (
        r.ask(["one two one"])[0].answer == r.ask(["one two one"], adapter="gamma")[0].answer
    )  # same weights


def test_route_add_refuses_bad_input_in_one_line(stores, tmp_path, capsys):
    store = shutil.copytree(stores["encoder"], tmp_path / "store")
    data = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "one two"}])
    gamma = str(store / "adapters" / "gamma")
    assert main(["route", "add", str(store), "delta", gamma, str(data)]) == 2
    assert "route add needs an `embedding` selector; this store's is 'encoder'" in capsys.readouterr().err
    emb = shutil.copytree(stores["embedding"], tmp_path / "emb")
    assert main(["route", "add", str(emb), "beta", gamma, str(data)]) == 2
    assert "task 'beta': already in" in capsys.readouterr().err
    assert main(["route", "add", str(emb), "delta", str(tmp_path), str(data)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a PEFT adapter folder" in err


def test_holdout_folds_leave_out_groups_of_labels_that_have_others():
    from lorachain.routing.folds import Row, make_folds

    rows = [Row("x", lab, g) for lab, g in [("a", "a1"), ("a", "a2"), ("a", "a3"), ("b", "b1"), ("b", "b2")]]
    rows.append(Row("x", "c", "c1"))
    assert make_folds(rows, "one") == ([["a1"], ["a2"], ["a3"], ["b1"], ["b2"]], ["c"])
    assert make_folds(rows, "rounds") == ([["a1", "b1"], ["a2", "b2"], ["a3"]], ["c"])


def test_route_eval_holdout_by_dataset_writes_per_kind_results(encoder, tmp_path, capsys):
    rows = []
    for r in route_rows(12):  # each task in two data sets that share its words
        rows.append({**r, "dataset": f"{r['task']}_{len(rows) % 2}"})
    rows.append({"instruction": "one two", "output": "x", "task": "delta", "dataset": "d0"})
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    cfg = route_cfg(tmp_path, data, "embedding", encoder).to_json()
    (tmp_path / "route.json").write_text(cfg)
    out = tmp_path / "ho"
    argv = ["route", "eval", str(tmp_path / "route.json"), "--holdout-by", "dataset", "--out", str(out)]
    assert main([*argv, "--per-group", "5"]) == 0
    result = json.loads((out / "holdout.json").read_text())
    assert result["single_group_labels"] == ["delta"] and result["groups"] == 7
    held = result["kinds"]["embedding"]["held_out"]
    assert held["rows"] == 30 and held["per_group"]["alpha_0"]["n"] == 5
    assert held["top1"] == 1.0  # a data set of the same words is routed right without having been seen
    assert (
        "| embedding | 1.000 |" in (out / "holdout.md").read_text()
        and "holdout.md" not in capsys.readouterr().err
    )


def test_head_tail_clip_keeps_both_ends_of_a_long_instruction():
    from lorachain.routing.encoders import clip

    tok = make_tokenizer()  # whitespace words, no special tokens
    long = " ".join(["red"] * 3 + ["sky"] * 20 + ["blue", "sea", "blue", "sea"])
    short = "green leaf green"
    got = clip(tok, [long, short], max_length=12, truncation="head_tail")  # room 10: 5 first, 5 last
    assert got == ["red red red sky sky sky blue sea blue sea", short]
    assert clip(tok, [long], 12, "head") == [long]  # the tokenizer keeps the head itself
    assert clip(tok, [long], 64, "head_tail") == [long]  # fits: unchanged


def test_selectors_record_their_truncation_and_refuse_unknown_ones(stores):
    for kind in ("embedding", "encoder"):
        assert read_manifest(stores[kind]).selector["truncation"] == "head_tail"  # the default
    bad = {"model": {"name_or_path": "t"}, "data": {"path": "x"}, "selector": {"truncation": "tail"}}
    with pytest.raises(ConfigError, match=r"selector.truncation: expected one of \['head', 'head_tail'\]"):
        from_dict(RouteConfig, bad)


def test_the_encoder_trains_four_epochs_of_16_unless_selector_train_says_otherwise():
    from lorachain.routing.selectors import encoder_budget

    minimal = {"model": {"name_or_path": "t"}, "data": {"path": "x"}}
    minimal["train"] = {"epochs": 1, "precision": "bf16"}
    got = encoder_budget(from_dict(RouteConfig, minimal))
    assert (got.epochs, got.batch_size, got.max_steps, got.precision) == (4.0, 16, None, "bf16")
    own = {"selector_train": {"epochs": 2, "batch_size": 8}}
    given = encoder_budget(from_dict(RouteConfig, minimal | own))
    assert (given.epochs, given.batch_size) == (2, 8)


def test_route_eval_holdout_fits_and_scores_the_full_kind(tmp_path):
    base = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(base)
    make_tokenizer().save_pretrained(base)
    seen: dict[str, int] = {}
    rows = []
    for r in route_rows(6):  # each task in two data sets of 3 rows
        seen[r["task"]] = seen.get(r["task"], 0) + 1
        rows.append({**r, "dataset": f"{r['task']}_{seen[r['task']] % 2}"})
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    cfg = route_cfg(tmp_path, data, "full", base, lr=1e-3)
    cfg.model.name_or_path = str(base)
    (tmp_path / "route.json").write_text(cfg.to_json())
    out = tmp_path / "ho"
    argv = ["route", "eval", str(tmp_path / "route.json"), "--holdout-by", "dataset", "--out", str(out)]
    assert main([*argv, "--kinds", "full", "--per-group", "3", "--skip-in-distribution"]) == 0
    held = json.loads((out / "holdout.json").read_text())["kinds"]["full"]["held_out"]
    assert held["rows"] == 18 and 0 <= held["top1"] <= held["top3"] == 1.0  # 3 labels: top-3 is all
