"""`lorachain route folds`: fold stores blind to their held-out data sets, the answer comparison over
them (gate margin chosen on reference perplexity, answers pooled), the cost estimate, and
`route eval --held-out` / `--lockbox` printing the answer-quality table."""

from __future__ import annotations

import json
import math

import pytest
import yaml
from conftest import make_tokenizer, tiny_model, write_jsonl
from test_compare import fake_lockbox, held_out
from test_nested import grouped_rows
from test_selectors import route_cfg, tiny_encoder

from lorachain.cli import main
from lorachain.routing.eval.fold_stores import (
    budget_steps,
    first_per_task,
    fold_configs,
    fold_plan,
    read_margins,
)
from lorachain.routing.train import load_split
from lorachain.store import read_manifest


def refuse(constant: str):
    raise AssertionError(f"{constant} is not strict JSON")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("folds")
    enc = tiny_encoder(tmp / "tiny-bert")
    data = write_jsonl(tmp / "rows.jsonl", grouped_rows())
    model_dir = tmp / "tiny"
    tiny_model("llama").save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    cfg = route_cfg(tmp, data, "embedding", enc)
    raw = json.loads(cfg.to_json())
    raw["model"]["name_or_path"] = str(model_dir)
    raw.pop("lorachain_version")
    (tmp / "route.yaml").write_text(yaml.safe_dump(raw))
    return tmp, cfg


def test_each_fold_holds_out_one_data_set_of_every_type(setup):
    _, cfg = setup
    assert fold_plan(cfg, 3) == [[f"{t}_{k}" for t in ("alpha", "beta", "gamma")] for k in range(3)]
    with pytest.raises(ValueError, match=r"rows.jsonl: only 3 folds by data set, asked for 4"):
        fold_plan(cfg, 4)
    cfgs = fold_configs(cfg, "x", 2)
    assert [c.output_dir for c in cfgs] == ["x/fold0", "x/fold1"]
    assert cfgs[1].data.exclude_datasets == ["alpha_1", "beta_1", "gamma_1"]
    train = load_split(cfgs[0])["train"]  # one epoch of batches of 4 per adapter
    per = {t: sum(r.task == t for r in train) for t in ("alpha", "beta", "gamma")}
    assert budget_steps(cfgs[0]) == {t: math.ceil(n / 4) for t, n in per.items()} | {
        "_mixed": math.ceil(len(train) / 4)
    }


def test_route_folds_builds_blind_stores_and_compares_them(setup, capsys):
    tmp, _ = setup
    out = tmp / "folds"
    args = ["route", "folds", str(tmp / "route.yaml"), "--folds", "2", "--out", str(out)]
    assert main([*args, "--plan"]) == 0
    assert "fold1: holds out alpha_1, beta_1, gamma_1" in capsys.readouterr().out
    assert main(args) == 0
    for k in range(2):
        rows = (out / f"fold{k}" / "splits" / "train.jsonl").read_text().splitlines()
        seen = {json.loads(x)["dataset"] for x in rows}
        assert seen and not seen & {f"alpha_{k}", f"beta_{k}", f"gamma_{k}"}
    cmp = [*args, "--compare", "--max-per-task", "2", "--max-new-tokens", "2"]
    assert main(cmp) == 0
    printed = capsys.readouterr().out
    assert (
        "| all | 12 |" in printed and "gate margin chosen on reference perplexity over the folds" in printed
    )
    margins = json.loads((out / "compare" / "margins.json").read_text(), parse_constant=refuse)
    assert read_margins(out) == {k: math.inf if v == "inf" else v for k, v in margins["chosen"].items()}
    pooled = json.loads((out / "compare" / "pooled" / "compare.json").read_text())
    assert pooled["gate_margin"] == margins["chosen"] and pooled["rows"] == 12
    assert set(margins["chosen"]) == set(margins["sweep"]) == {"routed", "top1", "arrow"}
    assert {"top1_gated", "arrow_gated", "gated"} <= set(pooled["options"])
    assert (out / "compare" / "pooled" / "compare.png").stat().st_size > 10_000
    assert {
        json.loads((out / "compare" / f"fold{k}" / "compare.json").read_text())["rows"] for k in (0, 1)
    } == {6}
    # the selector variants (routing.eval.variants): fitted on each fold store's own rows only
    assert {"other", "other_gated", "augmented", "augmented_gated"} <= set(pooled["options"])
    assert margins["variants"] == ["other", "augmented"] and "| other − mixed |" in printed
    for k in range(2):
        fold_held = {f"alpha_{k}", f"beta_{k}", f"gamma_{k}"}
        folder = out / f"fold{k}" / "variants" / "other"
        v = json.loads((folder / "variant.json").read_text())
        assert v["entry"]["labels"][-1] == "other" and v["held_back"]
        assert not set(v["held_back"]) & fold_held
        for part in ("train", "val"):
            rows = [
                json.loads(x)
                for x in (folder / "splits" / "selector" / f"{part}.jsonl").read_text().splitlines()
            ]
            assert rows and not {r["dataset"] for r in rows} & fold_held
    fitted = {p: p.stat().st_mtime_ns for p in out.glob("fold*/variants/*/variant.json")}
    assert len(fitted) == 4
    cache = sorted((out / "fold0" / "answers").glob("*.json"))
    assert [p.name for p in cache] == ["alpha.json", "base.json", "beta.json", "gamma.json", "mixed.json"]
    before = {p: p.stat().st_mtime_ns for p in cache}
    assert main(cmp) == 0  # a second comparison reads the cache and writes nothing to it
    assert {p: p.stat().st_mtime_ns for p in cache} == before
    assert {p: p.stat().st_mtime_ns for p in fitted} == fitted  # the variants are reused, not refitted
    assert (
        json.loads((out / "compare" / "pooled" / "compare.json").read_text())["options"] == pooled["options"]
    )


def test_first_per_task_keeps_file_order():
    rows = [{"task": t, "i": i} for i, t in enumerate("aabab")]
    assert [r["i"] for r in first_per_task(rows, 2)] == [0, 1, 2, 4]
    assert [r["i"] for r in first_per_task(rows, 1)] == [0, 2]
    assert first_per_task(rows, None) == rows


def test_route_folds_in_distribution_scores_each_store_on_its_own_test_split(setup, capsys):
    tmp, _ = setup
    out = tmp / "folds"
    args = ["route", "folds", str(tmp / "route.yaml"), "--folds", "2", "--out", str(out)]
    assert main(args) == 0  # resumes (or builds) the fold stores
    capsys.readouterr()
    got = [*args, "--in-distribution", "--gate-margin", "0.1", "--max-per-task", "1", "--max-new-tokens", "2"]
    assert main(got) == 0
    assert "gated − mixed" in capsys.readouterr().out
    pooled = json.loads((out / "compare_in" / "pooled" / "compare.json").read_text())
    assert pooled["rows"] == 6 and pooled["rows_from"].startswith("the test splits of 2 fold stores")
    assert pooled["gate_margin"] == {"routed": 0.1, "top1": 0.1, "arrow": 0.1}
    for k in range(2):
        fold = json.loads((out / "compare_in" / f"fold{k}" / "compare.json").read_text())
        assert fold["per_task_rows"] == {"alpha": 1, "beta": 1, "gamma": 1}
        assert fold["rows_from"] == f"fold{k}'s test split"
        test = [json.loads(x) for x in (out / f"fold{k}" / "splits" / "test.jsonl").read_text().splitlines()]
        held = {f"alpha_{k}", f"beta_{k}", f"gamma_{k}"}
        assert test and not {r["dataset"] for r in test} & held  # rows of data sets the store trained on
    assert (out / "compare_in" / "pooled" / "compare.png").stat().st_size > 10_000


def test_route_folds_estimate_times_steps_and_extrapolates(setup, capsys):
    tmp, _ = setup
    args = ["route", "folds", str(tmp / "route.yaml"), "--out", str(tmp / "est"), "--estimate", "2"]
    assert main(args) == 0
    got = json.loads((tmp / "est" / "estimate.json").read_text())
    assert got["seconds_per_step"] > 0 and set(got["timed_runs"]) == {"2", "4"}
    assert got["total_steps"] == sum(got["steps"].values())
    seconds = got["seconds_per_step"] * got["total_steps"] + got["fixed_seconds_per_adapter"] * 4
    assert got["core_hours_per_store"] == pytest.approx(seconds * got["threads"] / 3600)
    assert got["core_hours_all_folds"] == pytest.approx(3 * got["core_hours_per_store"])


def test_route_eval_prints_the_answer_table_for_your_rows_and_the_lockbox(setup, capsys):
    tmp, cfg = setup
    assert main(["route", "train", str(tmp / "route.yaml"), "selector.evidence=validation"]) == 0
    store = cfg.output_dir
    printed = capsys.readouterr().out  # `route train` measures the evidence it is asked for
    per = read_manifest(store).selector["evidence"]["per_task"]
    assert set(per) == {"alpha", "beta", "gamma"} and printed.count("\nevidence: ") == 3
    mine = write_jsonl(tmp / "mine.jsonl", held_out())
    args = ["route", "eval", store, "--max-new-tokens", "2"]
    assert main([*args, "--held-out", str(mine), "--out", str(tmp / "mine")]) == 0
    out = capsys.readouterr().out
    assert "| other | 2 |" in out and "routed − mixed" in out and "right when routed" in out
    assert "gated" not in json.loads((tmp / "mine" / "compare.json").read_text())["options"]  # no gate
    assert main([*args, "--held-out", str(mine), "--out", str(tmp / "g"), "--gate-margin", "0.1"]) == 0
    got = json.loads((tmp / "g" / "compare.json").read_text())
    assert got["gate_margin"] == {"routed": 0.1, "top1": 0.1, "arrow": 0.1}
    assert "gated − mixed" in capsys.readouterr().out
    assert (
        got["options"]["routed"]
        == json.loads((tmp / "mine" / "compare.json").read_text())["options"]["routed"]
    )
    box = fake_lockbox(tmp / "box")
    assert main([*args, "--lockbox", str(box), "--half", "B", "--reason", "x"]) == 2
    assert "half B stays sealed" in capsys.readouterr().err
    assert main([*args, "--lockbox", str(box), "--reason", "gate default", "--out", str(tmp / "lb")]) == 0
    seal = json.loads((box / "lockbox.json").read_text())
    assert seal["opened"][0]["half"] == "A" and "--lockbox" in seal["opened"][0]["command"]
    assert json.loads((tmp / "lb" / "compare.json").read_text())["rows_from"].startswith("lockbox half A")
