"""Issue 43 machinery on a tiny store: the answer cache (hit, miss, resume, refusal), scoring every
routing option by lookup (= scoring directly), the likelihood gate (`selector.gate`), the
comparison's JSON and the table and PNG rendered from it, and the lockbox seal."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import make_tokenizer, tiny_model, write_jsonl
from safetensors.torch import save_file
from test_nested import grouped_rows
from test_selectors import route_cfg, tiny_encoder

from lorachain.config import ConfigError, from_dict
from lorachain.metrics import paired_bootstrap
from lorachain.routing.arrow import ADAPTER_WEIGHTS, arrow_scores, prototypes
from lorachain.routing.config import RouteConfig
from lorachain.routing.eval.answers import AnswerCache, CacheError, row_key
from lorachain.routing.eval.compare import (
    GATED,
    OPTIONS,
    choose_margin,
    compare,
    gated,
    margin_sweep,
    margins_of,
    markdown,
    pool,
    render,
    select_all,
)
from lorachain.routing.eval.lockbox import LockboxError, open_half
from lorachain.routing.eval.store import BASE, answers_for, per_task_ppl
from lorachain.routing.gate import gain, instruction_logprobs, margin_value, passes
from lorachain.routing.train import route_train
from lorachain.serve.router import Router
from lorachain.store import MIXED, read_manifest


def blind_store(tmp: Path, **selector) -> Path:
    """A tiny embedding store that never saw data sets alpha_0 and beta_0 (`held_out`'s rows)."""
    enc = tiny_encoder(tmp / "tiny-bert")
    data = write_jsonl(tmp / "rows.jsonl", grouped_rows())
    cfg = route_cfg(tmp, data, "embedding", enc, **selector)
    cfg.data.exclude_datasets = ["alpha_0", "beta_0"]
    assert route_train(cfg, tiny_model("llama"), make_tokenizer(), False)
    return tmp / "store"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return blind_store(tmp_path_factory.mktemp("compare"), gate="likelihood", gate_margin=0.25)


def router(store, **kw) -> Router:
    return Router.from_store(store, model=tiny_model("llama"), tokenizer=make_tokenizer(), **kw)


def held_out() -> list[dict]:
    """The store's unseen data sets, and two rows of a type it has no adapter for."""
    rows = [r for r in grouped_rows() if r["dataset"] in ("alpha_0", "beta_0")]
    return rows + [
        {"instruction": "red sea leaf", "output": "four", "task": "other", "dataset": "x"},
        {"instruction": "blue sky", "output": "five", "task": "other", "dataset": "x"},
    ]


def test_the_gate_is_a_store_option_the_router_reads(store):
    assert read_manifest(store).selector["gate"] == {"kind": "likelihood", "margin": 0.25}
    assert router(store).gate_margin == 0.25 and router(store, gate_margin=None).gate_margin is None
    base = {"model": {"name_or_path": "x"}, "data": {"path": "x.jsonl"}}
    with pytest.raises(ConfigError, match=r"selector.gate: expected one of \['none', 'likelihood'\]"):
        from_dict(RouteConfig, base | {"selector": {"gate": "maybe"}})
    default = from_dict(RouteConfig, base).selector  # issue 43's default, chosen on the fold stores
    assert (default.gate, default.gate_margin, default.evidence) == ("likelihood", 0.2, "none")


def test_the_gate_routes_when_the_task_adapter_is_likelier_and_falls_back_when_mixed_is(store):
    r = router(store, gate_margin=None, min_in_distribution=None)
    rows = held_out()[:6]
    asks = [x["instruction"] for x in rows]
    sels = r.select(asks)
    routed = [s.adapter for s in sels]
    assert all(a != MIXED for a in routed)  # no fallback without a floor: every row a candidate
    mixed = instruction_logprobs(r, asks, MIXED)
    own = [instruction_logprobs(r, [x], a)[0] for x, a in zip(asks, routed, strict=True)]
    gains = [gain(o, m) for o, m in zip(own, mixed, strict=True)]
    assert len(set(round(g, 6) for g in gains)) > 1
    # 0.0: the task adapter answers exactly where it finds the instruction likelier than mixed does
    for margin in (min(gains) - 1e-4, 0.0, sorted(gains)[len(gains) // 2], max(gains) + 1e-4):
        r.gate_margin = margin
        got = r.select(asks)
        want = [a if g > margin else MIXED for a, g in zip(routed, gains, strict=True)]
        assert [s.adapter for s in got] == want
        for s, g in zip(got, gains, strict=True):
            assert (s.fallback is not None and s.fallback.startswith("gate:")) == (g <= margin)
    assert passes((-1.0, 2), (-3.0, 2), 0.9) and not passes((-3.0, 2), (-1.0, 2), 0.0)


def test_cache_hits_misses_resumes_and_refuses_other_weights(store, tmp_path):
    r = router(store)
    rows = held_out()
    names = [*r.adapters.values(), MIXED, BASE]
    cache = AnswerCache(tmp_path / "c", r)
    cache.fill(rows, names, "ref")
    assert cache.computed == len({row_key(x) for x in rows}) * len(names)  # a repeated row once
    again = AnswerCache(tmp_path / "c", r)
    again.fill(rows, names, "ref")
    assert again.computed == 0 and again.get("ref", MIXED, rows[0]) == cache.get("ref", MIXED, rows[0])
    path = tmp_path / "c" / "mixed.json"  # an interrupted fill: two rows of mixed never written
    data = json.loads(path.read_text())
    for row in rows[:2]:
        del data["ref"][row_key(row)]
    path.write_text(json.dumps(data))
    resumed = AnswerCache(tmp_path / "c", r)
    resumed.fill(rows, names, "ref")
    assert resumed.computed == 2
    assert resumed.get("ref", MIXED, rows[0]) == pytest.approx(cache.get("ref", MIXED, rows[0]))
    data = json.loads(path.read_text())
    data["identity"]["files"] = {"x": "y"}
    path.write_text(json.dumps(data))
    with pytest.raises(CacheError, match=r"mixed.json: made with other weights of '_mixed'"):
        AnswerCache(tmp_path / "c", r).get("ref", MIXED, rows[0])
    with pytest.raises(KeyError, match="no cached answer of adapter '_mixed'"):
        AnswerCache(tmp_path / "d", r).get("answer", MIXED, rows[0])


def test_scoring_by_lookup_equals_scoring_directly(store, tmp_path):
    r = router(store, gate_margin=None)
    rows = [x for x in held_out() if x["task"] != "other"]
    cache = AnswerCache(tmp_path / "c", r, max_new_tokens=3)
    names = [*r.adapters.values(), MIXED, BASE]
    cache.fill(rows, names, "ref")
    for name in names:
        direct = per_task_ppl(r, rows, [name] * len(rows))
        got = compare_ppl(cache, rows, name)
        assert got == pytest.approx(direct, rel=1e-5)
    oracle = [r.adapters[x["task"]] for x in rows]
    cache.fill_pairs(list(zip(rows, oracle, strict=True)), "answer")
    said = [cache.get("answer", a, x) for x, a in zip(rows, oracle, strict=True)]
    assert said == answers_for(r, rows, oracle, 3)


def compare_ppl(cache, rows, name) -> dict[str, float]:
    out = {}
    for t in sorted({x["task"] for x in rows}):
        ref = [cache.get("ref", name, x) for x in rows if x["task"] == t]
        out[t] = math.exp(-sum(lp for lp, _ in ref) / sum(n for _, n in ref))
    return out


def test_compare_writes_json_and_renders_table_and_png_from_it(store, tmp_path):
    r = router(store, min_in_distribution=None)
    rows = held_out()
    got = compare(r, rows, tmp_path / "cache", tmp_path / "out", max_new_tokens=3, rows_from="test rows")
    opts = got["options"]
    assert list(opts) == [o for o in OPTIONS if o != "evidence"]  # this store has no evidence rule
    assert got["gate_margin"] == {"routed": 0.25, "top1": 0.25, "arrow": 0.25}
    assert got["labels"]["arrow"][
        "coverage"
    ] == 1.0 and "gate margins: gated 0.25, top1_gated 0.25" in markdown(got)
    per_row = got["per_row"]  # each gated option: its base's adapter where the gate passes, else mixed
    for name, base in GATED.items():
        assert all(
            g in (b, MIXED) for g, b in zip(per_row[name]["adapter"], per_row[base]["adapter"], strict=True)
        )
    assert got["covered"] == ["alpha", "beta"] and got["per_task_rows"] == {"alpha": 4, "beta": 4, "other": 2}
    other = opts["oracle"]["other"]  # no adapter for `other`: the oracle falls back to mixed
    assert {k: other[k] for k in opts["mixed"]["other"]} == opts["mixed"]["other"]
    assert other["vs_mixed"] == {"n": 2, "mean": 0.0, "low": 0.0, "high": 0.0}
    for k in ("routed", "gated", "oracle", "base"):
        ci = opts[k]["all"]["vs_mixed"]
        assert ci["n"] == 10 and ci["low"] <= ci["mean"] <= ci["high"]
        assert ci["mean"] == pytest.approx(opts[k]["all"]["rougeL"] - opts["mixed"]["all"]["rougeL"])
    saved = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert saved["options"] == json.loads(json.dumps(opts))
    md = (tmp_path / "out" / "compare.md").read_text()
    assert md == markdown(saved) and "| alpha | 4 |" in md and "| all | 10 |" in md and "routed − mixed" in md
    (tmp_path / "out" / "compare.md").unlink()
    (tmp_path / "out" / "compare.png").unlink()
    md_path, png = render(tmp_path / "out" / "compare.json")  # from the JSON alone
    assert md_path.read_text() == md and png.stat().st_size > 10_000
    lab = got["labels"]["top1"]  # no fallback: every row routed, the two `other` rows wrongly
    assert lab["coverage"] == 1.0 and lab["right"] <= 0.8
    twice = pool([saved, saved], "two folds")  # folds pool by their per-row scores
    assert twice["rows"] == 20 and twice["options"]["routed"]["all"]["rougeL"] == pytest.approx(
        opts["routed"]["all"]["rougeL"]
    )
    assert twice["labels"] == got["labels"] and twice["options"]["gated"]["alpha"]["vs_mixed"]["n"] == 8
    # scored again from a warm cache: nothing is computed, the numbers are the same
    again = compare(r, rows, tmp_path / "cache", tmp_path / "out2", max_new_tokens=3, rows_from="test rows")
    assert again["options"] == got["options"]
    with pytest.raises(ValueError, match=r"x: row 2 needs instruction, output and task"):
        compare(r, [rows[0], {"instruction": "a"}], tmp_path / "c3", tmp_path / "o3", rows_from="x")


def test_margin_sweep_and_choice_on_reference_likelihood(store, tmp_path):
    r = router(store, min_in_distribution=None)
    rows = held_out()
    cache = AnswerCache(tmp_path / "c", r)
    routed = [s.adapter for s in select_all(r, rows)]
    sweep = margin_sweep([(cache, rows, routed)], margins=(-1e9, 0.0, math.inf))
    assert sweep[0]["routed"] == 1.0 and sweep[-1]["routed"] == 0.0
    assert all(p["mean"] == 0.0 and p["low"] == 0.0 for p in sweep[-1]["per_task"].values())
    assert gated(cache, rows, routed, math.inf) == [MIXED] * len(rows)
    m = choose_margin(sweep)
    chosen = next(s for s in sweep if margin_value(s["margin"]) == m)
    assert all(p["low"] >= 0.0 for p in chosen["per_task"].values())
    fake = [
        {"margin": 0.0, "routed": 1.0, "per_task": {"a": {"n": 4, "mean": 0.5, "low": -0.3, "high": 1.0}}},
        {"margin": 0.2, "routed": 0.5, "per_task": {"a": {"n": 4, "mean": 0.2, "low": 0.01, "high": 0.4}}},
        {
            "margin": math.inf,
            "routed": 0.0,
            "per_task": {"a": {"n": 4, "mean": 0.0, "low": 0.0, "high": 0.0}},
        },
    ]
    assert choose_margin(fake) == 0.2 and choose_margin(fake, tolerance=0.5) == 0.0


def test_a_margin_of_inf_is_written_as_the_string_inf_and_read_back(store, tmp_path):
    def refuse(constant: str):
        raise AssertionError(f"{constant} is not strict JSON")

    r = router(store)
    got = compare(r, held_out(), tmp_path / "c", tmp_path / "o", math.inf, answers=False)
    data = json.loads((tmp_path / "o" / "compare.json").read_text(), parse_constant=refuse)
    assert data["gate_margin"] == {"routed": "inf", "top1": "inf", "arrow": "inf"} == got["gate_margin"]
    assert margins_of(data["gate_margin"]) == {"routed": math.inf, "top1": math.inf, "arrow": math.inf}
    assert set(data["per_row"]["gated"]["adapter"]) == {MIXED}  # inf: never route
    cache = AnswerCache(tmp_path / "c", r)
    sweep = margin_sweep([(cache, held_out(), data["per_row"]["routed"]["adapter"])], margins=(0.0, math.inf))
    assert json.loads(json.dumps(sweep), parse_constant=refuse)[-1]["margin"] == "inf"
    assert margin_value("inf") == math.inf and margin_value(0.25) == 0.25 and margin_value(None) is None
    assert choose_margin([{"margin": "inf", "routed": 0.0, "per_task": {}}]) == math.inf


def test_paired_bootstrap():
    assert paired_bootstrap([0.1] * 20) == pytest.approx({"n": 20, "mean": 0.1, "low": 0.1, "high": 0.1})
    s = paired_bootstrap([0.0, 1.0] * 50, seed=1)
    assert s["mean"] == 0.5 and 0.38 < s["low"] < 0.5 < s["high"] < 0.62
    assert paired_bootstrap([])["low"] is None


def fake_lockbox(box: Path) -> Path:
    """A lockbox shaped like data/lockbox (two halves, the builder's seal layout); the real one's
    rows are never read by tests."""
    box.mkdir()
    seal = {"seed": 1, "covered": ["alpha"], "not_covered": [], "halves": {}, "opened": []}
    for half, rows in (("A", held_out()[:5]), ("B", held_out()[5:])):
        path = write_jsonl(box / f"half_{half.lower()}.jsonl", rows)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        seal["halves"][half] = {"file": path.name, "sha256": digest, "rows": len(rows)}
    (box / "lockbox.json").write_text(json.dumps(seal, indent=2) + "\n")
    return box


def test_the_lockbox_opens_only_through_its_seal(tmp_path):
    box = fake_lockbox(tmp_path / "lockbox")
    seal = box / "lockbox.json"
    before = seal.read_text()
    with pytest.raises(LockboxError, match=r"half B stays sealed until half A has failed once"):
        open_half(box, "B", "try")
    with pytest.raises(LockboxError, match=r"half B: half A was never opened"):
        open_half(box, "B", "try", after_a_failed=True)
    with pytest.raises(LockboxError, match=r"no half 'C'"):
        open_half(box, "C", "try")
    with pytest.raises(LockboxError, match=r"needs a reason"):
        open_half(box, "A", " ")
    body = (box / "half_a.jsonl").read_bytes()
    (box / "half_a.jsonl").write_bytes(body.replace(b"one", b"two", 1))
    with pytest.raises(LockboxError, match=r"half_a.jsonl: sha256 \w+ does not match the seal's"):
        open_half(box, "A", "tampered")
    assert seal.read_text() == before  # nothing written when refused
    (box / "half_a.jsonl").write_bytes(body)
    rows = open_half(box, "A", "gate default", command="lorachain route eval ...")
    assert len(rows) == json.loads(before)["halves"]["A"]["rows"] and {"instruction", "task"} <= set(rows[0])
    log = json.loads(seal.read_text())["opened"]
    assert [(o["half"], o["reason"]) for o in log] == [("A", "gate default")]
    assert list(json.loads(seal.read_text())) == list(json.loads(before))  # the builder's key order
    assert (
        len(open_half(box, "B", "A failed", after_a_failed=True)) == json.loads(before)["halves"]["B"]["rows"]
    )


def test_arrow_prototypes_and_scores(tmp_path):
    torch.manual_seed(0)
    a, b = torch.randn(2, 6), torch.randn(5, 2)
    save_file({"m.proj.lora_A.weight": a, "m.proj.lora_B.weight": b}, str(tmp_path / ADAPTER_WEIGHTS))
    v = prototypes(tmp_path)["m.proj"]
    top = torch.linalg.svd(b @ a).Vh[0]
    assert torch.allclose(v.abs(), top.abs(), atol=1e-5) and abs(float(v @ top)) == pytest.approx(
        1.0, abs=1e-5
    )

    class Toy(torch.nn.Module):  # token i embeds as the i-th basis vector; one hooked module
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding.from_pretrained(torch.eye(4))
            self.proj = torch.nn.Linear(4, 4)

        def forward(self, input_ids, attention_mask):
            return self.proj(self.emb(input_ids))

    e = torch.eye(4)
    protos = {"x": {"proj": e[0]}, "y": {"proj": e[1]}}
    scores = arrow_scores(Toy(), [[0, 0, 2], [1, 1], [1, 0, 1, 1]], protos, pad_id=3)  # (3, 2)
    assert scores.argmax(-1).tolist() == [0, 1, 1] and torch.allclose(scores.sum(-1), torch.ones(3))
