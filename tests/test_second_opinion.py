"""`selector.second_opinion`: a second kind fitted beside the selector; routes only when both name
the same task and either clears its own threshold (routing.second_opinion, routing.select)."""

from __future__ import annotations

import json
import math
import shutil

import pytest
from conftest import make_tokenizer, tiny_model, write_jsonl
from test_nested import grouped_rows as nested_rows
from test_selectors import route_cfg, tiny_encoder

from lorachain.config import ConfigError
from lorachain.routing.add import add_task
from lorachain.routing.confidence import calibrated_msp
from lorachain.routing.select import Selection, decide
from lorachain.routing.train import route_train
from lorachain.serve.router import Router
from lorachain.store import StoreError, read_manifest

ADAPTERS = {"alpha", "beta"}


def two(top: str, other: str, mine: float | None = None, theirs: float | None = None) -> Selection:
    return Selection(
        [top, "x"], [0.8, 0.2], in_distribution=mine, second=Selection([other], in_distribution=theirs)
    )


def test_both_must_name_the_task_and_either_clear_its_own_threshold():
    assert decide(two("alpha", "alpha", 0.9, 0.1), ADAPTERS, "mixed", 0.0, 0.5, 0.5).adapter == "alpha"
    assert decide(two("alpha", "alpha", 0.1, 0.9), ADAPTERS, "mixed", 0.0, 0.5, 0.5).adapter == "alpha"
    low = decide(two("alpha", "alpha", 0.1, 0.1), ADAPTERS, "mixed", 0.0, 0.5, 0.5)
    assert low.adapter == "mixed" and "neither clears" in low.fallback
    split = decide(two("alpha", "beta", 0.9, 0.9), ADAPTERS, "mixed", 0.0, 0.5, 0.5)
    assert (
        split.adapter == "mixed" and split.fallback == "the selector names 'alpha', its second opinion 'beta'"
    )
    # no thresholds at all: agreement alone; one threshold: that kind must clear it
    assert decide(two("alpha", "alpha"), ADAPTERS, "mixed", 0.0, None, None).adapter == "alpha"
    assert decide(two("alpha", "alpha", None, 0.4), ADAPTERS, "mixed", 0.0, None, 0.5).adapter == "mixed"
    assert (
        decide(two("gamma", "gamma", 0.9), ADAPTERS, "mixed", 0.0, 0.5).fallback
        == "no adapter for task 'gamma'"
    )
    assert (
        "probability 0.800 < 0.9" in decide(two("alpha", "alpha", 0.9), ADAPTERS, "mixed", 0.9, 0.5).fallback
    )


def test_calibrated_msp_rescales_the_scores_by_the_temperature():
    sel = Selection(["a", "b"], [0.8, 0.2])
    assert calibrated_msp(sel, {"score": "msp", "temperature": 1.0}) == pytest.approx(0.8)
    w = [0.8**0.5, 0.2**0.5]  # t = 2 flattens
    assert calibrated_msp(sel, {"score": "msp", "temperature": 2.0}) == pytest.approx(w[0] / sum(w))
    assert calibrated_msp(sel, None) is None and calibrated_msp(sel, {"score": "cosine"}) is None
    assert math.isclose(calibrated_msp(Selection(["a"], [1.0]), {"score": "msp", "temperature": 0.5}), 1.0)


def grouped_rows() -> list[dict]:
    return nested_rows(18)  # each task in three data sets of 6 rows


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("second")
    enc = tiny_encoder(tmp / "tiny-bert")
    data = write_jsonl(tmp / "rows.jsonl", grouped_rows())
    cfg = route_cfg(tmp, data, "encoder", enc, second_opinion="embedding")
    assert route_train(cfg, tiny_model("llama"), make_tokenizer(), progress=False) is not None
    return shutil.copytree(cfg.output_dir, tmp / "copy", ignore=shutil.ignore_patterns("runs")), cfg


def test_a_store_fits_both_kinds_with_their_own_thresholds_and_routes_on_agreement(store):
    root, _ = store
    entry = read_manifest(root).selector
    second = entry["second_opinion"]
    assert entry["kind"] == "encoder" and second["kind"] == "embedding"
    assert second["path"] == "second_opinion/selector" and all(
        k.startswith("second_opinion/") for k in second["files"]
    )
    assert (
        all((root / k).is_file() for k in second["files"])
        and not (root / "second_opinion" / "splits").exists()
    )
    # the encoder has no threshold of its own: it was fitted once more without one data set per task
    assert entry["calibration"]["held_out_groups"] == 3 and entry["calibration"]["score"] == "msp"
    assert second["calibration"]["held_out_groups"] >= 3
    r = Router.from_store(root, model=tiny_model("llama"), tokenizer=make_tokenizer())
    rows = [x for x in grouped_rows() if x["dataset"].endswith("_0")][:9]
    sels = r.select([x["instruction"] for x in rows])
    assert all(s.second is not None and s.in_distribution is not None for s in sels)
    for s in sels:
        if s.ranked[0] != s.second.ranked[0]:
            assert s.adapter == "mixed" and "second opinion" in s.fallback
        elif s.fallback is None:
            assert s.adapter == r.adapters[s.ranked[0]]
        else:
            assert s.adapter == "mixed" and "neither clears" in s.fallback
    routed = [s for s in sels if s.fallback is None]
    assert len(routed) >= 6 and all(s.ranked[0] == x["task"] for s, x in zip(sels, rows) if s in routed)


def test_a_changed_second_opinion_file_and_bad_settings_fail_in_one_line(store, tmp_path):
    root, cfg = store
    bad = shutil.copytree(root, tmp_path / "bad")
    name = next(iter(read_manifest(bad).selector["second_opinion"]["files"]))
    (bad / name).write_bytes(b"changed")
    with pytest.raises(StoreError, match="sha256 does not match"):
        Router.from_store(bad, model=tiny_model("llama"), tokenizer=make_tokenizer())
    embedding = shutil.copytree(root, tmp_path / "embedding")  # as if its first kind were embedding
    m = json.loads((embedding / "manifest.json").read_text())
    m["selector"]["kind"] = "embedding"
    (embedding / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StoreError, match="cannot extend a store with a second opinion"):
        add_task(embedding, "delta", root / "adapters" / "alpha", tmp_path / "x.jsonl")
    for kind, second in (("encoder", "encoder"), ("encoder", "lora"), ("lora", "embedding")):
        with pytest.raises(ConfigError, match="selector.second_opinion"):
            route_cfg(tmp_path, tmp_path / "x.jsonl", kind, tmp_path, second_opinion=second)
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["selector"]["second_opinion"]["labels"] == ["alpha", "beta", "gamma"]


def test_route_eval_reports_the_second_opinion_and_routes_by_it(store, tmp_path):
    from lorachain.routing.eval.store import route_eval

    root, _ = store
    r = Router.from_store(root, model=tiny_model("llama"), tokenizer=make_tokenizer())
    result = route_eval(r, root, tmp_path / "eval", max_per_task=2, modes=("score",), max_new_tokens=3)
    assert result["second_opinion"] == "embedding" and result["min_second"] == r.min_second
    assert "Second opinion: `embedding`" in (tmp_path / "eval" / "route_eval.md").read_text()
    assert json.loads((tmp_path / "eval" / "route_eval.json").read_text())["second_opinion"] == "embedding"
