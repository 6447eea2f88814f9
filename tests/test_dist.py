"""Data-parallel training: `accelerate launch --num_processes 2` (CPU, gloo) equals one process."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch
import yaml
from conftest import make_tokenizer, run_config, tiny_model
from safetensors.torch import load_file

from lorachain.cli import main

ACCELERATE = shutil.which("accelerate")


def launch_two(args: list[str], cwd) -> subprocess.CompletedProcess:
    """`accelerate launch` on 2 CPU processes (gloo) of `python -m lorachain ARGS`."""
    cmd = [
        ACCELERATE,
        "launch",
        "--cpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "lorachain",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=cwd)


@pytest.mark.skipif(ACCELERATE is None, reason="accelerate's launcher is not on PATH")
@pytest.mark.parametrize("policy", ["fixed", "auto"])
def test_two_processes_equal_one(tmp_path, toy_data, policy):
    model = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(model)
    make_tokenizer().save_pretrained(model)
    paths = {}
    for name in ("one", "two"):
        cfg = run_config(
            tmp_path,
            toy_data,
            "llama",
            output_dir=str(tmp_path / name),
            chain={
                "links": [{"rank": 4, "alpha": 8}, {"rank": 2, "alpha": 4}],
                "dropout": 0.0,
                "knot": {"policy": policy, "window": 2, "min_delta": 0.2, "min_link_steps": 2},
            },
            train={"epochs": 2, "batch_size": 8, "grad_accum": 2, "save_every": 2, "seed": 0},
        )
        cfg["model"]["name_or_path"] = str(model)
        paths[name] = tmp_path / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(cfg))
    assert main(["train", str(paths["one"])]) == 0
    proc = launch_two(["train", str(paths["two"])], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    one, two = (json.loads((tmp_path / n / "summary.json").read_text()) for n in ("one", "two"))
    assert [link["end_step"] for link in one["links"]] == [link["end_step"] for link in two["links"]]
    assert one["links"][0]["tokens"] == two["links"][0]["tokens"]  # summed over both ranks
    a, b = (load_file(str(tmp_path / n / "chain.safetensors")) for n in ("one", "two"))
    assert a.keys() == b.keys()
    for k in a:  # same global batch: equal up to the order of floating-point sums across ranks
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    assert not list((tmp_path / "two").glob("*.tmp"))  # rank 0 alone wrote, atomically


@pytest.mark.skipif(ACCELERATE is None, reason="accelerate's launcher is not on PATH")
def test_route_train_on_two_processes_equals_one(tmp_path):
    from conftest import route_rows, write_jsonl

    model = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(model)
    make_tokenizer().save_pretrained(model)
    data = write_jsonl(tmp_path / "rows.jsonl", route_rows(10))
    for name in ("one", "two"):
        cfg = {
            "model": {"name_or_path": str(model)},
            "data": {"path": str(data), "max_length": 16},
            "prompt": "{instruction} =>",
            "task_prompt": "{instruction} task:",
            "chain": {"links": [{"rank": 4, "alpha": 8}], "dropout": 0.0},
            "optim": {"lr": 0.02},
            "train": {"epochs": 2, "batch_size": 4},
            "selector": {"kind": "lora"},
            "output_dir": str(tmp_path / name),
        }
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["route", "train", str(tmp_path / "one.yaml")]) == 0
    proc = launch_two(["route", "train", str(tmp_path / "two.yaml")], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    one, two = (json.loads((tmp_path / n / "manifest.json").read_text()) for n in ("one", "two"))
    assert (
        one["adapters"].keys() == two["adapters"].keys() == {"alpha", "beta", "gamma", "_mixed", "_selector"}
    )
    for name in one["adapters"]:
        a, b = (
            load_file(str(tmp_path / n / "adapters" / name / "adapter_model.safetensors"))
            for n in ("one", "two")
        )
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=f"{name}: {k}")
