"""A store's calibrated confidence: temperature and threshold fitted on its held-out data sets,
stored in the manifest, applied by the Router (`min_in_distribution`), shown by `route eval`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tokenizer, tiny_model, write_jsonl
from test_nested import grouped_rows
from test_selectors import route_cfg, tiny_encoder

from lorachain.config import ConfigError, from_dict
from lorachain.routing.confidence import fit_calibration
from lorachain.routing.config import RouteConfig
from lorachain.routing.eval.store import report_markdown, route_eval
from lorachain.routing.train import route_train
from lorachain.serve.router import Router
from lorachain.store import MIXED, read_manifest


def clusters(seed: int = 0):
    """Two labels, two groups each, around two orthogonal directions in 8 dimensions."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(8)[:2] * 3
    vecs, index, groups = [], [], []
    for lab in (0, 1):
        for grp in (0, 1):
            vecs.append(centres[lab] + 0.3 * torch.randn(10, 8, generator=g))
            index += [lab] * 10
            groups += [f"{lab}_{grp}"] * 10
    return F.normalize(torch.cat(vecs), dim=-1), torch.tensor(index), groups


@pytest.mark.parametrize("score", ["msp", "margin", "energy", "cosine", "mahalanobis"])
def test_fit_calibration_holds_out_every_group(score):
    vecs, index, groups = clusters()
    got = fit_calibration(vecs, index, groups, 2, 0.05, score, 0.9)
    assert got["score"] == score and got["held_out_groups"] == 4 and got["target_precision"] == 0.9
    assert got["held_out"]["top1"] == 1.0 and got["held_out"]["coverage"] == 1.0  # separable: route all
    assert got["threshold"] is not None and got["temperature"] > 0
    assert fit_calibration(vecs, index, ["g"] * len(groups), 2, 0.05) is None  # nothing to hold out


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("calibrated")
    enc = tiny_encoder(tmp / "tiny-bert")
    data = write_jsonl(tmp / "rows.jsonl", grouped_rows())
    out = {}
    for score in ("msp", "mahalanobis"):
        cfg = route_cfg(tmp / score, data, "embedding", enc, confidence=score)
        assert route_train(cfg, tiny_model("llama"), make_tokenizer(), progress=False) is not None
        out[score] = tmp / score / "store"
    return out


def router(store, **kw) -> Router:
    return Router.from_store(store, model=tiny_model("llama"), tokenizer=make_tokenizer(), **kw)


@pytest.mark.parametrize("score", ["msp", "mahalanobis"])
def test_store_keeps_its_calibration_and_the_router_applies_it(calibrated, score):
    m = read_manifest(calibrated[score])
    cal = m.selector["calibration"]
    assert cal["score"] == score and cal["held_out_groups"] == 9 and cal["target_precision"] == 0.9
    r = router(calibrated[score])
    assert r.min_in_distribution == cal["threshold"]
    sels = r.select(["red sky red", "blue sea blue"])
    assert [s.adapter for s in sels] == ["alpha", "beta"] and all(s.in_distribution is not None for s in sels)
    strict = router(calibrated[score], min_in_distribution=1e9)
    sel = strict.select(["red sky red"])[0]
    assert sel.adapter == MIXED and "min_in_distribution" in sel.fallback and sel.ranked[0] == "alpha"
    assert router(calibrated[score], min_in_distribution=None).min_in_distribution is None


def test_route_eval_shows_the_calibration_and_the_routed_precision(calibrated, tmp_path):
    r = router(calibrated["msp"], min_in_distribution=1e9)
    result = route_eval(
        r, calibrated["msp"], tmp_path / "eval", max_per_task=1, modes=("score",), max_new_tokens=2
    )
    assert result["calibration"]["score"] == "msp" and result["min_in_distribution"] == 1e9
    assert (
        result["selection"]["score"]["fallbacks"] == 1.0
        and result["selection"]["score"]["routed_precision"] is None
    )
    md = report_markdown(result)
    assert "`msp` threshold" in md and "score: routed 0.000 of rows, right -" in md


def test_bad_confidence_settings_fail_in_one_line():
    base = {"model": {"name_or_path": "t"}, "data": {"path": "x"}}
    with pytest.raises(ConfigError, match=r"selector.confidence: expected one of \['msp', 'margin'"):
        from_dict(RouteConfig, base | {"selector": {"confidence": "odin"}})
    with pytest.raises(ConfigError, match=r"selector.target_precision: expected in \(0, 1\]"):
        from_dict(RouteConfig, base | {"selector": {"target_precision": 1.5}})


@pytest.mark.parametrize("score", ["msp", "mahalanobis"])
def test_route_add_fits_the_calibration_again_with_the_new_task(calibrated, tmp_path, score):
    import shutil

    from safetensors.torch import load_file

    from lorachain.routing.add import add_task

    store = shutil.copytree(calibrated[score], tmp_path / "store")
    before = read_manifest(store).selector["calibration"]
    old = load_file(str(store / "selector" / "centroids.safetensors"))
    data = write_jsonl(tmp_path / "delta.jsonl", [{"instruction": f"purple {w} moon"} for w in "abcdef"])
    m = add_task(store, "delta", store / "adapters" / "gamma", data)
    after = m.selector["calibration"]
    assert before["labels"] == 3 and after["labels"] == 4  # fitted against four centroids now
    assert after["score"] == score and after["held_out_groups"] == before["held_out_groups"] == 9
    assert after["held_out"]["precision"] is None or after["held_out"]["precision"] >= 0.9
    new = load_file(str(store / "selector" / "centroids.safetensors"))
    if score == "mahalanobis":  # the shared covariance now includes the new task's rows
        assert new["precision"].shape == old["precision"].shape
        assert not torch.allclose(new["precision"], old["precision"])
    r = router(store)
    assert r.min_in_distribution == after["threshold"]
    sel = r.select(["purple a moon"])[0]
    assert sel.ranked[0] == "delta" and sel.in_distribution is not None
