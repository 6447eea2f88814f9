"""Two selector kinds as each other's second opinion (routing.eval.agreement), on hand-made folds."""

from __future__ import annotations

import pytest

from lorachain.routing.eval.agreement import agreement, agreement_markdown


def fold(groups, gold, tops, msp, inner=None, threshold=None) -> dict:
    out = {"groups": groups, "gold": gold, "ranked": [[t, "x"] for t in tops], "scores": {"msp": msp}}
    return out | {"thresholds": {"msp": threshold}} | ({"inner": inner} if inner else {})


def test_agree_routes_only_rows_both_kinds_name_the_same_task():
    gold = ["a", "a", "b", "b", "c"]
    a = fold(["g"], gold, ["a", "b", "b", "a", "c"], [0.9, 0.8, 0.7, 0.6, 0.5])
    b = fold(["g"], gold, ["a", "b", "c", "a", "c"], [0.5] * 5)
    got = agreement([a], [b], 0.9)
    # agree on rows 0, 1, 3, 4: right on 0 and 4
    assert got["rows"] == 5 and got["agree"] == {"coverage": 0.8, "precision": 0.5}
    assert got["agree_msp"] == {"coverage": 0.0, "precision": None}  # no inner rows: no threshold
    assert got["agree_either"] == {"coverage": 0.0, "precision": None}  # neither has a threshold


def test_agree_msp_takes_its_threshold_from_the_inner_rows_only():
    inner_gold = list(range(20))
    inner_top = inner_gold[:12] + [99] * 8  # the first 12 right, the last 8 wrong
    msp = [1.0 - i / 40 for i in range(20)]  # falling: the threshold lands at row 11's msp
    ia = {"top1": inner_top, "gold": inner_gold, "msp": msp}
    ib = {"top1": inner_top, "gold": inner_gold, "msp": msp}
    gold = ["a"] * 4
    a = fold(["g"], gold, ["a", "a", "b", "a"], [0.9, 0.5, 0.95, 0.8], ia)
    b = fold(["g"], gold, ["a", "a", "b", "c"], [0.1] * 4, ib)
    got = agreement([a], [b], 0.9)
    # the top 13 inner rows are 12/13 = 0.923 right, the top 14 only 0.857: threshold = row 12's 0.7
    # outer: row 0 (agree, right, 0.9) and row 2 (agree, wrong, 0.95) clear it; row 1 is below it,
    # row 3 disagrees
    assert got["agree_msp"] == {"coverage": 0.5, "precision": 0.5}
    assert got["agree"]["coverage"] == 0.75
    lines = agreement_markdown({"encoder / embedding": got}, 0.9)
    assert "| encoder / embedding | 0.750 / 0.667 | 0.500 / 0.500 | 0.000 / - |" in "\n".join(lines)


def test_agree_either_needs_agreement_and_one_kind_above_its_own_threshold():
    gold = ["a", "a", "a", "a"]
    a = fold(["g"], gold, ["a", "a", "b", "a"], [0.9, 0.2, 0.9, 0.2], threshold=0.5)
    b = fold(["g"], gold, ["a", "a", "b", "c"], [0.1, 0.8, 0.9, 0.9], threshold=0.7)
    # row 0: a clears; row 1: b clears; row 2: both clear but wrong; row 3: no agreement
    assert agreement([a], [b], 0.9)["agree_either"] == {"coverage": 0.75, "precision": 2 / 3}


def test_folds_of_different_rows_are_refused():
    a = fold(["g"], ["a"], ["a"], [0.9])
    with pytest.raises(ValueError, match="different outer folds"):
        agreement([a], [fold(["h"], ["a"], ["a"], [0.9])], 0.9)
    with pytest.raises(ValueError, match="different rows"):
        agreement([a], [fold(["g"], ["b"], ["a"], [0.9])], 0.9)


def test_agreement_folds_script_judges_a_range_of_outer_folds(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "folds").mkdir()
    for i, top in enumerate(["a", "b", "a"]):  # fold 1 disagrees
        for kind, t in (("encoder", "a"), ("embedding", top)):
            f = fold([f"g{i}"], ["a"] * 10, [t] * 10, [0.9] * 10, threshold=0.5)
            (tmp_path / "folds" / f"nested_{kind}_{i}.json").write_text(json.dumps(f))
    script = Path(__file__).parents[1] / "scripts" / "agreement_folds.py"
    subprocess.run(
        [sys.executable, str(script), str(tmp_path), "--from", "1"], check=True, capture_output=True
    )
    got = json.loads((tmp_path / "agreement_folds_1-3.json").read_text())
    assert got["groups"] == [["g1"], ["g2"]] and got["folds"] == [1, 3]
    assert got["encoder / embedding"]["agree"] == {"coverage": 0.5, "precision": 1.0}
    bad = subprocess.run(
        [sys.executable, str(script), str(tmp_path), "--from", "5"], capture_output=True, text=True
    )
    assert bad.returncode != 0 and "0 encoder and 0 embedding folds in range" in bad.stderr
