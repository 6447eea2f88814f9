"""Task routing on a tiny model: split, selection, store integrity, LRU, eval, CLI."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import torch
from conftest import make_tokenizer, route_rows, tiny_model, write_jsonl
from peft import PeftModel

from lorachain.config import from_dict
from lorachain.data import DataError
from lorachain.routing.config import RouteConfig
from lorachain.routing.data import read_instruction_rows, stratified_split
from lorachain.routing.eval.judge import human_rates, judge_score
from lorachain.routing.eval.store import route_eval
from lorachain.routing.select import Selection, decide, kmp_find_all, match_labels, rank_scores
from lorachain.routing.train import route_train
from lorachain.serve.router import Router
from lorachain.store import MIXED, SELECTOR, StoreError, read_manifest


def route_cfg(tmp: Path, data: Path) -> RouteConfig:
    return from_dict(
        RouteConfig,
        {
            "model": {"name_or_path": "tiny"},
            "data": {"path": str(data), "max_length": 16},
            "prompt": "{instruction} =>",
            "task_prompt": "{instruction} task:",
            "chain": {"links": [{"rank": 4, "alpha": 8}], "dropout": 0.0},
            "selector_chain": {"links": [{"rank": 4, "alpha": 8}, {"rank": 2, "alpha": 4}], "dropout": 0.0},
            "optim": {"lr": 0.02},
            "train": {"epochs": 3, "batch_size": 4},
            "selector": {"kind": "lora", "gate": "none"},  # the mechanics of selection: no gate
            "output_dir": str(tmp / "store"),
        },
    )


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("route")
    data = write_jsonl(tmp / "rows.jsonl", route_rows(20))
    manifest = route_train(route_cfg(tmp, data), tiny_model("llama"), make_tokenizer(), progress=False)
    assert manifest is not None
    return tmp / "store"


def router(store: Path, **kw) -> Router:
    return Router.from_store(store, model=tiny_model("llama"), tokenizer=make_tokenizer(), **kw)


def test_split_is_stratified_and_reproducible(tmp_path):
    rows = read_instruction_rows(write_jsonl(tmp_path / "r.jsonl", route_rows(10)))
    a, b = stratified_split(rows, seed=3), stratified_split(rows, seed=3)
    assert [r.line for r in a["test"]] == [r.line for r in b["test"]]
    assert stratified_split(rows, seed=4)["test"] != a["test"]
    for part, n in (("train", 6), ("val", 2), ("test", 2)):
        assert sorted({r.task for r in a[part]}) == ["alpha", "beta", "gamma"]
        assert all(sum(r.task == t for r in a[part]) == n for t in ("alpha", "beta", "gamma"))
    assert not {r.line for r in a["train"]} & {r.line for r in a["test"]}


def test_bad_rows_are_reported_by_line(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(
        '{"instruction": "x", "output": "y", "task": "a"}\n{"instruction": "x", "output": "y", "task": ""}\n'
        '{"instruction": "x", "task": "a"}\n'
    )
    with pytest.raises(DataError, match=r"r.jsonl: line 2: missing or empty field 'task' \(and 1 more\)"):
        read_instruction_rows(path)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("the task is sentiment.", ["sentiment"]),
        ("topic_classification or sentiment", ["topic_classification", "sentiment"]),
        ("SENTIMENT then topic_classification then sentiment", ["sentiment", "topic_classification"]),
        ("closed_book_qa", ["closed_book_qa"]),  # "qa"-like shorter labels inside do not count
        ("nothing here", []),
    ],
)
def test_match_labels(text, expected):
    labels = ["sentiment", "topic_classification", "closed_book_qa", "book"]
    assert match_labels(text, labels) == expected


def test_kmp_finds_overlapping_occurrences():
    assert kmp_find_all("aaaa", "aa") == [0, 1, 2]
    assert kmp_find_all("abcabcab", "cab") == [2, 5]
    assert kmp_find_all("abc", "") == []


def test_rank_scores_and_fallback():
    ranked, probs = rank_scores(["a", "b", "c"], [-1.0, -3.0, -0.5])
    assert ranked == ["c", "a", "b"]
    assert sum(probs) == pytest.approx(1) and probs[0] == pytest.approx(
        1 / (1 + torch.e**-0.5 + torch.e**-2.5)
    )
    sel = decide(Selection(ranked, probs), {"a", "b", "c"}, MIXED, min_confidence=0.9)
    assert sel.adapter == MIXED and "probability" in sel.fallback
    assert (
        decide(Selection([], []), {"a"}, MIXED, 0.0).fallback
        == "no task label found in the selector's output"
    )
    assert decide(Selection(["a"], [1.0]), {"a"}, MIXED, 0.0).adapter == "a"


@pytest.mark.parametrize("mode", ["score", "generate"])
def test_selector_reaches_full_accuracy_on_separable_tasks(store, mode):
    r = router(store, mode=mode)
    test = [json.loads(x) for x in (store / "splits" / "test.jsonl").read_text().splitlines()]
    sels = r.select([t["instruction"] for t in test])
    assert [s.ranked[0] for s in sels] == [t["task"] for t in test]
    assert all(s.fallback is None for s in sels)
    if mode == "score":
        assert all(len(s.ranked) == 3 and s.scores[0] > 0.34 for s in sels)


def test_store_layout_and_plain_peft_loading(store):
    m = read_manifest(store)
    assert m.labels == ["alpha", "beta", "gamma"]
    assert set(m.adapters) == {"alpha", "beta", "gamma", MIXED, SELECTOR}
    assert m.adapters[SELECTOR]["summary"]["links"][0]["rank"] == 4  # the selector is a 2-link chain
    assert len(m.adapters[SELECTOR]["summary"]["links"]) == 2
    for a in m.adapters.values():
        assert all(len(h) == 64 for h in a["files"].values())
        PeftModel.from_pretrained(tiny_model("llama"), str(store / a["path"]))  # a standard adapter, name


def test_lru_never_exceeds_bound_and_evicts_least_recent(store):
    r = router(store, cache_size=2)
    assert r.activate("alpha") is True
    assert r.activate("beta") is True
    assert r.activate("alpha") is False  # cached: alpha is now most recent
    assert r.activate("gamma") is True  # evicts beta
    assert list(r.cache) == ["alpha", "gamma"]
    assert set(r.model.peft_config) == {SELECTOR, "slot0"}  # one PEFT slot runs every resident adapter


def test_slot_reuse_gives_the_same_outputs_as_a_fresh_load(store):
    r = router(store, cache_size=1)
    x = torch.tensor([[2, 49, 50, 49]])
    for name in ("alpha", "beta", "gamma", "alpha"):
        r.activate(name)  # one resident: every load after the first reads into the evicted buffer
        with torch.no_grad():
            got = r.model(input_ids=x).logits
        fresh = PeftModel.from_pretrained(tiny_model("llama"), str(store / "adapters" / name)).eval()
        with torch.no_grad():
            torch.testing.assert_close(got, fresh(input_ids=x).logits)
    assert set(r.model.peft_config) == {SELECTOR, "slot0"}


def test_ask_answers_with_the_chosen_adapter(store):
    r = router(store)
    answers = r.ask(["red sky red", "blue sea blue"])
    assert [a.task for a in answers] == ["alpha", "beta"]
    assert [a.adapter for a in answers] == ["alpha", "beta"]
    assert all(set(a.timings) == {"select_s", "swap_s", "generate_s"} for a in answers)
    direct = r.ask(["red sky red"], adapter="alpha")[0]
    assert direct.answer == answers[0].answer and direct.top_k == []


def test_tampered_file_and_wrong_base_are_refused(store, tmp_path):
    import shutil

    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    weights = copy / "adapters" / "beta" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    r = router(copy)
    with pytest.raises(StoreError, match=r"beta/adapter_model.safetensors: sha256 does not match"):
        r.activate("beta")
    other = tiny_model("llama")
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    with pytest.raises(StoreError, match="another weight fingerprint"):
        Router.from_store(store, model=other, tokenizer=make_tokenizer())
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "format": 99}))
    with pytest.raises(StoreError, match="store format 99 is newer"):
        read_manifest(copy)


class _Judge(BaseHTTPRequestHandler):
    seen: list = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Judge.seen.append((self.path, body))
        reply = {"choices": [{"message": {"role": "assistant", "content": "Rating: 5"}}]}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def judge_url():
    server = HTTPServer(("127.0.0.1", 0), _Judge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()


def test_judge_parses_rating(judge_url):
    assert judge_score(judge_url, "m", "do x", "ref", "ans") == 5
    path, body = _Judge.seen[-1]
    assert (
        path == "/v1/chat/completions" and body["model"] == "m" and "do x" in body["messages"][0]["content"]
    )


def test_route_eval_writes_report(store, tmp_path, judge_url):
    result = route_eval(
        router(store),
        store,
        tmp_path / "eval",
        max_per_task=2,
        max_new_tokens=4,
        judge_url=judge_url,
        judge_model="m",
    )
    assert result["test_rows"] == 6
    assert result["selection"]["score"]["top1"] == 1.0 and result["selection"]["generate"]["top1"] == 1.0
    for kind in ("oracle", "mixed", "routed"):
        assert set(result["perplexity"][kind]) == {"alpha", "beta", "gamma"}
        assert all(v > 1 for v in result["perplexity"][kind].values())
    # routing is perfect here, so the routed chain is the oracle
    assert result["perplexity"]["routed"] == result["perplexity"]["oracle"]
    assert result["judge"]["routed"] == {"alpha": 5.0, "beta": 5.0, "gamma": 5.0}
    for f in (
        "route_eval.json",
        "route_eval.md",
        "confusion_score.png",
        "confusion_generate.png",
        "human_eval.csv",
    ):
        assert (tmp_path / "eval" / f).is_file()
    assert "| alpha | 2 |" in (tmp_path / "eval" / "route_eval.md").read_text()


def test_base_row_is_the_model_with_its_adapters_disabled(store, tmp_path):
    """route_eval's base row: perplexity and greedy answers of the model with no adapter, equal to
    the same computation on the plain (never wrapped) base model."""
    from lorachain.data import encode_row
    from lorachain.metrics import perplexity
    from lorachain.routing.eval.store import BASE, answers_for, load_test_rows, quality
    from lorachain.training.evaluate import sequence_logprobs

    r = router(store)
    result = route_eval(r, store, tmp_path / "eval", max_per_task=2, modes=("score",), max_new_tokens=3)
    rows = load_test_rows(store, 2)
    plain, tok = tiny_model("llama"), make_tokenizer()  # the store's base, seeded alike
    examples = [encode_row(r.answer_cfg, tok, row, "test", classifier=False) for row in rows]
    scored = sequence_logprobs(plain, examples, tok.pad_token_id, 8)
    for task in ("alpha", "beta", "gamma"):
        mine = [s for row, s in zip(rows, scored, strict=True) if row["task"] == task]
        direct = perplexity(-sum(lp for lp, _ in mine), sum(n for _, n in mine))
        assert result["perplexity"]["base"][task] == pytest.approx(direct, rel=1e-5)
    pooled = perplexity(-sum(lp for lp, _ in scored), sum(n for _, n in scored))
    assert result["overall"]["perplexity"]["base"] == pytest.approx(pooled, rel=1e-5)
    # the adapters are on again after the base row: every trained adapter beats the random base
    for kind in ("oracle", "mixed", "routed"):
        assert all(
            result["perplexity"][kind][t] < result["perplexity"]["base"][t]
            for t in "alpha beta gamma".split()
        )
    assert result["perplexity"]["routed"] == result["perplexity"]["oracle"]
    # greedy base answers are the plain model's
    base = answers_for(r, rows, [BASE] * len(rows), 3)
    for row, got in zip(rows, base, strict=True):
        ids = torch.tensor([r.answer_prompt(row["instruction"], 3)])
        out = plain.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert got == tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
    assert result["quality"]["base"] == quality(rows, base)
    md = (tmp_path / "eval" / "route_eval.md").read_text()
    assert "base model (no adapter)" in md and f"| all | {len(rows)} |" in md


def test_demo_routing_summary_has_routed_base_and_mixed(store, tmp_path):
    """The demo's table is route_eval's numbers per task plus a pooled row, with the budgets."""
    from lorachain.demo import format_routing, routing_config, routing_summary

    s = routing_summary(router(store), store, tmp_path / "eval", max_new_tokens=3)
    result = json.loads((tmp_path / "eval" / "route_eval.json").read_text())
    tasks = ["alpha", "beta", "gamma"]
    assert list(s["table"]) == [*tasks, "all"]
    for t in tasks:
        row = s["table"][t]
        assert row["n"] == result["per_task_rows"][t] and row["selector_top1"] == 1.0
        for k in ("routed", "base", "mixed"):
            assert row["perplexity"][k] == result["perplexity"][k][t]
            assert row["exact_match"][k] == result["quality"][k][t]["exact_match"]
            assert row["rougeL"][k] == result["quality"][k][t]["rougeL"]
    every = s["table"]["all"]
    assert every["n"] == s["test_instructions"] == sum(s["table"][t]["n"] for t in tasks)
    for k in ("routed", "base", "mixed"):
        per = [s["table"][t]["perplexity"][k] for t in tasks]
        assert min(per) <= every["perplexity"][k] <= max(per)  # pooled over the tokens of all
        for metric in ("exact_match", "rougeL"):  # answers: the mean over all rows
            mean = sum(s["table"][t]["n"] * s["table"][t][metric][k] for t in tasks) / every["n"]
            assert every[metric][k] == pytest.approx(mean)
    assert every["perplexity"]["routed"] < every["perplexity"]["base"]
    assert every["perplexity"]["mixed"] < every["perplexity"]["base"]
    # every adapter had the same passes over its own rows: the mixed one as many steps as all tasks
    b = s["budget"]
    assert {x["epochs"] for x in b.values()} == {3}
    assert b[MIXED]["train_rows"] == sum(b[t]["train_rows"] for t in tasks) == 36
    assert b[MIXED]["steps"] == sum(b[t]["steps"] for t in tasks) == 27
    table = format_routing(s).splitlines()
    assert table[1].split() == ["task", "n", "top-1", *["routed", "base", "mixed"] * 3]
    assert table[-1].split()[:6] == ["all", "12", "1.000"] + [
        f"{every['perplexity'][k]:.2f}" for k in ("routed", "base", "mixed")
    ]
    # the demo's own store gives the mixed adapter and the selector the task adapters' budget
    cfg = from_dict(RouteConfig, routing_config(tmp_path / "demo"))
    assert cfg.mixed_train == cfg.train == cfg.selector_train and cfg.train.epochs == 3


def test_demo_routing_part_end_to_end_on_a_tiny_model(tiny_dir, tmp_path, capsys):
    """run_routing_demo on the embedded T0 rows with a tiny model: store, table, budgets, times."""
    from lorachain.demo import run_routing_demo

    s = run_routing_demo(tmp_path / "routing", "fp32", epochs=1, model=str(tiny_dir))
    out = capsys.readouterr().out
    assert s["test_instructions"] == 32 and list(s["table"])[-1] == "all"
    assert len(s["table"]) == 5 and s["table"]["all"]["n"] == 32
    b = s["budget"]  # 24 train rows per task, 96 in all, batches of 4, one epoch each
    assert [b[t]["steps"] for t in b if b[t]["kind"] == "task"] == [6, 6, 6, 6]
    assert b[MIXED]["steps"] == b[SELECTOR]["steps"] == 24
    ppl = s["table"]["all"]["perplexity"]
    assert all(1 < v < float("inf") for v in ppl.values()) and ppl["base"] != ppl["mixed"]
    w = s["wall_seconds"]
    assert w["total"] >= w["train"] + w["eval"] > 0
    assert "each of the 4 task adapters: 1 epoch over its own task's 24 train rows" in out
    assert "mixed adapter: 1 epoch over all 96 train rows (24 steps of 4)" in out
    assert len(s["examples"]) == 4 and (tmp_path / "routing" / "eval" / "route_eval.md").is_file()


def test_human_rates(tmp_path):
    sheet = tmp_path / "s.csv"
    sheet.write_text(
        "instruction,task,adapter,answer,rating\nx,a,a,y,pass\nx,a,a,y,Excellent\nx,b,b,y,fail\nx,b,b,y,\n"
    )
    rates = human_rates(sheet)
    assert rates["overall"] == {"rated": 3, "excellent": 1 / 3, "pass": 1 / 3, "fail": 1 / 3}
    assert rates["per_task"]["a"]["fail"] == 0.0
    sheet.write_text("instruction,task,adapter,answer,rating\nx,a,a,y,great\n")
    with pytest.raises(DataError, match="line 2: rating 'great'"):
        human_rates(sheet)


def test_cli_ask_and_route_train(tmp_path, capsys):
    """`lorachain route train` then `lorachain ask` on a tiny model saved to disk."""
    import yaml

    from lorachain.cli import main

    model_dir = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    data = write_jsonl(tmp_path / "rows.jsonl", route_rows(10))
    cfg = json.loads(route_cfg(tmp_path, data).to_json())
    cfg["model"]["name_or_path"] = str(model_dir)
    (tmp_path / "route.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["route", "train", str(tmp_path / "route.yaml"), "train.epochs=4"]) == 0
    capsys.readouterr()
    assert main(["ask", str(tmp_path / "store"), "green leaf green", "--max-new-tokens", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["task"] == "gamma" and out["adapter"] == "gamma" and len(out["top_k"]) == 3
    assert main(["ask", str(tmp_path / "nowhere"), "x"]) == 2
    assert "no manifest" in capsys.readouterr().err


def test_bad_rows_can_be_skipped_with_a_report(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(
        '{"instruction": "x", "output": "y", "task": "a"}\n{"instruction": "x", "output": "", "task": "a"}\n'
    )
    rejected: list[str] = []
    rows = read_instruction_rows(path, rejected=rejected)
    assert [r.line for r in rows] == [1]
    assert rejected == [f"{path}: line 2: missing or empty field 'output'"]


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_cached_label_scoring_equals_full_sequences(family):
    from lorachain.data import Example
    from lorachain.training.evaluate import continuation_logprobs, sequence_logprobs

    model = tiny_model(family)
    prompt, labels = [2, 10, 11, 12, 13], [[20], [21, 22, 23], [24, 25]]
    cached = continuation_logprobs(model, prompt, labels)
    full = sequence_logprobs(model, [Example(prompt + c, [-100] * 5 + c, None, 5) for c in labels], 0, 8)
    assert cached == pytest.approx([s for s, _ in full], abs=1e-4)


def test_adapter_of_wrong_shape_is_refused_with_one_line(store, tmp_path):
    """A store whose adapter files do not fit the base (here: rank 4 weights behind a rank-8
    config, hashes made to match, as a broken producer would) fails naming the adapter."""
    import shutil

    from lorachain.store import file_hashes, write_manifest

    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    cfg_path = copy / "adapters" / "beta" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["r"] = 8
    cfg_path.write_text(json.dumps(cfg))
    m = read_manifest(copy)
    m.adapters["beta"]["files"] = file_hashes(copy / "adapters" / "beta", copy)
    write_manifest(copy, m)
    r = router(copy, cache_size=2)
    with pytest.raises(StoreError, match=r"adapters/beta: does not fit the base model"):
        r.activate("beta")
    r.activate("alpha")  # the router still works
