"""`train.objective: dpo` under activation checkpointing and on 2 processes (torchrun, gloo; ddp and
fsdp): the same losses, rewards, knots and chain as one plain process, within fp32 tolerance; and on
an NF4 base (bitsandbytes), where the knots stay exact and the reference stays the start."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_tokenizer, run_config, tiny_model, write_jsonl
from test_dpo import pref_rows
from test_quantization import wide_llama

from lorachain.chain.export import load_chain
from lorachain.config import RunConfig, from_dict
from lorachain.training.loop import train

RUN = str(Path(__file__).parent / "parallel_run.py")
TOL = {"rtol": 1e-4, "atol": 1e-5}  # fp32: the ranks' partial sums are added in another order


@pytest.fixture
def pref_data(tmp_path):
    return str(write_jsonl(tmp_path / "pairs.jsonl", pref_rows(24))), str(
        write_jsonl(tmp_path / "pairs_eval.jsonl", pref_rows(8, 1))
    )


def dpo_dict(tmp_path, pref_data, name: str, **train_over) -> dict:
    """A 2-link DPO chain (rank step-down 4 -> 2, knot after step 3) of 6 steps of 4 pairs."""
    cfg = run_config(tmp_path, pref_data, output_dir=str(tmp_path / name))
    cfg["data"] = {"train": pref_data[0], "eval": pref_data[1], "max_length": 32}
    cfg["train"] |= {"objective": "dpo", "batch_size": 4, "epochs": None, "max_steps": 6, "save_every": 2}
    cfg["train"] |= train_over
    cfg["chain"]["links"] = [{"rank": 4, "alpha": 8, "fraction": 0.5}, {"rank": 2, "alpha": 4}]
    cfg["optim"]["lr"] = 0.02
    return cfg


def steps(run: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


def assert_same_dpo_run(a: Path, b: Path, tol: dict) -> None:
    """Per step: loss and rewards; the knots' steps and ranks; every factor; the final evaluation."""
    x, y = steps(a), steps(b)
    assert [r["step"] for r in x] == [r["step"] for r in y] == [1, 2, 3, 4, 5, 6]
    for r, s in zip(x, y, strict=True):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
            assert s[key] == pytest.approx(r[key], rel=tol["rtol"], abs=tol["atol"]), (r["step"], key)
    assert abs(x[3]["rewards/margins"]) > 1e-3  # trained past the knot, not a trivially equal zero
    ka, _, _ = load_chain(a / "chain.safetensors")
    kb, _, _ = load_chain(b / "chain.safetensors")
    assert [(k.step, k.rank) for k in ka] == [(k.step, k.rank) for k in kb] == [(3, 4), (6, 2)]
    for p, q in zip(ka, kb, strict=True):
        for name, f in p.factors.items():
            torch.testing.assert_close(q.factors[name].A, f.A, **tol, msg=name)
            torch.testing.assert_close(q.factors[name].B, f.B, **tol, msg=name)
    ea, eb = (json.loads((d / "summary.json").read_text())["final_eval"] for d in (a, b))
    assert eb["pref_accuracy"] == ea["pref_accuracy"]
    assert eb["dpo_loss"] == pytest.approx(ea["dpo_loss"], rel=tol["rtol"])


def test_dpo_with_gradient_checkpointing_equals_without(tmp_path, pref_data):
    tok, calls = make_tokenizer(), {}
    for name, ckpt in (("plain", False), ("ckpt", True)):
        cfg = from_dict(RunConfig, dpo_dict(tmp_path, pref_data, name, gradient_checkpointing=ckpt))
        model, calls[name] = tiny_model("llama"), []
        model.model.layers[0].self_attn.register_forward_pre_hook(lambda *a, seen=calls[name]: seen.append(1))
        train(cfg, model, tok, progress=False)
    # one training forward per step (chosen and rejected in one batch), run again in its backward;
    # hooks on the layer itself stay outside the checkpoint in transformers 5: its attention is watched
    assert len(calls["ckpt"]) - len(calls["plain"]) == 6
    # the same forward recomputed in the backward: equal up to fp32 summation order
    assert_same_dpo_run(tmp_path / "plain", tmp_path / "ckpt", {"rtol": 1e-5, "atol": 1e-6})


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo on CPU")
@pytest.mark.parametrize(
    "parallel,ckpt",
    [("ddp", False), ("ddp", True), ("fsdp", False)],
    ids=["ddp", "ddp-checkpointing", "fsdp"],
)
def test_dpo_on_two_processes_equals_one(tmp_path, pref_data, tiny_dir, parallel, ckpt):
    """The global batch of 4 pairs split 2 + 2: sums of log-probs, the loss's mean over pairs and the
    rewards are reduced over ranks, so the run is the one-process run. Under fsdp each rank holds half
    of every base weight, the reference log-probs are computed on the sharded model, and the knots
    are added into each rank's own rows."""
    one = dpo_dict(tmp_path, pref_data, "one")
    one["model"]["name_or_path"] = str(tiny_dir)
    train(from_dict(RunConfig, one), progress=False)
    two = dpo_dict(tmp_path, pref_data, "two", parallel=parallel, gradient_checkpointing=ckpt)
    two["model"]["name_or_path"] = str(tiny_dir)
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(two))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", RUN]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LORACHAIN_DIST_TIMEOUT": "60"}
    proc = subprocess.run(
        [*cmd, str(tmp_path / "two.yaml")], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("finished") == 2  # one line per rank
    assert_same_dpo_run(tmp_path / "one", tmp_path / "two", TOL)


def test_dpo_on_an_nf4_base_keeps_the_reference_and_exact_knots(tmp_path, pref_data):
    """QLoRA-style DPO: the reference log-probs are the NF4 start's, so step 1's loss is ln 2 and the
    rewards do not reset at the knot; the knots sit beside the 4-bit weights (no rounding), and a run
    killed after the knot resumes to the same chain."""
    pytest.importorskip("bitsandbytes")
    tok = make_tokenizer()

    def run(name: str, stop: int | None = None):
        raw = dpo_dict(tmp_path, pref_data, name)
        raw["model"] = {"name_or_path": "tiny-llama", "quantization": "nf4"}
        return train(from_dict(RunConfig, raw), wide_llama(), tok, stop_after=stop, progress=False)

    s = run("nf4").summary
    assert s["quantization"] == "nf4" and s["knot_rounding"]["max_rel_fro"] == 0.0
    x = steps(tmp_path / "nf4")
    assert x[0]["loss"] == pytest.approx(0.693147, abs=1e-5)  # the policy is the reference at the start
    assert x[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    # the step after the knot: the reference did not move with the knot, so the margin stays learned
    assert abs(x[3]["rewards/margins"]) > 1e-3 and x[3]["loss"] != pytest.approx(0.693147, abs=1e-4)
    assert run("resumed", stop=4).summary["step"] == 4
    run("resumed")
    assert_same_dpo_run(tmp_path / "nf4", tmp_path / "resumed", {"rtol": 1e-6, "atol": 1e-7})
