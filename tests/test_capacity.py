"""The capacity task (key -> value memorisation): generated pairs, scores, curves in the grid."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lorachain.config import RunConfig, from_dict
from lorachain.data import DataError, load_examples
from lorachain.experiment.config import ExperimentConfig
from lorachain.experiment.runner import run_experiment
from lorachain.metrics import char_accuracy
from lorachain.tasks import get_task
from lorachain.tasks.capacity import HEX, Spec, pairs
from lorachain.training.evaluate import generate_greedy, teacher_forced_accuracy
from lorachain.training.loop import train

CHARS = ["[PAD]", "[UNK]", "[EOS]", "k", ":", "=", *HEX]


def char_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(CHARS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]"
    )


@pytest.fixture
def char_model_dir(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(CHARS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=0, eos_token_id=2, bos_token_id=2,
    )  # fmt: skip
    path = tmp_path / "char-llama"
    LlamaForCausalLM(cfg).save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


def test_pairs_are_seeded_distinct_and_refuse_more_than_the_key_space():
    a, b = pairs(Spec(n=200, key_len=2, value_len=8, seed=3)), pairs(Spec(n=200, key_len=2, seed=3))
    assert a == b and len({k for k, _ in a}) == 200
    assert all(len(k) == 2 and len(v) == 8 and set(k + v) <= set(HEX) for k, v in a)
    assert pairs(Spec(n=200, key_len=2, seed=4)) != a
    with pytest.raises(DataError, match=r"capacity\.n: 300 pairs .* only 256"):
        Spec(n=300, key_len=2)
    with pytest.raises(DataError, match=r"capacity\.size: unknown key"):
        get_task("capacity").load({"size": 3})
    ex = get_task("capacity").load({"n": 3, "key_len": 4, "value_len": 6, "seed": 0})
    assert ex[0].prompt == f"k:{pairs(Spec(3, 4, 6, 0))[0][0]}=" and len(ex[0].answers[0]) == 6


def test_char_accuracy_counts_positions():
    assert char_accuracy("9c0e41bd", "9c0e41bd") == 1.0
    assert char_accuracy(" 9c0e41bx\n", "9c0e41bd") == 7 / 8
    assert char_accuracy("c0e41bd", "9c0e41bd") == 0.0  # shifted by one: every position wrong
    assert char_accuracy("", "9c0e41bd") == 0.0


def test_teacher_forced_exact_match_is_greedy_exact_match(tmp_path, char_model_dir):
    """seq_acc (one forward) counts exactly the pairs greedy decoding writes in full, on a model that
    has memorised some pairs but not all."""
    rows = [{"prompt": f"k:{k}=", "target": v} for k, v in pairs(Spec(n=24, key_len=2, value_len=4, seed=1))]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = {
        "model": {"name_or_path": str(char_model_dir)},
        "data": {"train": str(tmp_path / "pairs.jsonl"), "prompt": "{prompt}", "target": "{target}",
                 "label_field": None, "max_length": 16},
        "chain": {"method": "full"}, "optim": {"lr": 0.01},
        "train": {"max_steps": 40, "batch_size": 8, "save_every": 100},
        "output_dir": str(tmp_path / "run"),
    }  # fmt: skip
    cfg = from_dict(RunConfig, raw)
    model = train(cfg, progress=False).model.eval()
    tok = char_tokenizer()
    examples = load_examples(cfg.data.train, cfg.data, tok, False)
    tf = teacher_forced_accuracy(model, examples, tok.pad_token_id, 8)
    greedy = generate_greedy(model, tok, [r["prompt"] for r in rows], max_new_tokens=6, batch_size=8)
    em = sum(g.strip() == r["target"] for g, r in zip(greedy, rows, strict=True)) / len(rows)
    assert 0 < tf["seq_acc"] < 1  # some memorised, some not: the comparison means something
    assert tf["seq_acc"] == em
    # token_acc by hand: each target token against the argmax after its gold prefix
    hits = total = 0
    with torch.no_grad():
        for e in examples:
            logits = model(input_ids=torch.tensor([e.input_ids])).logits[0]
            for t in range(e.prompt_len, len(e.input_ids)):
                hits += int(logits[t - 1].argmax() == e.input_ids[t])
                total += 1
    assert tf["token_acc"] == pytest.approx(hits / total)


def test_the_grid_runs_the_capacity_task_with_a_curve(tmp_path, char_model_dir):
    cfg = from_dict(
        ExperimentConfig,
        {
            "model": {"name_or_path": str(char_model_dir)},
            "tasks": ["capacity"],
            "paths": {"capacity": {"n": 20, "key_len": 2, "value_len": 4, "seed": 0}},
            "lrs": [0.01], "n_train": 20, "n_val": 8, "n_test": 20, "max_length": 16, "max_new_tokens": 6,
            "base": {"chain": {"dropout": 0.0}, "train": {"max_steps": 6, "batch_size": 4, "eval_every": 2}},
            "methods": {"lora": {"chain": {"links": [{"rank": 2, "alpha": 4}]}}},
            "output_dir": str(tmp_path / "exp"),
        },
    )  # fmt: skip
    assert run_experiment(cfg, progress=False)["computed"] == 1
    row = json.loads((tmp_path / "exp/cells/capacity/lora/seed0/lr0.01/result.json").read_text())
    assert row["test"]["n"] == 20 and row["val"]["n"] == 8  # scored on the training keys themselves
    assert {"char_acc", "em", "score"} <= set(row["test"]) and row["test"]["score"] == row["test"]["char_acc"]
    assert [c["step"] for c in row["curve"]] == [2, 4]  # the end is the test score, not a curve point
    assert all(0 <= c["token_acc"] <= 1 and 0 <= c["seq_acc"] <= 1 for c in row["curve"])
    report = (tmp_path / "exp" / "report.md").read_text()
    assert "## Capacity: capacity" in report and "| `lora` | 1 |" in report
    assert (tmp_path / "exp" / "curves_capacity.png").stat().st_size > 1000
    bad = cfg.paths | {"capacity": {"n": 300, "key_len": 2}}
    with pytest.raises(DataError, match="capacity.n"):
        run_experiment(
            from_dict(ExperimentConfig, {**json.loads(cfg.to_json()), "paths": bad}), progress=False
        )


def test_the_gap_closed_in_pairs_memorised():
    from lorachain.experiment.capacity import closed

    def entry(em):
        return {"rows": [{"seed": i, "test": {"em": v}} for i, v in enumerate(em)]}

    chosen = {("c", "full"): entry([1.0, 0.9, 0.95]), ("c", "lora"): entry([0.1, 0.2, 0.15])}
    chosen[("c", "chain")] = entry([0.5, 0.6, 0.55])
    text = closed(chosen, "c", "full", "lora", "chain")
    assert text.startswith("0.50 [") and float(text.split("[")[1].split(",")[0]) < 0.5
    chosen[("c", "lora")] = entry([1.0, 0.9, 0.95])
    assert closed(chosen, "c", "full", "lora", "chain") == "no gap"


def test_the_lr_choice_takes_the_lowest_validation_nll():
    from lorachain.experiment.capacity_lr import lr_choice, lr_section

    def row(method, lr, nll, char, task="capacity"):
        return {
            "task": task,
            "method": method,
            "lr": lr,
            "val": {"ref_nll": nll, "char_acc": char, "em": 0.0},
        }

    results = [
        row("full", 5e-5, 2.9, 0.074),  # flat at chance: greedy accuracy cannot tell these apart,
        row("full", 2e-4, 1.7, 0.070),  # but the NLL already does
        row("lora", 2e-3, 2.5, 0.080),
        row("lora", 8e-3, 2.5, 0.090),  # an NLL tie goes to the higher character accuracy
        row("one_lr", 1e-3, 1.0, 0.5),  # a single lr: nothing to choose
        row("sst2_method", 1e-3, 1.0, 0.5, "sst2"),
        row("sst2_method", 2e-3, 0.9, 0.4, "sst2"),  # not a memorisation task
    ]
    choice = lr_choice(results)
    assert set(choice) == {("capacity", "full"), ("capacity", "lora")}
    assert (
        choice[("capacity", "full")]["chosen"] == 2e-4
        and choice[("capacity", "full")]["score_choice"] == 5e-5
    )
    assert choice[("capacity", "lora")]["chosen"] == 8e-3
    text = lr_section(results)
    assert "| capacity | `full` | 0.0002 | 1.700 | 7.0 | 0.0 | **yes** |" in text
    assert "would have chosen otherwise for: full." in text
    assert lr_section(results[4:5]) == ""


def test_a_knot_on_an_eval_step_is_evaluated_once(tmp_path, char_model_dir, monkeypatch):
    import lorachain.training.loop as loop

    calls = []
    real = loop.evaluate
    monkeypatch.setattr(loop, "evaluate", lambda *a, **k: calls.append(1) or real(*a, **k))
    rows = [{"prompt": f"k:{k}=", "target": v} for k, v in pairs(Spec(n=16, key_len=2, value_len=4, seed=2))]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = {
        "model": {"name_or_path": str(char_model_dir)},
        "data": {"train": str(tmp_path / "p.jsonl"), "eval": str(tmp_path / "p.jsonl"), "prompt": "{prompt}",
                 "target": "{target}", "label_field": None, "max_length": 16},
        "chain": {"links": [{"rank": 2, "alpha": 4}, {"rank": 2, "alpha": 4}], "dropout": 0.0},
        "optim": {"lr": 0.01}, "train": {"max_steps": 6, "batch_size": 8, "save_every": 100, "eval_every": 3},
        "output_dir": str(tmp_path / "run"),
    }  # fmt: skip
    summary = train(from_dict(RunConfig, raw), progress=False).summary
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    curve = [m for m in metrics if "eval" in m]
    assert [m["step"] for m in curve] == [3] and summary["links"][0]["end_step"] == 3  # the knot's step
    assert curve[0]["eval"] == summary["links"][0]["eval"]  # the knot's evaluation, not a second one
    assert len(calls) == 2  # the two knots (steps 3 and 6), nothing else


def test_below_the_floor_the_value_nll_orders_methods_and_the_start_is_read_at_25_percent():
    from lorachain.experiment.capacity import closed_nll, curve_by_seed, floor_section

    def entry(nll, spec=None, early=0.2):
        rows = []
        for seed, v in enumerate(nll):
            curve = [
                {"step": 25, "eval_loss": 2.8, "token_acc": early + 0.01 * seed, "seq_acc": 0.0},
                {"step": 50, "eval_loss": 2.7, "token_acc": 0.9, "seq_acc": 0.0},  # past 25% of 100
                {"step": 100, "eval_loss": v, "token_acc": 0.3, "seq_acc": 0.0},
            ]
            rows.append({"seed": seed, "spec": {"steps": 100, "ranks": [1]}, "curve": curve, "test": {}})
        return {"rows": rows, "spec": spec or {"ranks": [1]}}

    chosen = {
        ("c", "full"): entry([0.0, 0.2, 0.1], {"method": "full"}),
        ("c", "lora"): entry([2.5, 2.4, 2.6]),
    }
    chosen[("c", "chain")] = entry([2.25, 2.15, 2.35], {"ranks": [1, 1]})
    assert curve_by_seed(chosen[("c", "lora")], "eval_loss") == {0: 2.5, 1: 2.4, 2: 2.6}
    early = curve_by_seed(chosen[("c", "lora")], "token_acc", at=0.25)
    assert early == pytest.approx({0: 0.2, 1: 0.21, 2: 0.22})
    text = closed_nll(chosen, "c", "full", "lora", "chain")  # gains 0.25 each over gaps 2.5, 2.2, 2.5
    assert text.startswith(f"{0.75 / 7.2:.3f} [")
    lo, hi = (float(x) for x in text.split("[")[1].rstrip("]").split(","))
    assert lo < 0.75 / 7.2 < hi
    table = floor_section(chosen, "c", ["full", "lora", "chain"])
    assert "| `chain` | 2.250 [" in table and f"| {0.75 / 7.2:.3f} [" in table
    chosen[("c", "chain")] = entry([2.5, 2.4, 2.6], {"ranks": [1, 1]})
    assert closed_nll(chosen, "c", "full", "lora", "chain").startswith("0.000 [")
    assert "| `lora` | 2.500 [" in table and "| 21.0 [" in table  # the early token accuracy, x100


def _cell(em, nll, early, spec, seconds=100.0, rss=1000.0):
    """A chosen grid entry over three seeds: exact match, the curve's end NLL and its 25% token acc."""
    rows = [
        {
            "seed": s,
            "spec": {"steps": 100},
            "test": {"em": em[s]},
            "cost": {"train_seconds": seconds},
            "curve": [
                {"step": 25, "eval_loss": 3.0, "token_acc": early[s], "seq_acc": 0.0},
                {"step": 100, "eval_loss": nll[s], "token_acc": 0.5, "seq_acc": em[s]},
            ],
        }
        for s in range(3)
    ]
    return {"rows": rows, "spec": spec, "peak_rss_mb": rss}


def _words_grid() -> dict:
    one = {"method": "lora", "ranks": [1]}
    four = {"method": "lora", "ranks": [1, 1, 1, 1]}
    full = {"method": "full", "ranks": [8]}
    return {
        ("c", "full"): _cell([0.95, 0.96, 0.94], [0.0, 0.0, 0.0], [0.3] * 3, full, 200.0, 1500.0),
        ("c", "lora"): _cell([0.10, 0.12, 0.08], [2.0, 2.1, 1.9], [0.20, 0.21, 0.19], one),
        ("c", "chain"): _cell([0.50, 0.55, 0.60], [1.0, 1.2, 1.1], [0.20, 0.22, 0.21], four),
        ("c", "chain_g"): _cell(
            [0.10, 0.12, 0.11], [2.0, 2.2, 2.1], [0.10, 0.11, 0.12], four | {"init": "gradient"}
        ),
    }


def test_the_words_follow_the_intervals_the_moonshot_and_the_gradient_start():
    from lorachain.experiment.capacity import in_words

    chosen = _words_grid()
    text = in_words(chosen, "c", ["full", "lora", "chain", "chain_g"])
    assert "- `chain`: pairs memorised: more (+45.0 points [" in text
    assert "; value NLL: lower (-0.900 nats [" in text
    assert "`chain`: 5.50× the pairs, 0.53 of the gap in pairs: **met**" in text
    assert "`chain_g`: 1.10× the pairs" in text and "**not met**" in text
    assert "`chain_g` against `chain`: starts slower than (-10.0 points [" in text
    assert "target 'at least as fast': **not met**" in text
    chosen[("c", "chain_g")]["rows"][0]["curve"][0]["token_acc"] = 0.25  # one seed faster: no direction
    assert "**not shown slower (its interval includes 0)**" in in_words(
        chosen, "c", ["full", "lora", "chain", "chain_g"]
    )


def test_the_advice_names_a_chain_an_init_and_what_to_use_instead_from_the_intervals():
    from lorachain.experiment.capacity import advice

    chosen, methods = _words_grid(), ["full", "lora", "chain", "chain_g"]
    text = advice(chosen, "c", methods)
    assert "- A chain is worth it here: `chain` memorised more pairs than `lora`." in text
    assert "keep the gaussian start (the default, with no gradient pass): `gradient` was shown worse" in text
    assert "token accuracy at 25% of the budget lower (-10.0 points [" in text
    assert "full fine-tuning memorised at least 94.0% of the pairs on every seed" in text
    assert "no adapter memorised more than 60.0% on any, at 1.50× `lora`'s peak RSS and 2.00×" in text
    assert (
        "- Among adapters, `chain` beat `lora` in pairs or value NLL; "
        "the lowest mean value NLL is `chain` (1.100 nats)" in text
    )
    one = {"method": "lora", "ranks": [1, 1, 1, 1]}
    chosen[("c", "chain")] = _cell([0.10, 0.13, 0.07], [1.8, 1.85, 1.65], [0.20, 0.22, 0.21], one)
    text = advice(chosen, "c", methods)  # the NLL lower on every seed: shown
    assert "worth it here" not in text
    assert "- A chain helps only below the floor of exact match: `chain` ends with a lower value NLL" in text
    assert "(-0.233 nats [" in text and "of the LoRA → full NLL gap) and is not shown" in text
    chosen[("c", "chain")] = _cell([0.10, 0.13, 0.07], [2.0, 2.25, 1.8], [0.20, 0.22, 0.21], one)
    text = advice(chosen, "c", methods)
    assert "- A chain is not worth its knots here: no chain of rank-r links beat `lora`" in text
    assert "(`chain`, `chain_g` with ≥ 2 seeds, so with an interval)." in text
    assert (
        "none was shown better than `lora` in pairs or value NLL; "
        "the lowest mean value NLL is `lora` (2.000 nats)" in text
    )
    chosen[("c", "chain")]["rows"] = chosen[("c", "chain")]["rows"][:1]
    assert "(`chain_g` with ≥ 2 seeds, so with an interval; `chain` with one seed)." in advice(
        chosen, "c", methods
    )


def test_peers_are_not_lora_and_a_gradient_start_is_compared_with_its_gaussian_twin():
    from lorachain.config import RunConfig, from_dict
    from lorachain.experiment.capacity import roles, twin
    from lorachain.experiment.records import link_kind

    def kind(chain=None, optim=None):
        raw = {"model": {"name_or_path": "x"}, "data": {"train": "t.jsonl"}}
        return link_kind(from_dict(RunConfig, raw | {"chain": chain or {}, "optim": optim or {}}))

    assert kind({"use_dora": True}) == {"dora": True}
    assert kind(optim={"loraplus_lr_ratio": 16.0}) == {"loraplus": 16.0}
    assert kind({"init": "gradient"}) == {"init": "gradient"} and kind() == {}
    one = {"method": "lora", "ranks": [1]}
    chosen = {
        ("c", "dora"): {"spec": one | {"dora": True}},  # listed first: order must not make it LoRA
        ("c", "plus"): {"spec": one | {"loraplus": 16.0}},
        ("c", "lora"): {"spec": one},
        ("c", "ga"): {"spec": one | {"init": "gradient"}},
        ("c", "full"): {"spec": {"method": "full", "ranks": [8]}},
    }
    assert roles(chosen, "c", ["dora", "plus", "lora", "ga", "full"]) == ("full", "lora")
    assert twin(chosen, "c", "ga") == "lora"
