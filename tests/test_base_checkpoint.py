"""The knotted base saved with torch.distributed.checkpoint once per knot (training/base_checkpoint.py):
a resume at 2 -> 1 and 1 -> 2 processes loads it instead of replaying the knots and ends where the
uninterrupted run ends; a folder left by a kill is never read."""

from __future__ import annotations

import shutil

import torch
import yaml
from safetensors.torch import load_file
from test_parallel import assert_same_run, config, run_one, torchrun

from lorachain.config import RunConfig, from_dict
from lorachain.training import base_checkpoint
from lorachain.training.loop import train


def max_diff(a, b) -> float:
    """The largest difference between the two runs' exported adapters."""
    x, y = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (a, b))
    return max(float((x[k] - y[k]).abs().max()) for k in x)


def stop_at(path, step: int) -> dict:
    """One process on the config at `path`, stopped after `step` steps as an interruption would."""
    cfg = from_dict(RunConfig, yaml.safe_load(path.read_text()))
    return train(cfg, stop_after=step, progress=False).summary


def count_loads(monkeypatch) -> list[bool]:
    calls, load = [], base_checkpoint.load_base
    monkeypatch.setattr(base_checkpoint, "load_base", lambda *a: calls.append(load(*a)) or calls[-1])
    return calls


def test_one_process_saves_its_base_at_a_knot_and_resumes_from_it(tmp_path, toy_data, tiny_dir, monkeypatch):
    run_one(config(tmp_path, toy_data, tiny_dir, "one", "auto"))
    path = config(tmp_path, toy_data, tiny_dir, "two", "auto", base_checkpoint=True)
    out = tmp_path / "two"
    assert stop_at(path, 4)["status"] == "interrupted"
    assert sorted(p.name for p in out.glob("base-*")) == ["base-1"]  # the knot at step 3, saved once
    assert torch.load(out / "checkpoint.pt", weights_only=True)["base"] == "base-1"
    calls = count_loads(monkeypatch)
    assert run_one(path)["status"] == "finished"
    assert calls == [True]
    assert_same_run(tmp_path / "one", out)
    assert max_diff(tmp_path / "one", out) <= 1e-5
    assert not list(out.glob("base-*"))  # removed with checkpoint.pt at the end


def test_fsdp_base_resumes_on_one_process_without_replaying_knots(tmp_path, toy_data, tiny_dir, monkeypatch):
    """2 -> 1; and a base folder a kill left half-written (or complete but not yet named by
    checkpoint.pt) is not read."""
    run_one(config(tmp_path, toy_data, tiny_dir, "one", "auto"))
    path = config(tmp_path, toy_data, tiny_dir, "two", "fsdp")
    proc = torchrun(str(path), "4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "two"
    saved = out / "base-1"
    assert sorted(p.name for p in saved.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    shutil.copytree(saved, out / "base-2")  # killed after base-2/ was renamed, before checkpoint.pt
    (out / "base-3.tmp").mkdir()  # killed while writing
    (out / "base-3.tmp" / "__0_0.distcp").write_bytes(b"half")
    calls = count_loads(monkeypatch)
    assert run_one(path, parallel="auto")["status"] == "finished"  # one process, same folder
    assert calls == [True]
    assert_same_run(tmp_path / "one", out)
    assert max_diff(tmp_path / "one", out) <= 1e-5
    assert not list(out.glob("base-*"))


def test_one_process_base_resumes_under_fsdp(tmp_path, toy_data, tiny_dir):
    """1 -> 2: the single process's base (one file) is resharded into the ranks' rows."""
    run_one(config(tmp_path, toy_data, tiny_dir, "one", "auto"))
    stop_at(config(tmp_path, toy_data, tiny_dir, "grown", "auto", base_checkpoint=True), 4)
    assert (tmp_path / "grown" / "base-1" / "__0_0.distcp").is_file()
    proc = torchrun(str(config(tmp_path, toy_data, tiny_dir, "grown", "fsdp")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("knotted base loaded: True") == 2  # both ranks, no knot replayed
    assert_same_run(tmp_path / "one", tmp_path / "grown")
    assert max_diff(tmp_path / "one", tmp_path / "grown") <= 1e-5
