"""`train.objective: dpo` in lorachain's own loop: preference rows, TRL's loss, a chain with knots
whose reference stays the starting model, resume, `model.adapter`, and the bad inputs."""

from __future__ import annotations

import contextlib
import json
import math
import random

import pytest
import torch
from conftest import FILL, NEG, POS, make_tokenizer, run_config, tiny_model, write_jsonl

from lorachain.chain.export import load_chain
from lorachain.config import ConfigError, DataConfig, RunConfig, from_dict
from lorachain.data import DataError
from lorachain.data.preference import encode_pair, load_pairs
from lorachain.training.dpo import dpo_losses, pair_batch, reference_logps, sequence_logps
from lorachain.training.loop import Trainer, train


def pref_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [
        {
            "prompt": "Review : " + " ".join(rng.sample(FILL, 3)) + " Sentiment :",
            "chosen": " positive " + rng.choice(POS),
            "rejected": " negative " + rng.choice(NEG),
        }
        for _ in range(n)
    ]


@pytest.fixture
def pref_data(tmp_path):
    return str(write_jsonl(tmp_path / "pairs.jsonl", pref_rows(24))), str(
        write_jsonl(tmp_path / "pairs_eval.jsonl", pref_rows(8, 1))
    )


def dpo_config(tmp_path, pref_data, **over):
    cfg = run_config(tmp_path, pref_data)
    cfg["data"] = {"train": pref_data[0], "eval": pref_data[1], "max_length": 32}
    cfg["train"].update(objective="dpo", batch_size=4, epochs=None, max_steps=6, save_every=2)
    cfg["chain"]["links"] = [{"rank": 4, "alpha": 8, "fraction": 0.5}, {"rank": 2, "alpha": 4}]
    cfg["optim"]["lr"] = 0.02
    for key, value in over.items():
        section, _, name = key.partition("__")
        cfg.setdefault(section, {})[name] = value
    return from_dict(RunConfig, cfg)


def test_loss_and_tokens_equal_trls_dpo_trainer(tmp_path):
    trl = pytest.importorskip("trl", reason="trl is not installed")
    from datasets import Dataset

    tok, rows = make_tokenizer(), pref_rows(4)
    policy, ref = tiny_model("llama"), tiny_model("llama")
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    args = trl.DPOConfig(output_dir=str(tmp_path), beta=0.3, report_to=[], use_cpu=True, bf16=False)
    trainer = trl.DPOTrainer(
        policy, ref_model=ref, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok
    )
    ds = trainer.train_dataset
    pairs = load_pairs(write_jsonl(tmp_path / "p.jsonl", rows), DataConfig(train="x"), tok)
    for p, i in zip(pairs, range(4), strict=True):  # the same tokens: prompt, response + EOS
        assert p.chosen.input_ids == ds[i]["prompt_ids"] + ds[i]["chosen_ids"]
        assert p.rejected.input_ids == ds[i]["prompt_ids"] + ds[i]["rejected_ids"]
    batch = trainer.data_collator([ds[i] for i in range(4)])
    trainer.model.eval()
    want = trainer.compute_loss(trainer.model, batch)
    margins = trainer._metrics["eval"]["rewards/margins"][-1]  # (model in eval mode)
    reference_logps(ref, pairs, tok.pad_token_id, 8, contextlib.nullcontext)
    batch = pair_batch(pairs, tok.pad_token_id)
    losses, chosen, rejected = dpo_losses(sequence_logps(policy.eval(), batch), batch["ref"], 0.3)
    torch.testing.assert_close(losses.mean(), want.detach(), rtol=1e-5, atol=1e-6)
    assert float((chosen - rejected).mean()) == pytest.approx(margins, rel=1e-4)
    assert abs(float(want) - math.log(2)) > 1e-3  # policy and reference differ


def test_label_smoothing_is_cdpo():
    logps, ref = torch.tensor([-3.0, -5.0, -4.0, -4.5]), torch.tensor([-3.5, -4.0, -4.0, -4.0])
    losses, c, r = dpo_losses(logps, ref, beta=0.5, label_smoothing=0.2)
    z = 0.5 * ((logps[:2] - ref[:2]) - (logps[2:] - ref[2:]))
    want = -0.8 * torch.log(torch.sigmoid(z)) - 0.2 * torch.log(torch.sigmoid(-z))
    torch.testing.assert_close(losses, want)
    torch.testing.assert_close(c - r, z)


def metric_rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_chain_dpo_run_keeps_the_reference_across_knots(tmp_path, pref_data):
    cfg = dpo_config(tmp_path, pref_data)
    model, tok = tiny_model("llama"), make_tokenizer()
    trainer = Trainer(cfg, model, tok, progress=False)
    start = [(p.ref_chosen, p.ref_rejected) for p in trainer.data.train]
    summary = trainer.run().summary
    assert [(r["link"], r["steps"]) for r in summary["links"]] == [(0, 3), (1, 3)]
    rows = [r for r in metric_rows(tmp_path / "run") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # the policy starts as the reference
    assert rows[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert (
        abs(rows[3]["rewards/margins"]) > 1e-3 and abs(rows[3]["loss"] - math.log(2)) > 1e-3
    )  # after the knot
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies"} <= set(rows[3])
    assert rows[-1]["loss"] < math.log(2)
    # the reference the loss read is the starting model's, recomputed on a fresh copy
    fresh = load_pairs(pref_data[0], cfg.data, tok)
    reference_logps(tiny_model("llama"), fresh, tok.pad_token_id, 8, contextlib.nullcontext)
    got = torch.tensor([(p.ref_chosen, p.ref_rejected) for p in fresh])
    torch.testing.assert_close(torch.tensor(start), got, rtol=0, atol=1e-5)
    ev = summary["final_eval"]
    assert set(ev) == {"pref_accuracy", "margin", "dpo_loss", "chosen_logratio"} and ev["pref_accuracy"] > 0.5
    knots, _, _ = load_chain(tmp_path / "run" / "chain.safetensors")
    assert [k.rank for k in knots] == [4, 2]


def test_dpo_resume_equals_uninterrupted(tmp_path, pref_data):
    tok = make_tokenizer()
    full = dpo_config(tmp_path / "a", pref_data)
    train(full, tiny_model("llama"), tok, progress=False)
    cut = dpo_config(tmp_path / "b", pref_data)
    assert (
        train(cut, tiny_model("llama"), tok, stop_after=4, progress=False).summary["status"] == "interrupted"
    )
    train(cut, tiny_model("llama"), tok, progress=False)
    a, b = metric_rows(tmp_path / "a" / "run"), metric_rows(tmp_path / "b" / "run")
    assert [r["step"] for r in b if "loss" in r] == [1, 2, 3, 4, 5, 6]  # no step twice
    for x, y in zip(a, b, strict=True):
        assert x.get("loss") == pytest.approx(y.get("loss"), rel=1e-5, abs=1e-7)
    ka, _, _ = load_chain(tmp_path / "a" / "run" / "chain.safetensors")
    kb, _, _ = load_chain(tmp_path / "b" / "run" / "chain.safetensors")
    for name, f in ka[-1].factors.items():
        torch.testing.assert_close(kb[-1].factors[name].B, f.B, rtol=1e-4, atol=1e-6)


def test_dpo_starts_from_an_sft_runs_adapter(tmp_path, pref_data, toy_data):
    tok = make_tokenizer()
    sft = from_dict(RunConfig, run_config(tmp_path / "sft", toy_data, train__max_steps=4, train__epochs=None))
    train(sft, tiny_model("llama"), tok, progress=False)
    adapter = str(tmp_path / "sft" / "run" / "adapter")
    cfg = dpo_config(tmp_path / "dpo", pref_data, model__adapter=adapter, train__max_steps=2)
    trainer = Trainer(cfg, tiny_model("llama"), tok, progress=False)  # the adapter is merged as it loads
    assert trainer.run().summary["status"] == "finished"
    from peft import PeftModel

    start = PeftModel.from_pretrained(tiny_model("llama"), adapter).merge_and_unload()
    fresh = load_pairs(pref_data[0], cfg.data, tok)
    reference_logps(start, fresh, tok.pad_token_id, 8, contextlib.nullcontext)
    got = [(p.ref_chosen, p.ref_rejected) for p in trainer.data.train]
    torch.testing.assert_close(
        torch.tensor(got), torch.tensor([(p.ref_chosen, p.ref_rejected) for p in fresh])
    )
    assert metric_rows(tmp_path / "dpo" / "run")[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_preference_rows_take_the_rows_prompt_field():
    tok, cfg = make_tokenizer(), DataConfig(train="x", max_length=32)
    row = {"prompt": "Review : the film", "chosen": " positive", "rejected": " negative"}
    pair = encode_pair(cfg, tok, row, None)
    assert tok.decode(pair.chosen.input_ids) == "Review : the film positive [EOS]"
    assert [t for t in pair.chosen.labels if t != -100] == tok(" positive [EOS]")["input_ids"]
    templated = DataConfig(train="x", prompt="{prompt} Sentiment :", max_length=32)
    assert tok.decode(encode_pair(templated, tok, row, None).rejected.input_ids).startswith(
        "Review : the film Sentiment : negative"
    )


def test_too_long_cuts_the_prompts_start_never_the_response():
    tok = make_tokenizer()
    row = {"prompt": " ".join(["the"] * 20) + " Sentiment :", "chosen": " positive good", "rejected": " bad"}
    pair = encode_pair(DataConfig(train="x", max_length=10), tok, row, None)
    assert len(pair.chosen.input_ids) == 10 and tok.decode(pair.chosen.input_ids).endswith(
        "Sentiment : positive good [EOS]"
    )
    with pytest.raises(ValueError, match="too long: prompt 22 \\+ response 3 tokens > data.max_length 10$"):
        encode_pair(DataConfig(train="x", max_length=10, on_too_long="skip"), tok, row, None)
    with pytest.raises(ValueError, match="a response is never cut"):
        encode_pair(DataConfig(train="x", max_length=3), tok, row, None)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (
            {"prompt": "Review :", "chosen": " good"},
            "line 2: a preference row needs 'chosen' and 'rejected'; 'rejected' is missing",
        ),
        ({"prompt": "Review :", "chosen": " good", "rejected": " good"}, "line 2: chosen equals rejected"),
    ],
)
def test_bad_rows_fail_in_one_line_before_anything_is_written(tmp_path, pref_data, row, message):
    bad = write_jsonl(tmp_path / "bad.jsonl", [pref_rows(1)[0], row])
    cfg = dpo_config(tmp_path, (str(bad), pref_data[1]))
    with pytest.raises(DataError, match=message) as err:
        train(cfg, tiny_model("llama"), make_tokenizer(), progress=False)
    assert "\n" not in str(err.value) and str(bad) in str(err.value)
    assert (
        not (tmp_path / "run" / "metrics.jsonl").exists()
        and not (tmp_path / "run" / "checkpoint.pt").exists()
    )


def test_dpo_config_refusals(tmp_path, pref_data):
    with pytest.raises(ConfigError, match="train.objective: dpo .* needs model.task: causal_lm"):
        dpo_config(tmp_path, pref_data, model__task="classification")
    with pytest.raises(ConfigError, match="dpo.beta: expected > 0"):
        dpo_config(tmp_path, pref_data, dpo__beta=0.0)
    with pytest.raises(ConfigError, match="train.objective: expected one of"):
        dpo_config(tmp_path, pref_data, train__objective="kto")


def test_chat_preference_rows():
    from chatkit import chat_tokenizer

    tok = chat_tokenizer("chatml")
    cfg = DataConfig(train="x", max_length=128)
    user = [{"role": "user", "content": "Is it good?"}]
    explicit = {
        "prompt": user,
        "chosen": [{"role": "assistant", "content": "Yes."}],
        "rejected": [{"role": "assistant", "content": "No."}],
    }
    implicit = {"chosen": user + explicit["chosen"], "rejected": user + explicit["rejected"]}
    from lorachain.data.chat import chat_template

    template = chat_template(tok, None)
    a, b = encode_pair(cfg, tok, explicit, template), encode_pair(cfg, tok, implicit, template)
    assert a.chosen.input_ids == b.chosen.input_ids and a.rejected.labels == b.rejected.labels
    scored = tok.decode([t for t in a.chosen.labels if t != -100])
    assert scored.startswith("Yes.") and a.chosen.prompt_len == a.rejected.prompt_len
    with pytest.raises(ValueError, match="differ before their last turn"):
        encode_pair(
            cfg,
            tok,
            {
                "chosen": implicit["chosen"],
                "rejected": [{"role": "user", "content": "Hm"}, *explicit["rejected"]],
            },
            template,
        )


def test_dpo_from_yaml_loads_the_model_folder(tmp_path, tiny_dir, pref_data):
    from lorachain.config import load_config

    yaml = tmp_path / "dpo.yaml"
    yaml.write_text(
        f"model: {{name_or_path: {tiny_dir}}}\n"
        f"data: {{train: {pref_data[0]}, eval: {pref_data[1]}, max_length: 32}}\n"
        "chain: {links: [{rank: 4, alpha: 8, fraction: 0.5}, {rank: 4, alpha: 8}], dropout: 0.0}\n"
        "train: {objective: dpo, max_steps: 4, batch_size: 4, epochs: null}\n"
        f"dpo: {{beta: 0.2, label_smoothing: 0.1}}\noutput_dir: {tmp_path / 'run'}\n"
    )
    cfg = load_config(str(yaml), ["optim.lr=0.02"])
    summary = train(cfg, progress=False).summary
    assert cfg.dpo.beta == 0.2 and [r["steps"] for r in summary["links"]] == [2, 2]
    assert summary["final_eval"]["pref_accuracy"] >= 0.0 and (tmp_path / "run" / "adapter").is_dir()
