"""ChainCallback under TRL's reference-using trainers (DPO, KTO, GRPO with β > 0), PEFT, no
ref_model: the reference (the adapter-off model) stays the model the run started from, across knots
and resume (`lorachain.chain.reference`)."""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch
from conftest import FILL, NEG, POS, make_tokenizer, tiny_model
from peft import PeftModel
from transformers import TrainerCallback

from lorachain.chain.reference import fold, has_links
from lorachain.config import ConfigError
from lorachain.integrations import ChainCallback
from lorachain.integrations.callback import uses_reference

trl = pytest.importorskip("trl", reason="trl is not installed")
from datasets import Dataset  # noqa: E402

LINKS = [{"rank": 4, "alpha": 8}, {"rank": 4, "alpha": 8}, {"rank": 2, "alpha": 4}]
COMMON = dict(
    per_device_train_batch_size=4,
    learning_rate=0.05,
    logging_steps=1,
    save_strategy="no",
    report_to=[],
    use_cpu=True,
    disable_tqdm=True,
    bf16=False,
    seed=0,
)


def prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["Review : " + " ".join(rng.choice(FILL) for _ in range(4)) + " Sentiment :" for _ in range(n)]


def pairs(n: int) -> list[dict]:
    rng = random.Random(1)
    return [
        {"prompt": p, "chosen": " positive " + rng.choice(POS), "rejected": " negative " + rng.choice(NEG)}
        for p in prompts(n)
    ]


def chain(links=LINKS, **kw) -> ChainCallback:
    return ChainCallback({"links": links, "target_modules": ["q_proj", "v_proj"], "dropout": 0.0}, **kw)


class Probe(TrainerCallback):
    """Records, after every step, the adapter-off logits' largest distance to the starting model's
    and (DPO) TRL's own reference log-probs of a fixed batch."""

    def __init__(self, start: torch.nn.Module, ids: torch.Tensor) -> None:
        self.start, self.ids = start, ids
        self.ref_logit_gap: dict[int, float] = {}
        self.ref_logps: dict[int, torch.Tensor] = {}
        self.trainer, self.batch = None, None

    def reference(self) -> torch.Tensor:
        chosen, rejected = self.trainer.compute_ref_log_probs(self.trainer.model, self.batch)
        return torch.cat([chosen, rejected])

    def on_train_begin(self, args, state, control, model=None, **kw):
        if self.batch is not None:
            self.ref_logps[state.global_step] = self.reference()

    def on_step_end(self, args, state, control, model=None, **kw):
        with torch.no_grad(), model.disable_adapter():
            off = model(input_ids=self.ids).logits
        gap = (off - self.start(input_ids=self.ids).logits).abs().max()
        self.ref_logit_gap[state.global_step] = float(gap)
        if self.batch is not None:
            self.ref_logps[state.global_step] = self.reference()


def dpo(tmp_path, callbacks, max_steps=6, model=None, **kw):
    from trl import DPOConfig, DPOTrainer

    model = model or tiny_model("llama")
    cc = callbacks[0]
    args = DPOConfig(output_dir=str(tmp_path), max_steps=max_steps, **{**COMMON, **kw})
    return DPOTrainer(
        model,
        args=args,
        train_dataset=Dataset.from_list(pairs(16)),
        processing_class=make_tokenizer(),
        peft_config=cc.lora_config(model),
        callbacks=callbacks,
    )


def steps(trainer, key: str) -> dict[int, float]:
    return {h["step"]: h[key] for h in trainer.state.log_history if key in h}


def with_probe(trainer, probe: Probe) -> Probe:
    probe.trainer = trainer
    probe.batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    return probe


def test_dpo_reference_stays_the_start_across_knots(tmp_path):
    tok, start = make_tokenizer(), tiny_model("llama")
    ids = torch.tensor([tok(prompts(1)[0] + " positive good")["input_ids"]])
    cc, probe = chain(), Probe(start, ids)
    trainer = dpo(tmp_path, [cc, probe])
    with_probe(trainer, probe)
    trainer.train()
    assert [k.step for k in cc.knots] == [2, 4, 6] and cc.keep_reference
    # TRL's own reference log-probs of one batch, after each knot, equal those at the start
    for step in (2, 4, 6):
        torch.testing.assert_close(probe.ref_logps[step], probe.ref_logps[0], rtol=0, atol=1e-5)
    assert max(probe.ref_logit_gap.values()) == 0.0  # bit for bit: the base weights were never written
    # the step after a knot keeps its rewards: no reset to 0 and ln 2
    for after in (3, 5):
        assert abs(steps(trainer, "rewards/margins")[after]) > 1e-3
        assert abs(steps(trainer, "loss")[after] - math.log(2)) > 1e-3
    # the live model (links path + last link) is the exported chain adapter on the original base
    model = trainer.accelerator.unwrap_model(trainer.model).eval()
    loaded = PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path / "chain" / "adapter")).eval()
    live = model(input_ids=ids).logits
    torch.testing.assert_close(loaded(input_ids=ids).logits, live, rtol=1e-4, atol=1e-5)


def test_without_keeping_the_reference_it_resets_at_each_knot(tmp_path):
    """The measured bug, kept as the contrast: knots in the weights move the adapter-off reference."""
    start = tiny_model("llama")
    ids = torch.tensor([make_tokenizer()(prompts(1)[0])["input_ids"]])
    probe = Probe(start, ids)
    trainer = dpo(tmp_path, [chain(keep_reference=False), probe])
    trainer.train()
    assert steps(trainer, "rewards/margins")[3] == 0.0
    assert steps(trainer, "loss")[3] == pytest.approx(math.log(2), abs=1e-6)
    assert probe.ref_logit_gap[2] > 1e-3


def test_dpo_resume_after_a_knot_keeps_the_reference(tmp_path):
    start, ids = tiny_model("llama"), torch.tensor([make_tokenizer()(prompts(1)[0])["input_ids"]])
    full = dpo(tmp_path / "full", [chain()])
    full.train()
    first = dpo(tmp_path / "cut", [chain()], save_strategy="steps", save_steps=3)
    first.train()
    probe = Probe(start, ids)
    resumed = dpo(tmp_path / "cut", [chain(), probe], save_strategy="steps", save_steps=3)
    with_probe(resumed, probe)
    resumed.train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-3"))
    assert max(probe.ref_logit_gap.values()) == 0.0
    want, got = steps(full, "rewards/margins"), steps(resumed, "rewards/margins")
    assert got[4] == pytest.approx(want[4], rel=1e-4) and abs(got[5]) > 1e-3


def test_kto_and_grpo_keep_the_reference(tmp_path):
    from trl import GRPOConfig, GRPOTrainer, KTOConfig, KTOTrainer

    tok, start = make_tokenizer(), tiny_model("llama")
    ids = torch.tensor([tok(prompts(1)[0] + " positive good")["input_ids"]])
    rows = [
        {"prompt": r["prompt"], "completion": r["chosen" if i % 2 else "rejected"], "label": bool(i % 2)}
        for i, r in enumerate(pairs(16))
    ]
    cc, probe = chain(), Probe(start, ids)
    args = KTOConfig(output_dir=str(tmp_path / "kto"), max_steps=6, **COMMON)
    model = tiny_model("llama")
    kto = KTOTrainer(
        model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        peft_config=cc.lora_config(model),
        callbacks=[cc, probe],
    )
    kto.train()
    assert len(cc.knots) == 3 and max(probe.ref_logit_gap.values()) == 0.0
    assert abs(steps(kto, "rewards/margins")[3]) > 1e-3

    def reward(completions, **kw):
        return [float(sum(w in c for w in POS)) for c in completions]

    cc, probe = chain(), Probe(start, ids)
    grpo_args = dict(num_generations=2, max_completion_length=4, beta=0.1)
    args = GRPOConfig(output_dir=str(tmp_path / "grpo"), max_steps=6, **COMMON, **grpo_args)
    model = tiny_model("llama")
    grpo = GRPOTrainer(
        model,
        reward_funcs=reward,
        args=args,
        train_dataset=Dataset.from_list([{"prompt": p} for p in prompts(8)]),
        processing_class=tok,
        peft_config=cc.lora_config(model),
        callbacks=[cc, probe],
    )
    grpo.train()
    assert cc.keep_reference and len(cc.knots) == 3 and max(probe.ref_logit_gap.values()) == 0.0
    assert steps(grpo, "kl")[3] > 0  # the KL to the start does not reset at the knot


def test_uses_reference_reads_beta():
    from trl import DPOConfig, GRPOConfig, SFTConfig

    kw = dict(output_dir="/tmp/unused", use_cpu=True, report_to=[])
    assert uses_reference(DPOConfig(**kw)) and uses_reference(GRPOConfig(beta=0.04, **kw))
    assert not uses_reference(GRPOConfig(beta=0.0, **kw)) and not uses_reference(SFTConfig(**kw))


def test_fold_makes_a_plain_chain_with_the_same_function(tmp_path):
    ids = torch.tensor([make_tokenizer()(prompts(1)[0])["input_ids"]])
    cc = chain()
    trainer = dpo(tmp_path, [cc], max_steps=4)
    trainer.train()
    model = trainer.accelerator.unwrap_model(trainer.model).eval()
    before = model(input_ids=ids).logits
    assert has_links(model)
    rounding = fold(model)
    assert not has_links(model) and rounding["max_abs"] == 0.0
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=1e-5, atol=1e-5)
    merged = copy.deepcopy(model).merge_and_unload()
    torch.testing.assert_close(merged(input_ids=ids).logits, before, rtol=1e-5, atol=1e-5)


def test_fsdp2_is_refused_in_one_line(monkeypatch):
    import lorachain.integrations.callback as cb

    monkeypatch.setattr(cb, "sharded", lambda model: True)  # as under FSDP2 (tested in test_dist)
    with pytest.raises(ConfigError, match="FSDP2") as err:
        chain(keep_reference=True)._check_reference(None, None)
    assert "\n" not in str(err.value)


def test_two_ddp_processes_tie_at_the_same_steps_and_keep_the_reference(tmp_path):
    """torchrun, 2 CPU processes (gloo): both ranks tie each knot at the step one process ties it,
    keep the reference bit for bit, and log the rewards one process logs."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = str(Path(__file__).parent / "ddp_dpo.py")
    two = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", script]
    for cmd in ([sys.executable, script, str(tmp_path / "one")], [*two, str(tmp_path / "two")]):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
    one = json.loads((tmp_path / "one" / "rank0.json").read_text())
    ranks = [json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in (0, 1)]
    for run in (one, *ranks):
        assert run["knots"] == [2, 4, 6] and run["ref_logit_gap"] == 0.0
        assert abs(run["margins"]["3"]) > 1e-3 and abs(run["margins"]["5"]) > 1e-3  # after each knot
    for step, margin in one["margins"].items():
        assert ranks[0]["margins"][step] == pytest.approx(margin, rel=1e-4, abs=1e-6)
