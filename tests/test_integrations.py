"""ChainCallback in a real transformers.Trainer and trl.SFTTrainer on tiny models: parity with
`lorachain train`, rank step-down, optimizer reset, schedule restart, mid-link resume, export."""

from __future__ import annotations

import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from conftest import make_tokenizer, run_config, tiny_model
from peft import PeftModel
from transformers import Trainer, TrainerCallback, TrainingArguments

from lorachain.chain.export import load_chain
from lorachain.chain.knot import extend, lora_config
from lorachain.config import ChainConfig, ConfigError, DataConfig, from_dict
from lorachain.data import collate, load_examples
from lorachain.integrations import ChainCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from callback_parity import parity  # noqa: E402

LINKS = [{"rank": 4, "alpha": 8}, {"rank": 2, "alpha": 4}]


def chain_cfg(**over) -> ChainConfig:
    return from_dict(ChainConfig, {"links": LINKS, "dropout": 0.0} | over)


@pytest.mark.parametrize(
    ("chain", "train", "optim", "kind"),
    [
        ({"links": LINKS}, {}, {}, "trainer"),  # fixed knots, rank step-down 4 -> 2
        ({"links": LINKS}, {"grad_accum": 2, "batch_size": 4}, {}, "sft"),  # the same in trl.SFTTrainer
        (  # auto knots on the loss plateau, gradient accumulation, equal ranks
            {
                "links": [LINKS[0], LINKS[0], LINKS[0]],
                "knot": {"policy": "auto", "window": 2, "min_delta": 0.2, "min_link_steps": 2},
            },
            {"batch_size": 4, "grad_accum": 2},
            {},
            "trainer",
        ),
        ({"links": LINKS}, {}, {"restart_per_link": True, "schedule": "cosine"}, "trainer"),  # restarts
    ],
    ids=["fixed-stepdown", "sft-accum", "auto-accum", "restart-cosine"],
)
def test_trainer_equals_lorachain_train(tmp_path, toy_data, chain, train, optim, kind):
    """Same data, seed and schedule: the same knots and equal weights as `lorachain train`."""
    from lorachain.config import RunConfig

    base = run_config(tmp_path, toy_data)
    base["chain"] |= chain
    base["train"] |= train | {"save_every": 100}
    base["optim"] |= optim
    cfg = from_dict(RunConfig, base)
    tok = make_tokenizer()
    if kind == "sft":
        pytest.importorskip("trl", reason="trl is not installed")
    result = parity(cfg, lambda: tiny_model("llama"), tok, tmp_path / "parity", kind)
    assert result["callback_knots"] == result["lorachain_knots"]
    assert len(result["lorachain_knots"]) >= 2
    assert result["max_abs_diff"]["A"] < 1e-5 and result["max_abs_diff"]["B"] < 1e-5, result


def _peft(model, chain: ChainConfig):
    torch.manual_seed(0)
    targets = ["q_proj", "v_proj"]
    return extend(model, lora_config(chain.links[0], chain, targets, False, "causal_lm"), gaussian=True)


def _args(out: Path, **over) -> TrainingArguments:
    kw = dict(
        output_dir=str(out),
        max_steps=12,
        per_device_train_batch_size=8,
        learning_rate=0.01,
        optim="adamw_torch",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        remove_unused_columns=False,
        seed=0,
    )
    return TrainingArguments(**(kw | over))


def _trainer(out: Path, examples, callbacks, eval_dataset=None, **over) -> Trainer:
    model = _peft(tiny_model("llama"), chain_cfg())
    pad = make_tokenizer().pad_token_id
    return Trainer(
        model,
        args=_args(out, **over),
        train_dataset=examples,
        eval_dataset=eval_dataset,
        data_collator=lambda b: collate(b, pad, False),
        callbacks=callbacks,
    )


@pytest.fixture
def examples(toy_data):
    words = {"0": "negative", "1": "positive"}
    data = DataConfig(train=toy_data[0], prompt="Review : {text} Sentiment :", label_words=words)
    return load_examples(toy_data[0], data, make_tokenizer(), False)


def test_stepdown_reshapes_and_resets_the_trainers_optimizer(tmp_path, examples):
    seen = {}

    class Probe(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, optimizer=None, **kw):
            if state.global_step in (6, 7):
                a = model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
                groups = [p for g in optimizer.param_groups for p in g["params"]]
                moments = optimizer.state.get(a)
                step = int(moments["step"]) if moments else None
                seen[state.global_step] = (tuple(a.shape), any(p is a for p in groups), step)

    chain = ChainCallback(chain_cfg())
    trainer = _trainer(tmp_path, examples, [chain, Probe()])
    trainer.train()
    # the probe runs after the knot at step 6: new rank-2 factors, in the optimizer, without state
    assert seen[6] == ((2, 32), True, None)
    assert seen[7] == ((2, 32), True, 1)  # one Adam step on the new link
    knots, _, meta = load_chain(tmp_path / "chain" / "chain.safetensors")
    assert [(k.step, k.rank, k.reason.split(":")[0]) for k in knots] == [
        (6, 4, "fixed"),
        (12, 2, "end of budget"),
    ]
    assert meta["target_modules"] == ["q_proj", "v_proj"]


def test_export_is_one_adapter_equal_to_the_live_chain(tmp_path, examples):
    chain = ChainCallback(chain_cfg())
    trainer = _trainer(tmp_path, examples, [chain])
    trainer.train()
    ids = torch.tensor([examples[0].input_ids])
    live = trainer.model.eval()(input_ids=ids).logits
    loaded = PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path / "chain" / "adapter")).eval()
    assert loaded.peft_config["default"].r == 6
    torch.testing.assert_close(loaded(input_ids=ids).logits, live, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(tiny_model("llama")(input_ids=ids).logits, live, atol=1e-3)


class StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


@pytest.mark.parametrize("links", [LINKS, [LINKS[0], LINKS[0]]], ids=["stepdown", "same-rank"])
def test_resume_mid_link_two_equals_uninterrupted(tmp_path, examples, links):
    over = dict(save_strategy="steps", save_steps=3)
    full = ChainCallback(chain_cfg(links=links))
    _trainer(tmp_path / "full", examples, [full], **over).train()
    _trainer(tmp_path / "cut", examples, [ChainCallback(chain_cfg(links=links)), StopAt(9)], **over).train()
    resumed = ChainCallback(chain_cfg(links=links))  # a new process: fresh model, fresh callback
    trainer = _trainer(tmp_path / "cut", examples, [resumed], **over)
    if links[1]["rank"] != links[0]["rank"]:  # new shapes: prepared before the Trainer loads them
        assert resumed.prepare_resume(trainer, True).endswith("checkpoint-9")
        ckpt = True
    else:
        ckpt = str(tmp_path / "cut" / "checkpoint-9")
    trainer.train(resume_from_checkpoint=ckpt)
    a, _, _ = load_chain(tmp_path / "full" / "chain" / "chain.safetensors")
    b, _, _ = load_chain(tmp_path / "cut" / "chain" / "chain.safetensors")
    assert [(k.step, k.rank) for k in a] == [(k.step, k.rank) for k in b] == [(6, 4), (12, links[1]["rank"])]
    for ka, kb in zip(a, b, strict=True):
        for name, fa in ka.factors.items():
            torch.testing.assert_close(kb.factors[name].A, fa.A, rtol=0, atol=1e-6)
            torch.testing.assert_close(kb.factors[name].B, fa.B, rtol=0, atol=1e-6)


def test_resume_on_a_model_holding_knots_is_refused(tmp_path, examples):
    over = dict(save_strategy="steps", save_steps=3)
    _trainer(tmp_path, examples, [ChainCallback(chain_cfg(links=[LINKS[0]] * 2)), StopAt(9)], **over).train()
    chain = ChainCallback(chain_cfg(links=[LINKS[0]] * 2))
    trainer = _trainer(tmp_path, examples, [chain], **over)
    chain.prepare_resume(trainer, True)
    again = ChainCallback(chain_cfg(links=[LINKS[0]] * 2))
    with pytest.raises(ConfigError, match="base weights are not the ones this run started from"):
        again.prepare_resume(trainer, True)


def test_errors_name_the_problem(tmp_path, examples):
    wrong = ChainCallback(chain_cfg(links=[{"rank": 8, "alpha": 16}, LINKS[1]]))
    with pytest.raises(ConfigError, match=r"chain.links.0: rank 8, alpha 16, but the PEFT model has r=4"):
        _trainer(tmp_path, examples, [wrong]).train()
    best = ChainCallback(chain_cfg())
    over = dict(load_best_model_at_end=True, eval_strategy="steps", save_strategy="steps")
    trainer = _trainer(tmp_path, examples, [best], eval_dataset=examples, **over)
    with pytest.raises(ConfigError, match="load_best_model_at_end"):
        trainer.train()


def test_sft_trainer_with_chat_rows(tmp_path):
    pytest.importorskip("trl", reason="trl is not installed")
    from chatkit import chat_model, chat_rows, chat_tokenizer
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    tok = chat_tokenizer("chatml")
    chain = ChainCallback({"links": LINKS, "target_modules": ["q_proj", "v_proj"], "dropout": 0.0})
    model = chat_model(tok)
    args = SFTConfig(
        output_dir=str(tmp_path),
        max_steps=8,
        per_device_train_batch_size=4,
        learning_rate=0.01,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        dataset_num_proc=None,
    )
    trainer = SFTTrainer(
        model,
        args=args,
        train_dataset=Dataset.from_list(chat_rows(32)),
        processing_class=tok,
        peft_config=chain.lora_config(model),
        callbacks=[chain],
    )
    trainer.train()
    knots, _, _ = load_chain(tmp_path / "chain" / "chain.safetensors")
    assert [(k.step, k.rank) for k in knots] == [(4, 4), (8, 2)]
    ids = torch.tensor([tok.apply_chat_template(chat_rows(1, 5)[0]["messages"], tokenize=True)["input_ids"]])
    # TRL trains under bf16 autocast by default; accelerate wraps forward in it, so unwrap first
    model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False).eval()
    live = model(input_ids=ids).logits
    loaded = PeftModel.from_pretrained(chat_model(tok), str(tmp_path / "chain" / "adapter")).eval()
    torch.testing.assert_close(loaded(input_ids=ids).logits, live, rtol=1e-4, atol=1e-5)


def test_two_processes_tie_at_the_same_steps_as_one(tmp_path, toy_data):
    """DDP (torchrun, 2 CPU processes, gloo; `accelerate launch --cpu` starts only one process
    here): every rank ties where one process ties, with the same weights."""
    script = str(Path(__file__).parent / "ddp_chain.py")
    one = [sys.executable, script, str(tmp_path / "one"), toy_data[0]]
    two = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", script]
    for cmd in (one, [*two, str(tmp_path / "two"), toy_data[0]]):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
    runs = (("one", 0), ("two", 0), ("two", 1))
    steps = [(tmp_path / d / f"knots.rank{r}.txt").read_text() for d, r in runs]
    assert len(set(steps)) == 1 and len(steps[0].split(",")) >= 2, steps  # at least one knot, same steps
    a, _, _ = load_chain(tmp_path / "one" / "chain" / "chain.safetensors")
    b, _, _ = load_chain(tmp_path / "two" / "chain" / "chain.safetensors")
    assert [k.step for k in a] == [k.step for k in b]
    for ka, kb in zip(a, b, strict=True):
        for name, fa in ka.factors.items():  # equal up to the order of floating-point sums across ranks
            torch.testing.assert_close(kb.factors[name].B, fa.B, rtol=1e-4, atol=1e-5)


def test_trainer_bf16_on_a_cpu_without_native_bf16_says_so_and_emulates_when_asked(
    tmp_path, examples, monkeypatch, capfd
):
    """Trainer's own bf16 autocast does not go through lorachain's loop: ChainCallback names the slow
    kernel in one line, and `Precision.matmuls()` around trainer.train() emulates every step."""
    import lorachain.training.precision as precision
    from lorachain.training import emulated_matmul

    seen = []

    class Watch(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            seen.append(emulated_matmul.active(torch.bfloat16))

    def run(flags: set[str], emulate: bool) -> str:
        monkeypatch.setattr(precision, "cpu_flags", lambda: flags)
        seen.clear()
        cb = ChainCallback(chain_cfg())
        trainer = _trainer(tmp_path / "out", examples, [cb, Watch()], bf16=True, max_steps=2)
        with precision.resolve("bf16", torch.device("cpu")).matmuls() if emulate else nullcontext():
            trainer.train()
        return capfd.readouterr().err

    err = run(set(), emulate=False)
    assert "bf16 on a CPU without native bf16 matmuls" in err and ".matmuls()" in err
    assert seen == [False, False]
    err = run(set(), emulate=True)
    assert "without native" not in err and seen == [True, True]
    err = run({"avx512_bf16"}, emulate=False)  # native kernels: nothing to say, nothing emulated
    assert "without native" not in err and seen == [False, False]
