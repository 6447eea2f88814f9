"""Nested held-out selector evaluation and the confidence scores it measures (routing.calibrate)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import route_rows, write_jsonl
from test_selectors import route_cfg, tiny_encoder

from lorachain.cli import main
from lorachain.routing import calibrate as cal
from lorachain.routing.eval.nested import grid_settings, outer_fold, with_overrides
from lorachain.routing.folds import Row


def test_fit_temperature_recovers_the_temperature_that_made_the_labels():
    g = torch.Generator().manual_seed(0)
    z = 4 * torch.randn(4000, 5, generator=g)  # (N, L)
    gold = torch.multinomial(torch.softmax(z / 2.5, -1), 1, generator=g).squeeze(-1)
    assert cal.fit_temperature(z, gold) == pytest.approx(2.5, rel=0.08)


def test_ece_reliability_and_threshold_on_hand_made_rows():
    conf = [0.95, 0.95, 0.85, 0.15, 0.15]
    right = [True, False, True, False, False]
    bins = cal.reliability(conf, right)
    assert [(b["lo"], b["n"], b["accuracy"]) for b in bins] == [(0.1, 2, 0.0), (0.8, 1, 1.0), (0.9, 2, 0.5)]
    assert cal.ece(conf, right) == pytest.approx((2 * 0.15 + 1 * 0.15 + 2 * 0.45) / 5)
    score = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]
    ok = [True, True, True, False, True, False]
    assert cal.threshold_for_precision(score, ok, 0.8, min_rows=1) == 0.5  # 4 of 5 right
    assert cal.threshold_for_precision(score, ok, 1.0, min_rows=1) == 0.7
    assert cal.threshold_for_precision(score, ok, 1.0, min_rows=4) is None
    assert cal.routed(score, ok, 0.7) == {"threshold": 0.7, "coverage": 0.5, "routed": 3, "precision": 1.0}
    assert cal.routed(score, ok, None)["coverage"] == 0.0


def test_energy_msp_and_mahalanobis_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    assert cal.msp(logits).tolist() == pytest.approx([1 / (1 + torch.e**-2), 0.5])
    assert cal.margin(torch.tensor([[2.0, 0.0, 0.0], [1.0, 1.0, 0.0]])).tolist() == pytest.approx(
        [(torch.e**2 - 1) / (torch.e**2 + 2), 0.0]
    )
    assert cal.energy(logits, 2.0).tolist() == pytest.approx([2 * math.log(math.e + 1), 2 * 0.6931], rel=1e-3)
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 1.0], [0.0, 3.0]])
    means, prec = cal.class_gaussian(x, torch.tensor([0, 0, 1, 1]), 2, shrink=1.0)  # covariance: 0.5 I
    assert means.tolist() == [[2.0, 0.0], [0.0, 2.0]] and prec.tolist() == [[2.0, 0.0], [0.0, 2.0]]
    assert cal.mahalanobis(torch.tensor([[2.0, 0.0], [5.0, 5.0]]), means, prec).tolist() == [0.0, -68.0]


def test_grid_settings_and_overrides(tmp_path):
    assert grid_settings(["a.b=1,2", "c=x"]) == [["a.b=1", "c=x"], ["a.b=2", "c=x"]]
    assert grid_settings([]) == [[]]
    cfg = route_cfg(tmp_path, tmp_path / "x.jsonl", "embedding", tmp_path)
    assert with_overrides(cfg, ["selector.truncation=head"]).selector.truncation == "head"


def grouped_rows(n_per_task: int = 12) -> list[dict]:
    rows, seen = [], {}
    for r in route_rows(n_per_task):  # each task in three data sets of n/3 rows that share its words
        k = seen[r["task"]] = seen.get(r["task"], -1) + 1
        rows.append({**r, "dataset": f"{r['task']}_{k % 3}"})
    return rows


def test_outer_group_is_never_seen_by_the_inner_choice_nor_the_fit(tmp_path):
    rows = [Row(r["instruction"], r["task"], r["dataset"]) for r in grouped_rows()]
    labels = sorted({r.label for r in rows})
    seen = []

    def spy(cfg, train, test, lab):
        seen.append(({r.group for r in train}, {r.group for r in test}))
        logits = torch.tensor([[1.0 if lab.index(r.label) == j else 0.0 for j in range(3)] for r in test])
        return {"logits": logits * 3}

    cfg = route_cfg(tmp_path, tmp_path / "x.jsonl", "embedding", tmp_path)
    done = outer_fold(spy, cfg, rows, ["alpha_0"], labels, [[], ["selector.truncation=head"]], 0.9, None)
    inner, final = seen[:-1], seen[-1]
    assert len(inner) == 2 * 8 and all("alpha_0" not in a | b for a, b in inner)  # 2 settings x 8 inner folds
    assert all(not (a & b) for a, b in inner)
    assert final == ({g for g in {r.group for r in rows} if g != "alpha_0"}, {"alpha_0"})
    assert (
        done["gold"] == ["alpha"] * sum(r.group == "alpha_0" for r in rows)
        and done["inner_folds"] == 8
        and done["settings"] == []
    )
    assert done["temperature"] < 0.2  # always right: sharpen
    assert done["thresholds"]["msp"] is not None and "energy" not in done["scores"]


def test_route_eval_nested_writes_per_kind_results_and_resumes(tmp_path, capsys):
    enc = tiny_encoder(tmp_path / "tiny-bert")
    data = write_jsonl(tmp_path / "rows.jsonl", grouped_rows())
    (tmp_path / "route.json").write_text(route_cfg(tmp_path, data, "embedding", enc).to_json())
    out = tmp_path / "nested"
    argv = ["route", "eval", str(tmp_path / "route.json"), "--holdout-by", "dataset", "--nested"]
    argv += ["--out", str(out), "--per-group", "4", "--grid", "embedding:selector.truncation=head,head_tail"]
    argv += ["--embedding-cache", str(tmp_path / "emb.pt")]
    argv += ["--set", "data.max_per_task=50", "--set", "selector.prototypes=task"]  # both kept
    assert main(argv) == 0
    cache = torch.load(tmp_path / "emb.pt")
    assert sorted(cache) == [(16, "head"), (16, "head_tail")] and len(cache[(16, "head")]) == len(
        {r["instruction"] for r in grouped_rows()}
    )
    result = json.loads((out / "nested.json").read_text())
    s = result["kinds"]["embedding"]
    assert (
        result["outer_folds"] == 9 and s["rows"] == 36 and result["balance"]["balance"] == "task_then_dataset"
    )
    assert result["balance"]["max_per_task"] == 50
    assert s["top1"] == 1.0 and s["top3"] == 1.0  # a data set of the same words, never seen, routed right
    assert set(s["routing"]) == {"msp", "margin", "energy", "cosine", "mahalanobis"}
    assert 0 <= s["ece_raw"] <= 1 and len(s["temperature"]) == 9
    assert s["grid"] == ["selector.truncation=head", "selector.truncation=head_tail"]
    assert sorted(p.name for p in (out / "folds").iterdir())[0] == "nested_embedding_0.json"
    assert (out / "reliability_embedding.png").read_bytes()[:4] == b"\x89PNG"
    assert "| embedding | 1.000 | 1.000 | 1.000 |" in (out / "nested.md").read_text()
    fold = out / "folds" / "nested_embedding_0.json"
    fold.write_text(json.dumps(json.loads(fold.read_text()) | {"gold": ["beta"] * 4}))  # a rerun reads it
    assert main(argv) == 0
    assert json.loads((out / "nested.json").read_text())["kinds"]["embedding"]["top1"] == 32 / 36


def test_rounds_hold_out_one_group_of_every_label_outside_and_inside(tmp_path):
    rows = [Row(r["instruction"], r["task"], r["dataset"]) for r in grouped_rows()]
    labels = sorted({r.label for r in rows})
    seen = []

    def spy(cfg, train, test, lab):
        seen.append({r.group for r in test})
        return {"logits": torch.tensor([[3.0 * (lab.index(r.label) == j) for j in range(3)] for r in test])}

    cfg = route_cfg(tmp_path, tmp_path / "x.jsonl", "embedding", tmp_path)
    outer = ["alpha_0", "beta_0", "gamma_0"]
    done = outer_fold(spy, cfg, rows, outer, labels, [[]], 0.9, None, "rounds")
    assert seen == [{"alpha_1", "beta_1", "gamma_1"}, {"alpha_2", "beta_2", "gamma_2"}, set(outer)]
    assert done["inner_folds"] == 2 and len(done["gold"]) == 12
