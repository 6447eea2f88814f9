"""The gap report: fraction of the LoRA → full gap a chain closes, with its interval, forgetting,
and the two figures, on hand-made results with known answers."""

from __future__ import annotations

import pytest

from lorachain.experiment import gap, gap_plot
from lorachain.experiment.choose import one_schedule, select
from lorachain.experiment.report import write_report


def spec(method: str, ranks: list[int]) -> dict:
    return {"method": method, "ranks": ranks, "optimizer": "adamw", "knot_policy": "fixed", "n_train": 10,
            "steps": 10, "precision": "fp32", "attention": None}  # fmt: skip


SCORES = {  # method -> (spec, test score per seed 0..2, general NLL increase per seed)
    "full": (spec("full", [8]), [0.80, 0.82, 0.84], [0.30, 0.32, 0.34]),
    "lora_r8": (spec("lora", [8]), [0.70, 0.72, 0.74], [0.10, 0.10, 0.10]),
    "cola_r8x2": (spec("lora", [8, 8]), [0.75, 0.76, 0.79], [0.12, 0.13, 0.14]),
    "lora_r1": (spec("lora", [1]), [0.80, 0.82, 0.84], [0.05, 0.05, 0.05]),
    "cola_r1x4": (spec("lora", [1, 1, 1, 1]), [0.81, 0.82, 0.84], [0.06, 0.06, 0.06]),
}


COST = {
    "est_train_flops": 1.0,
    "cell_seconds": 1.0,
    "peak_rss_mb": 1.0,
    "train_seconds": 1.0,
    "eval_seconds": 0.0,
}


def results(task: str = "wic", methods: dict = SCORES) -> list[dict]:
    out = []
    for m, (spec, scores, nll) in methods.items():
        for seed, (s, n) in enumerate(zip(scores, nll, strict=True)):
            out.append(
                {
                    "task": task,
                    "method": m,
                    "seed": seed,
                    "lr": 1e-3,
                    "metric": "accuracy",
                    "spec": spec,
                    "counts": {"train": 10, "val": 5, "test": 50, "borrowed_from_validation": 0},
                    "val": {"score": s},
                    "test": {"score": s},
                    "cost": {
                        "est_train_flops": 1.0,
                        "cell_seconds": 1.0,
                        "peak_rss_mb": 1.0,
                        "train_seconds": 1.0,
                        "eval_seconds": 0.0,
                        "trainable_params": 1,
                    },
                    "forgetting": {"general_nll_increase": n, "task_score_drop": 0.0},
                }
            )
    return out


def test_roles_read_the_specs():
    chosen = select(results())
    full, lora, chains = gap.roles(chosen, list(SCORES))
    assert full == "full" and lora == {8: "lora_r8", 1: "lora_r1"}
    assert chains == {"cola_r8x2": 8, "cola_r1x4": 1}


def test_closed_fraction_with_its_interval():
    chosen = select(results())
    g = gap.closed_fraction(chosen, "wic", "full", "lora_r8", "cola_r8x2")
    assert g["n"] == 3 and g["has_gap"] and g["gap"] == pytest.approx(0.10)
    assert g["fractions"] == pytest.approx([0.5, 0.4, 0.5])
    assert g["mean"] == pytest.approx(1.4 / 3)
    # a gap equal on every seed: Fieller's interval is the gain's t-interval divided by the gap
    lo, hi = g["ci"]
    assert lo < g["mean"] < hi and hi - lo == pytest.approx(2 * 4.303 * 0.057735 / 3**0.5, rel=1e-3)
    assert g["gap_ci"] == pytest.approx((0.10, 0.10))
    # LoRA r=1 already matches full: no gap, no fraction
    none = gap.closed_fraction(chosen, "wic", "full", "lora_r1", "cola_r1x4")
    assert none["has_gap"] is False and "mean" not in none


def test_fieller_endpoints_solve_the_ratio_test():
    gains, gaps = [0.02, 0.05, 0.03, 0.06], [0.05, 0.09, 0.06, 0.10]
    lo, hi = gap.fieller(gains, gaps)
    n, t = 4, 3.182

    def excess(theta):  # |mean(gain − θ·gap)| over t times its standard error: 0 at the endpoints
        d = [a - theta * b for a, b in zip(gains, gaps, strict=True)]
        m = sum(d) / n
        se = (sum((x - m) ** 2 for x in d) / (n - 1) / n) ** 0.5
        return abs(m) - t * se

    ratio = sum(gains) / sum(gaps)
    assert lo < ratio < hi
    assert excess(lo) == pytest.approx(0, abs=1e-9) and excess(hi) == pytest.approx(0, abs=1e-9)
    assert excess(ratio) < 0 and excess(lo - 0.05) > 0 and excess(hi + 0.05) > 0


def test_a_gap_not_clearly_above_zero_gives_an_unbounded_fraction():
    # mean gap 2 points, but one seed has none: the ratio's interval is unbounded, and said so
    assert gap.fieller([0.01, 0.0, 0.02], [0.05, -0.03, 0.04]) is None
    assert gap.fieller([0.01], [0.05]) is None
    g = {"n": 3, "has_gap": True, "mean": 0.6, "ci": None}
    assert "unbounded" in gap._closed(g)


def test_report_has_the_gap_section_and_figures(tmp_path):
    path = write_report(results(), tmp_path)
    text = path.read_text()
    assert "## The LoRA → full fine-tuning gap" in text
    assert "| `cola_r8x2` vs `lora_r8` | +4.7 [" in text and "| 0.47 [" in text
    # forgetting paired against LoRA at its rank and against full: +0.03 and −0.19 NLL
    assert "| +0.030 [" in text and "| -0.190 [" in text
    words = "- `cola_r8x2` scores above `lora_r8`; it forgets more than `lora_r8`, and forgets less than full"
    assert words in text
    assert "\n\n## The LoRA → full fine-tuning gap" in text  # its own section, not a table row
    assert "| `cola_r1x4` vs `lora_r1` |" in text and "no gap to close" in text
    assert "| `full` (lr 0.001) | 82.0 ± 2.0 | 0.320 ± 0.020 |" in text
    for name in ("gap.png", "links.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    no_chains = {m: v for m, v in SCORES.items() if len(v[0]["ranks"]) == 1}  # a pilot: LoRA and full
    assert [p.name for p in gap_plot.plot(results(methods=no_chains), tmp_path / "pilot")] == ["gap.png"]
    unscored = results(methods=no_chains)
    for r in unscored:
        r["forgetting"] = {}  # the pilot scored no forgetting: no empty gap.png
    assert gap_plot.plot(unscored, tmp_path / "unscored") == []


def test_one_seed_is_not_put_into_words(tmp_path):
    text = write_report([r for r in results() if r["seed"] == 0], tmp_path).read_text()
    assert "- `cola_r8x2` against `lora_r8`: fewer than two paired seeds, no interval yet." in text
    assert "scores above" not in text


def test_no_gap_section_without_full_fine_tuning(tmp_path):
    rows = [r for r in results() if r["method"] != "full"]
    assert gap.render(rows) == ""
    assert gap_plot.plot(rows, tmp_path) == []


def test_links_line_runs_through_plain_chains_only():
    plain = spec("lora", [1, 1, 1, 1])
    assert one_schedule(plain)
    assert not one_schedule(plain | {"restart_per_link": True})
    assert not one_schedule(plain | {"knot_policy": "auto"})
    assert not one_schedule(plain | {"optimizer": "sgd"})


# full fine-tuning 10, 11 and 10 points above LoRA r=8 on seeds 0-2 (a spread, so an interval)
SPREAD = SCORES | {"full": (spec("full", [8]), [0.80, 0.83, 0.84], [0.30, 0.32, 0.34])}


def test_the_gap_itself_is_put_into_words(tmp_path):
    text = write_report(results(methods=SPREAD), tmp_path).read_text()
    # full − lora_r8: 10.33 ± t(2) 4.303 x 0.577 / sqrt(3) points, +0.22 NLL: a gap, bought with forgetting
    assert (
        "- full fine-tuning scores above `lora_r8` (+10.3 [+8.9, +11.8] points) and forgets more than it "
        "(+0.22 [+0.17, +0.27] general NLL)." in text  # 0.22 ± t(2) 4.30 x 0.02 / sqrt(3)
    )
    assert (
        "- full fine-tuning is not shown to score differently from `lora_r1` (+0.3 [-1.1, +1.8] points)"
        in text
    )
    # LoRA r=8 is exactly 10 points below r=1 on every seed: no spread, so no interval and no direction
    assert (
        "- `lora_r8` is not shown to score differently from `lora_r1` "
        "(-10.0 [every seed the same: no interval] points)." in text
    )
    one = write_report([r for r in results() if r["seed"] == 0], tmp_path / "one").read_text()
    assert "- full fine-tuning against `lora_r8`: fewer than two paired seeds, no interval yet." in one
    assert "- `lora_r8` against `lora_r1`: fewer than two paired seeds, no interval yet." in one


def test_unrelated_task_drop_is_paired_with_intervals(tmp_path):
    drops = {"full": [0.00, 0.02, 0.04], "lora_r8": [0.10, 0.10, 0.10], "cola_r8x2": [0.12, 0.14, 0.16]}
    rows = results()
    for r in rows:
        r["forgetting"] = r["forgetting"] | {"task_score_drop": drops.get(r["method"], [0.0] * 3)[r["seed"]]}
    text = write_report(rows, tmp_path).read_text()
    assert "| unrelated task drop vs LoRA at its rank ×100 [95% CI] | vs full ×100 [95% CI] |" in text
    # cola − lora: 2, 4, 6 points (mean 4, sd 2, t(2) 4.303: ±5.0); cola − full: 12 on every seed
    assert "| `cola_r8x2` | +4.0 [-1.0, +9.0] | +12.0 [every seed the same: no interval] |" in text
    assert "| `lora_r8` | – | +8.0 [+3.0, +13.0] |" in text  # LoRA itself: only against full
    assert "| `full` |" not in text


def test_eleven_methods_get_eleven_colours():
    import matplotlib

    colours = [gap_plot.method_color(i) for i in range(20)]
    assert len(set(colours)) == 20
    assert colours[:10] == [matplotlib.colormaps["tab10"](i) for i in range(10)]  # the default cycle's


def test_links_figure_shows_a_lora_rank_without_chains_as_a_point(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    drawn = []
    real = Axes.plot

    def plot(self, *args, **kw):
        drawn.append((kw.get("label"), args[:2]))
        return real(self, *args, **kw)

    monkeypatch.setattr(Axes, "plot", plot)
    r64 = {"lora_r64": (spec("lora", [64]), [0.90, 0.91, 0.92], [0.2, 0.2, 0.2])}
    gap_plot.plot(results(methods=SCORES | r64), tmp_path)
    lines = {label: xy for label, xy in drawn}
    assert lines["r=64 (LoRA only)"] == (1, pytest.approx(91.0))
    assert lines["r=1"] == ([1, 4], [pytest.approx(82.0), pytest.approx(82.33, abs=0.01)])


def test_links_figure_bars_are_the_seeds_spread(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    bars = []
    real = Axes.errorbar

    def errorbar(self, x, y, **kw):
        bars.append((list(x) if isinstance(x, list) else x, kw.get("yerr")))
        return real(self, x, y, **kw)

    monkeypatch.setattr(Axes, "errorbar", errorbar)
    gap_plot.plot(results(), tmp_path)
    # r=1: lora_r1 80, 82, 84 (std 2.0) at one link, cola_r1x4 81, 82, 84 (std 1.53) at four
    assert ([1, 4], [pytest.approx(2.0), pytest.approx(1.528, abs=1e-3)]) in bars


def test_what_it_adds_up_to_follows_the_intervals(tmp_path):
    methods = SPREAD | {"cola_r1x4": (spec("lora", [1, 1, 1, 1]), [0.81, 0.82, 0.84], [0.06, 0.065, 0.07])}
    rows = results(methods=methods)
    drops = {"lora_r8": [0.10, 0.10, 0.10], "cola_r8x2": [0.13, 0.14, 0.15]}  # COPA: +4.0 [+1.5, +6.5]
    for r in rows:
        r["cost"]["trainable_params"] = 134_515_008
        r["forgetting"] |= {"task": "copa", "task_score_drop": drops.get(r["method"], [0.0] * 3)[r["seed"]]}
    text = write_report(rows, tmp_path).read_text()
    summary = text[text.index("**What it adds up to.**") :].split("\n")[0]
    # full − lora_r8 +10, +11, +10, full − lora_r1 0, +1, 0; cola_r8x2 − lora_r8 +5, +4, +5 points
    assert "Full fine-tuning scored above `lora_r8`, not clearly above the other LoRA ranks." in summary
    assert "`cola_r8x2` scored above LoRA at the same rank." in summary
    assert "`cola_r1x4` scored" not in summary  # +0.3 [-1.1, +1.8]: not shown either way
    # both chains' general NLL sits above LoRA's on every seed (by 0.02-0.04 and 0.01-0.02), below full's
    assert "`cola_r8x2`, `cola_r1x4` forgot more than LoRA at the same rank" in summary
    assert "forgot more than full fine-tuning" not in summary
    assert "`cola_r8x2` lost more of the base's score on `copa` than LoRA at the same rank." in summary
    assert "Here a chain bought score over LoRA at its own rank, at a cost in forgetting." in summary
    assert "one task on a 135M-parameter model with 10 training examples and 3 seeds" in summary


def test_no_gap_and_no_gain_are_said_as_such(tmp_path):
    same = {  # full and the chains within a point of LoRA, in both directions across seeds
        "full": (spec("full", [8]), [0.70, 0.73, 0.72], [0.30, 0.32, 0.34]),
        "lora_r1": (spec("lora", [1]), [0.71, 0.72, 0.72], [0.05, 0.06, 0.05]),
        "cola_r1x4": (spec("lora", [1, 1, 1, 1]), [0.70, 0.73, 0.71], [0.06, 0.05, 0.05]),
    }
    text = write_report(results(methods=same), tmp_path).read_text()
    summary = text[text.index("**What it adds up to.**") :].split("\n")[0]
    assert "not shown to score above LoRA at any rank tried (r=1), so on this task there was no" in summary
    assert "No chain (1 tried) was shown to score differently from LoRA at its rank" in summary
    assert (
        "No chain was shown to forget differently from LoRA at its rank (the general set's NLL)." in summary
    )
    # every drop is 0 here: scored, and the same for chain and LoRA
    assert "No chain was shown to lose more or less of the base's score on the unrelated task" in summary
    assert "Here a chain bought nothing measurable over LoRA at its own rank." in summary
    one = write_report([r for r in results(methods=same) if r["seed"] == 0], tmp_path / "one")
    assert "What it adds up to" not in one.read_text()  # one seed: no interval, no summary


def test_legend_order_does_not_depend_on_the_reading_order():
    rows = results()
    want = ["lora_r1", "lora_r8", "full", "cola_r1x4", "cola_r8x2"]
    assert gap_plot.legend_order(select(rows), list(SCORES)) == want
    assert gap_plot.legend_order(select(rows[::-1]), list(SCORES)[::-1]) == want
