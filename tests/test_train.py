"""The training loop end to end on tiny models: chain shapes, export, resume, policies."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_config, tiny_model
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from lorachain.chain.policy import PlateauKnots, link_steps
from lorachain.config import ChainConfig, ConfigError, KnotConfig, LinkConfig, RunConfig, from_dict
from lorachain.training.loop import lr_factor, make_optimizer, run_steps, train, trainable

X = torch.tensor([[2, 4, 10, 11, 12, 13, 5, 6, 5], [2, 4, 20, 21, 22, 23, 5, 6, 5]])
CHAINS = {
    "lora": [{"rank": 4, "alpha": 8}],
    "cola3": [{"rank": 4, "alpha": 8}] * 3,
    "stepdown": [{"rank": 4, "alpha": 8, "fraction": 0.5}, {"rank": 2, "alpha": 4, "fraction": 0.5}],
}


def cfg_for(tmp_path, toy_data, family="llama", **over) -> RunConfig:
    return from_dict(RunConfig, run_config(tmp_path, toy_data, family, **over))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=X).logits


@pytest.mark.parametrize("chain", CHAINS)
@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "bert"])
def test_train_writes_run_and_export_reproduces_chain(tmp_path, toy_data, tokenizer, family, chain):
    cfg = cfg_for(tmp_path, toy_data, family, chain__links=CHAINS[chain])
    original = tiny_model(family)
    result = train(cfg, copy.deepcopy(original), tokenizer, progress=False)
    s = result.summary
    out = tmp_path / "run"
    assert {
        "config.json",
        "metrics.jsonl",
        "summary.json",
        "chain.safetensors",
        "adapter",
        "tb",
        "loss.png",
    } <= {p.name for p in out.iterdir()}
    assert not (out / "checkpoint.pt").exists()
    ranks = [link["rank"] for link in CHAINS[chain]]
    assert [link["rank"] for link in s["links"]] == ranks
    assert sum(link["steps"] for link in s["links"]) == s["total_steps"] == 12  # 2 epochs x 6 steps
    assert s["chain_rank"] == sum(ranks)
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 12
    for link in s["links"]:
        assert link["est_train_flops"] > 0 and link["wall_seconds"] > 0 and "eval" in link
        assert 0 <= link["eval"]["accuracy"] <= 1
    # the single exported adapter on the ORIGINAL base reproduces the trained chain
    cfg_json = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg_json["r"] == sum(ranks) and cfg_json["lora_alpha"] == sum(ranks)
    exported = PeftModel.from_pretrained(copy.deepcopy(original), str(out / "adapter"))
    torch.testing.assert_close(logits(exported), logits(result.model), rtol=1e-4, atol=1e-5)


def test_trainable_params_follow_rank_schedule(tmp_path, toy_data, tokenizer):
    links = [{"rank": 8, "alpha": 16}, {"rank": 4, "alpha": 8}, {"rank": 2, "alpha": 4}]
    cfg = cfg_for(tmp_path, toy_data, "llama", chain__links=links)
    s = train(cfg, tiny_model("llama"), tokenizer, progress=False).summary
    # Llama q_proj 32->32, v_proj 32->16 (2 kv heads), 2 layers: r * (32+32 + 32+16) * 2
    assert [link["trainable_params"] for link in s["links"]] == [r * 224 for r in (8, 4, 2)]
    flops = [link["est_train_flops"] / link["tokens"] for link in s["links"]]
    assert flops[0] > flops[1] > flops[2]  # the step-down saves FLOPs per token


def test_one_link_chain_matches_plain_peft_lora(tmp_path, toy_data, tokenizer):
    cfg = cfg_for(tmp_path, toy_data, "llama", chain__links=[{"rank": 4, "alpha": 8}], chain__dropout=0.1)
    chained = train(cfg, tiny_model("llama"), tokenizer, progress=False).model

    from lorachain.data import load_examples

    base = tiny_model("llama")
    torch.manual_seed(cfg.train.seed)  # as train() does before extending the chain
    plain = get_peft_model(
        base,
        LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj"],
            lora_dropout=0.1,
            init_lora_weights="gaussian",
        ),
    )
    examples = load_examples(cfg.data.train, cfg.data, tokenizer, classifier=False)
    opt = make_optimizer(trainable(plain), cfg.optim)
    run_steps(
        plain,
        opt,
        examples,
        cfg,
        0,
        12,
        lambda s: cfg.optim.lr * lr_factor(s, 12, 0, "linear"),
        0,
        False,
        lambda *a: False,
    )
    merged = plain.merge_and_unload()
    for (n, p), (_, q) in zip(merged.named_parameters(), chained.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)


def final_weights(tmp_path, name) -> dict[str, torch.Tensor]:
    return load_file(str(tmp_path / name / "chain.safetensors"))


@pytest.mark.parametrize("stops", [[4], [6], [3, 5, 8]], ids=["mid-link", "at-knot", "three-stops"])
def test_resume_equals_uninterrupted(tmp_path, toy_data, tokenizer, stops):
    over = {"chain__dropout": 0.1, "chain__links": CHAINS["stepdown"]}
    ref = train(
        cfg_for(tmp_path, toy_data, "gpt2", output_dir=str(tmp_path / "ref"), **over),
        tiny_model("gpt2"),
        tokenizer,
        progress=False,
    )
    cfg = cfg_for(tmp_path, toy_data, "gpt2", output_dir=str(tmp_path / "resumed"), **over)
    for stop in stops:
        r = train(cfg, tiny_model("gpt2"), tokenizer, stop_after=stop, progress=False)
        assert r.summary == {"status": "interrupted", "step": stop}
        assert (tmp_path / "resumed" / "checkpoint.pt").is_file()
    done = train(cfg, tiny_model("gpt2"), tokenizer, progress=False)
    a, b = final_weights(tmp_path, "ref"), final_weights(tmp_path, "resumed")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for (n, p), (_, q) in zip(ref.model.named_parameters(), done.model.named_parameters(), strict=True):
        assert torch.equal(p, q), n
    rows = [json.loads(x) for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))


def test_resume_from_older_checkpoint_after_kill(tmp_path, toy_data, tokenizer):
    """A kill loses the steps after the last checkpoint; resuming redoes them identically."""
    over = {"chain__dropout": 0.1}
    ref = cfg_for(tmp_path, toy_data, "llama", output_dir=str(tmp_path / "ref"), **over)
    train(ref, tiny_model("llama"), tokenizer, progress=False)
    cfg = cfg_for(tmp_path, toy_data, "llama", output_dir=str(tmp_path / "killed"), **over)
    train(cfg, tiny_model("llama"), tokenizer, stop_after=3, progress=False)
    shutil.copy(tmp_path / "killed" / "checkpoint.pt", tmp_path / "ck3.pt")
    train(cfg, tiny_model("llama"), tokenizer, stop_after=8, progress=False)
    shutil.copy(tmp_path / "ck3.pt", tmp_path / "killed" / "checkpoint.pt")  # as if killed at step 8
    with (tmp_path / "killed" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 9, "loss": 0.')  # and mid-way through writing step 9's row
    train(cfg, tiny_model("llama"), tokenizer, progress=False)
    a, b = final_weights(tmp_path, "ref"), final_weights(tmp_path, "killed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(x)["step"] for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))


def test_finished_run_is_not_retrained_and_other_config_is_refused(tmp_path, toy_data, tokenizer):
    cfg = cfg_for(tmp_path, toy_data, "llama")
    first = train(cfg, tiny_model("llama"), tokenizer, progress=False).summary
    again = train(cfg, tiny_model("llama"), tokenizer, progress=False)
    assert again.model is None and again.summary == json.loads(json.dumps(first))
    other = cfg_for(tmp_path, toy_data, "llama", optim={"lr": 0.02})
    with pytest.raises(ConfigError, match="holds a run with another config .*optim"):
        train(other, tiny_model("llama"), tokenizer, progress=False)
    # a run folder written before a config field existed is the same run (the field at its default)
    path = Path(cfg.output_dir) / "config.json"
    old = json.loads(path.read_text())
    del old["model"]["attn_implementation"]
    path.write_text(json.dumps(old))
    assert train(cfg, tiny_model("llama"), tokenizer, progress=False).model is None


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "adamw"])
def test_base_optimizers_reduce_loss(tmp_path, toy_data, tokenizer, optimizer):
    lr = {"sgd": 0.5, "adagrad": 0.05, "adamw": 0.01}[optimizer]
    cfg = cfg_for(
        tmp_path,
        toy_data,
        "llama",
        optim={"name": optimizer, "lr": lr},
        train={"epochs": 4, "batch_size": 8, "seed": 0},
    )
    s = train(cfg, tiny_model("llama"), tokenizer, progress=False).summary
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first = sum(r["loss"] for r in rows[:4]) / 4
    assert s["links"][-1]["final_loss"] < first


def test_auto_policy_ties_on_plateau_within_max_links(tmp_path, toy_data, tokenizer):
    chain = ChainConfig(
        links=[LinkConfig(rank=4)] * 3,
        knot=KnotConfig(policy="auto", window=3, min_delta=0.0, smoothing=0.0, min_link_steps=2),
    )
    policy = PlateauKnots(chain, total=100, steps_per_epoch=10)
    losses = [5, 4, 3, 3, 3, 3, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1]
    reasons = {}
    link, start = 0, 0
    for step, loss in enumerate(losses, 1):
        r = policy.should_tie(step, link, start, loss)
        if r:
            reasons[step] = r
            link, start = link + 1, step
    assert list(reasons) == [6, 11]  # 3 steps without improvement, twice; then max length
    assert "did not improve" in reasons[6]

    cfg = cfg_for(
        tmp_path,
        toy_data,
        "llama",
        chain={
            "links": [{"rank": 4, "alpha": 8}] * 4,
            "dropout": 0.0,
            "knot": {"policy": "auto", "window": 2, "min_delta": 0.5, "min_link_steps": 2},
        },
    )
    s = train(cfg, tiny_model("llama"), tokenizer, progress=False).summary
    assert 1 < len(s["links"]) <= 4
    assert all(link["knot_reason"].startswith("auto") for link in s["links"][:-1])
    assert s["links"][-1]["knot_reason"] == "end of budget"
    assert sum(link["steps"] for link in s["links"]) == 12


def test_link_shares() -> None:
    links = [LinkConfig(fraction=0.5), LinkConfig(steps=3), LinkConfig()]
    assert link_steps(links, 10, 5) == [5, 3, 2]
    assert link_steps([LinkConfig(epochs=1), LinkConfig(epochs=1)], 10, 5) == [5, 5]
    with pytest.raises(ConfigError, match="add up to the budget of 10 steps"):
        link_steps([LinkConfig(fraction=0.5), LinkConfig(fraction=0.3)], 10, 5)


def test_lr_schedule() -> None:
    assert lr_factor(0, 10, 0, "linear") == 1.0
    assert lr_factor(5, 10, 0, "linear") == 0.5
    assert lr_factor(0, 10, 2, "linear") == 0.5  # warmup
    assert lr_factor(10, 10, 0, "cosine") == pytest.approx(0.0)
    assert lr_factor(7, 10, 0, "constant") == 1.0


def test_full_finetuning_baseline_uses_the_same_loop(tmp_path, toy_data, tokenizer):
    over = {"chain": {"links": [{"rank": 1}], "method": "full", "dropout": 0.0}, "optim": {"lr": 1e-3}}
    original = tiny_model("llama")
    ref = train(
        cfg_for(tmp_path, toy_data, "llama", output_dir=str(tmp_path / "ref"), **over),
        copy.deepcopy(original),
        tokenizer,
        progress=False,
    )
    s = ref.summary
    assert s["links"][0]["trainable_params"] == sum(p.numel() for p in original.parameters())
    assert s["chain_rank"] == 0 and not (tmp_path / "ref" / "adapter").exists()
    changed = [
        n
        for (n, p), (_, q) in zip(original.named_parameters(), ref.model.named_parameters(), strict=True)
        if not torch.equal(p, q)
    ]
    assert "model.layers.0.mlp.up_proj.weight" in changed and "model.norm.weight" in changed
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ref" / "merged")
    torch.testing.assert_close(logits(reloaded), logits(ref.model))
    cfg = cfg_for(tmp_path, toy_data, "llama", output_dir=str(tmp_path / "resumed"), **over)
    train(cfg, copy.deepcopy(original), tokenizer, stop_after=5, progress=False)
    done = train(cfg, copy.deepcopy(original), tokenizer, progress=False)
    for (n, p), (_, q) in zip(ref.model.named_parameters(), done.model.named_parameters(), strict=True):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "bloom", "gpt_neox", "qwen2", "gemma3_text"])
def test_logits_at_target_positions_equal_the_full_logits(family):
    """The loss and candidate scores use logits at the target positions only (`logits_to_keep`)."""
    from conftest import tiny_model

    from lorachain.models import logits_at

    model = tiny_model(family)
    ids = torch.randint(4, 30, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    keep = torch.zeros_like(ids, dtype=torch.bool)
    keep[0, 2:5], keep[1, 6] = True, True
    got = logits_at(model, ids, mask, keep)
    assert got.shape == (4, 64) and not getattr(model, "_lorachain_full_logits", False)
    torch.testing.assert_close(
        got, model(input_ids=ids, attention_mask=mask).logits[keep], atol=1e-5, rtol=1e-5
    )
