"""`train.parallel`: ddp and fsdp on 2 CPU processes (torchrun, gloo) equal one process with the
same global batch, knots on shards included; resume across world sizes; bad input; a dying rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import run_config, tiny_model
from safetensors.torch import load_file

from lorachain.chain.knot import Factors, apply_factors
from lorachain.chain.shards import apply_on_shards, local_rows
from lorachain.config import ConfigError, RunConfig, from_dict
from lorachain.training.loop import train
from lorachain.training.parallel import end_launch

RUN = str(Path(__file__).parent / "parallel_run.py")
TOL = {"rtol": 1e-4, "atol": 1e-5}  # fp32: the ranks' partial sums are added in another order


def torchrun(*args: str, timeout: float = 150) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", RUN]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LORACHAIN_DIST_TIMEOUT": "60"}
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout, env=env)


def config(tmp_path, toy_data, tiny_dir, name: str, parallel: str, policy: str = "fixed", **train_over):
    cfg = run_config(
        tmp_path,
        toy_data,
        "llama",
        output_dir=str(tmp_path / name),
        chain={
            "links": [{"rank": 4, "alpha": 8}, {"rank": 2, "alpha": 4}],  # a rank step-down
            "dropout": 0.0,
            "knot": {"policy": policy, "window": 2, "min_delta": 0.2, "min_link_steps": 2},
        },
        train={"epochs": 2, "batch_size": 8, "grad_accum": 2, "save_every": 2, "seed": 0}
        | {"parallel": parallel, **train_over},
    )
    cfg["model"]["name_or_path"] = str(tiny_dir)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_one(path: Path, **over) -> dict:
    data = yaml.safe_load(path.read_text())
    data["train"].update(over)
    return train(from_dict(RunConfig, data), progress=False).summary


def assert_same_run(a: Path, b: Path) -> None:
    one, two = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert [x["end_step"] for x in one["links"]] == [x["end_step"] for x in two["links"]]
    assert [x["tokens"] for x in one["links"]] == [x["tokens"] for x in two["links"]]
    for name in ("chain.safetensors", "adapter/adapter_model.safetensors"):
        x, y = (load_file(str(d / name)) for d in (a, b))
        assert x.keys() == y.keys()
        for k in x:
            torch.testing.assert_close(x[k], y[k], **TOL, msg=k)
    assert two["final_eval"]["eval_loss"] == pytest.approx(one["final_eval"]["eval_loss"], rel=1e-5)


@pytest.mark.parametrize(
    ("parallel", "policy"),
    [("ddp", "fixed"), ("fsdp", "fixed"), pytest.param("fsdp", "auto", marks=pytest.mark.slow)],
)
def test_two_processes_equal_one(tmp_path, toy_data, tiny_dir, parallel, policy):
    one = run_one(config(tmp_path, toy_data, tiny_dir, "one", "auto", policy))
    proc = torchrun(str(config(tmp_path, toy_data, tiny_dir, "two", parallel, policy)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(one["links"]) == 2  # a knot was tied, then a link of rank 2
    assert_same_run(tmp_path / "one", tmp_path / "two")
    assert not list((tmp_path / "two").glob("*.tmp"))  # rank 0 alone wrote, atomically


def test_fsdp_resumes_on_one_process(tmp_path, toy_data, tiny_dir):
    """2 -> 1: stopped after the knot at step 3 and a checkpoint at 4, resumed without sharding."""
    run_one(config(tmp_path, toy_data, tiny_dir, "one", "auto"))
    path = config(tmp_path, toy_data, tiny_dir, "two", "fsdp")
    proc = torchrun(str(path), "4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "two" / "checkpoint.pt").is_file() and not (tmp_path / "two" / "summary.json").exists()
    assert run_one(path, parallel="auto")["status"] == "finished"  # another world size, same folder
    assert_same_run(tmp_path / "one", tmp_path / "two")


@pytest.mark.slow
def test_dying_rank_stops_the_others_and_a_rerun_resumes(tmp_path, toy_data, tiny_dir):
    run_one(config(tmp_path, toy_data, tiny_dir, "one", "auto"))
    path = config(tmp_path, toy_data, tiny_dir, "two", "fsdp")
    t0 = time.monotonic()
    proc = torchrun(str(path), "0", "1")  # rank 1 exits inside its first knot
    assert proc.returncode != 0 and time.monotonic() - t0 < 90  # no hang
    assert "exitcode  : 17" in proc.stderr  # the launcher names the dead rank
    assert not (tmp_path / "two" / "summary.json").exists()
    proc = torchrun(str(path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(tmp_path / "one", tmp_path / "two")


def test_bad_world_size_and_missing_process_group(tmp_path, toy_data, tiny_dir):
    proc = torchrun(str(config(tmp_path, toy_data, tiny_dir, "odd", "ddp", batch_size=7)))
    assert proc.returncode != 0
    assert "train.batch_size: 7 does not divide among 2 processes" in proc.stderr
    assert not (tmp_path / "odd" / "checkpoint.pt").exists()
    with pytest.raises(ConfigError, match="train.parallel: fsdp needs a process group"):
        run_one(config(tmp_path, toy_data, tiny_dir, "solo", "fsdp"))
    with pytest.raises(ConfigError, match="train.parallel: expected one of"):
        run_one(config(tmp_path, toy_data, tiny_dir, "typo", "zero3"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_knot_on_unsharded_weights_matches_apply_factors(dtype):
    """Without a process group `apply_on_shards` is `apply_factors`: same weights, same rounding."""
    a, b = tiny_model("llama").to(dtype), tiny_model("llama").to(dtype)
    g = torch.Generator().manual_seed(0)
    factors = {
        f"model.layers.{i}.self_attn.q_proj": Factors(
            A=torch.randn(3, 32, generator=g), B=torch.randn(32, 3, generator=g), scale=0.5
        )
        for i in range(2)
    }
    assert apply_on_shards(a, factors) == pytest.approx(apply_factors(b, factors), rel=1e-9)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    w = a.model.layers[0].self_attn.q_proj.weight
    rows, start = local_rows(w)
    assert start == 0 and rows.data_ptr() == w.data_ptr()


def test_callback_knot_on_fsdp2_shards(tmp_path):
    """ChainCallback._tie on a hand-wrapped FSDP2 model equals it on the unsharded model."""
    script = str(Path(__file__).parent / "fsdp_callback.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", script]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [*cmd, str(tmp_path / "r.json")], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["local_shape"] == [16, 32] and r["lora_A_local_shape"] == [2, 32]  # base and LoRA sharded
    assert r["max_factor_diff"] == 0.0  # the gathered factors are the unsharded ones
    assert r["max_param_diff"] < 1e-5 and r["max_logit_diff"] < 1e-4  # merged base, new link A, B = 0
    assert r["rounding"] == {"max_abs": 0.0, "rel_fro": 0.0}


def test_callback_refuses_deepspeed():
    from types import SimpleNamespace

    from lorachain.integrations import ChainCallback

    args = SimpleNamespace(
        load_best_model_at_end=False, deepspeed={"zero_optimization": {"stage": 3}}, fsdp=""
    )
    with pytest.raises(ConfigError, match="DeepSpeed ZeRO partitions the weights"):
        ChainCallback({"links": [{"rank": 4, "alpha": 8}]}).on_train_begin(args, None, None, model=None)


@pytest.mark.slow
def test_fsdp_resume_is_bit_exact_and_one_to_two_continues(tmp_path, toy_data, tiny_dir):
    straight = config(tmp_path, toy_data, tiny_dir, "straight", "fsdp")
    assert torchrun(str(straight)).returncode == 0
    resumed = config(tmp_path, toy_data, tiny_dir, "resumed", "fsdp")
    assert torchrun(str(resumed), "4").returncode == 0
    assert torchrun(str(resumed)).returncode == 0  # same world size: bit-exact on CPU
    for name in ("chain.safetensors", "adapter/adapter_model.safetensors"):
        a, b = (load_file(str(tmp_path / d / name)) for d in ("straight", "resumed"))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    grown = config(tmp_path, toy_data, tiny_dir, "grown", "auto")
    train(from_dict(RunConfig, yaml.safe_load(grown.read_text())), stop_after=4, progress=False)  # 1 process
    proc = torchrun(str(config(tmp_path, toy_data, tiny_dir, "grown", "fsdp")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(tmp_path / "straight", tmp_path / "grown")


END_SCRIPT = """
import atexit, sys
from pathlib import Path
import torch, torch.distributed as dist
from lorachain.training.parallel import end_launch

out = Path(sys.argv[1])
dist.init_process_group("gloo")
rank = dist.get_rank()
atexit.register(lambda: (out / f"atexit{rank}").write_text("ran"))
t = torch.ones(1000)
work = dist.all_reduce(t, async_op=True)  # an async collective on gloo's worker thread
work.wait()
end_launch(int(sys.argv[2]))
(out / f"after{rank}").write_text("must not run")
"""


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo on CPU")
@pytest.mark.parametrize("code", [0, 3])
def test_end_launch_ends_every_rank_with_its_code_after_the_atexit_handlers(tmp_path, code):
    """Under torchrun, `end_launch` destroys the group, runs the atexit handlers (trackers flush)
    and exits with the given status without the interpreter teardown; without a group it returns."""
    assert end_launch(5) == 5  # no process group in this process
    script = tmp_path / "end.py"
    script.write_text(END_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [*cmd, str(script), str(tmp_path), str(code)], capture_output=True, text=True, timeout=120, env=env
    )
    assert (proc.returncode == 0) == (code == 0), proc.stderr[-2000:]
    written = sorted(p.name for p in tmp_path.iterdir() if p.name != "end.py")
    if code == 0:  # after success the ranks meet at a barrier, so every rank runs its handlers
        assert written == ["atexit0", "atexit1"]
    else:  # no barrier on failure (a failed rank may be alone): torchrun may stop the other rank
        # before its handlers once the first exits, as it did under load; the first always runs them
        assert written in (["atexit0"], ["atexit1"], ["atexit0", "atexit1"])
    if code:
        assert f"exitcode  : {code}" in proc.stderr
