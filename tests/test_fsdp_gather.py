"""`train.fsdp_all_gather` and `train.fsdp_reshard_after_forward` on 2 CPU processes (torchrun, gloo):
the shared-memory all-gather gives the process group's numbers bit for bit and the whole model's within
fp32 tolerance, its arena is unlinked, a unit kept gathered after a forward is resharded before a knot
writes the shards; whole runs equal one process; bad values are one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_parallel import assert_same_run, config, run_one, torchrun

from lorachain.config import ConfigError, RunConfig, from_dict

GATHER = str(Path(__file__).parent / "fsdp_gather_run.py")


def test_shared_memory_gathers_what_the_process_group_gathers(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", GATHER]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LORACHAIN_DIST_TIMEOUT": "60"}
    proc = subprocess.run([*cmd, str(tmp_path / "g")], capture_output=True, text=True, timeout=150, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        r = json.loads((tmp_path / f"g.rank{rank}.json").read_text())
        assert r["notes"]["process_group"] == "fsdp all-gather: process group"
        assert r["notes"]["shared_memory"].startswith("fsdp all-gather: shared memory (3 x ")
        assert r["notes"]["kept"].endswith(", kept gathered from forward to backward")
        assert r["bitwise_equal_gathers"]  # logits and input gradients, every way of gathering
        for name in ("process_group", "shared_memory", "kept"):
            assert r["logit_diff"][name] < 1e-5 and r["grad_diff"][name] < 1e-4, name
            assert r["after_knot_diff"][name] < 1e-5, name  # the knot reached the next forward
        assert r["shared_gathers_process_group"] is None
        # forward: root, embeddings, 3 layers, head; backward: 3 layers and the head (not the
        # embeddings); then two forwards (6 each); kept gathered: no gathers in the backward
        assert r["shared_gathers_shared_memory"] == 6 + 4 + 12
        assert r["shared_gathers_kept"] == 6 + 0 + 12
        assert r["gathered_after_forward_kept"] and not r["gathered_after_forward_shared_memory"]
        assert r["gathered_before_knot_kept"]  # an evaluation left it gathered; the knot resharded it
        assert all(m.endswith("(deleted)") for m in r["arena_maps"]) and len(r["arena_maps"]) == 2
    assert not list(Path("/dev/shm").glob("lorachain-fsdp-*"))


@pytest.mark.parametrize(
    "over",
    [{"fsdp_all_gather": "process_group"}, {"fsdp_reshard_after_forward": False, "eval_every": 1}],
    ids=["process_group", "kept_gathered"],
)
def test_gather_settings_train_as_one_process(tmp_path, toy_data, tiny_dir, over):
    single = {k: v for k, v in over.items() if not k.startswith("fsdp")}
    run_one(config(tmp_path, toy_data, tiny_dir, "one", "auto", **single))
    proc = torchrun(str(config(tmp_path, toy_data, tiny_dir, "two", "fsdp", **over)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(tmp_path / "one", tmp_path / "two")


def test_bad_all_gather_is_one_line(tmp_path, toy_data):
    from conftest import run_config

    raw = run_config(tmp_path, toy_data)
    raw["train"]["fsdp_all_gather"] = "nccl"
    with pytest.raises(ConfigError, match=r"^train.fsdp_all_gather: expected auto, shared_memory or "):
        from_dict(RunConfig, raw)
