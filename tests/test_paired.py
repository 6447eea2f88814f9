"""The paired COLA − LoRA comparison: differences per seed, t-intervals, sign counts, verdicts."""

from __future__ import annotations

import pytest

from lorachain.experiment.paired import paired_table, summarize, t975, verdict


def cell(task, method, seed, lr, val, test, ranks):
    spec = {"method": "lora", "ranks": ranks, "optimizer": "adamw", "knot_policy": "fixed", "n_train": 100}
    cost = {"est_train_flops": 1.0, "cell_seconds": 1.0, "peak_rss_mb": 1.0}
    scores = {"val": {"score": val}, "test": {"score": test}}
    return {"task": task, "method": method, "seed": seed, "lr": lr, "spec": spec, "cost": cost, **scores}


def test_summary_matches_a_hand_computation():
    s = summarize([1.0, 2.0, 3.0, -1.0])
    # mean 1.25, sd 1.7078, t(3) = 3.182 -> half width 2.717
    assert s["mean"] == pytest.approx(1.25)
    assert s["ci"][0] == pytest.approx(1.25 - 3.182 * 1.707825 / 2, rel=1e-4)
    assert (s["above"], s["tied"], s["below"]) == (3, 0, 1)
    assert t975(200) == 1.96 and t975(4) == 2.776


def test_pairs_use_each_methods_own_validation_lr_and_shared_seeds():
    from lorachain.experiment.report import select

    rows = []
    for seed in range(3):
        rows += [
            cell("rte", "lora", seed, 1e-3, 0.6, 0.60, [8]),
            cell("rte", "lora", seed, 1e-4, 0.5, 0.90, [8]),
        ]
        rows += [cell("rte", "cola", seed, 1e-3, 0.7, 0.62 + 0.01 * seed, [8, 8])]
    table, total = paired_table(select(rows), ["rte"], "lora", "cola")
    # LoRA's lr is 1e-3 (best validation), never 1e-4 (best test): differences are 2, 3, 4 points
    assert total["mean"] == pytest.approx(3.0) and total["above"] == 3
    assert "| rte | 60.0 ± 0.0 (0.001) | 63.0 ± 1.0 (0.001) | +3.0 [+0.5, +5.5] | 3 / 0 / 0 |" in table
    assert verdict(total).startswith("COLA above LoRA")
    assert verdict(summarize([1.0, -1.0, 0.5])).startswith("no difference")


def test_paired_png_has_one_panel_per_comparison_and_the_per_task_summaries(tmp_path):
    from PIL import Image

    from lorachain.experiment.choose import select
    from lorachain.experiment.figures import plot_comparisons
    from lorachain.experiment.paired import per_task

    rows = []
    for task, gain in (("rte", 0.02), ("cb", -0.01)):
        for seed in range(3):
            rows += [cell(task, "lora", seed, 1e-3, 0.6, 0.60, [8])]
            rows += [cell(task, "cola", seed, 1e-3, 0.6, 0.60 + gain + 0.01 * seed, [8, 8])]
    by_task, total = per_task(select(rows), ["rte", "cb"], "lora", "cola")
    assert by_task["rte"]["mean"] == pytest.approx(3.0) and by_task["cb"]["mean"] == pytest.approx(0.0)
    assert total["n"] == 6 and total["mean"] == pytest.approx(1.5)

    path = plot_comparisons(rows, tmp_path / "paired.png", ["rte", "cb"])
    with Image.open(path) as img:
        assert img.format == "PNG" and img.width == round(4.2 * 110)
    assert plot_comparisons([r for r in rows if r["method"] == "lora"], tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def test_differences_without_spread_name_no_direction():
    from lorachain.experiment.paired import direction, fmt_ci

    # two seeds of a 100-row task, both 3 points below: a t-interval of zero width, not evidence
    same = summarize([-3.0, -3.0 + 1e-13])
    assert direction(same) == 0 and verdict(same).startswith("no difference shown (every pair the same")
    assert fmt_ci(same) == "-3.0 [every seed the same: no interval]"
    spread = summarize([-3.0, -4.0, -3.5])
    assert direction(spread) == -1 and fmt_ci(spread) == "-3.5 [-4.7, -2.3]"
    assert direction(summarize([-3.0])) == 0 and fmt_ci(summarize([-3.0])) == "-3.0"
