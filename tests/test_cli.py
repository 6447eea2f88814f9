"""`lorachain train` and `lorachain export` end to end on a tiny model saved to disk; bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import run_config
from peft import PeftModel
from transformers import AutoModelForCausalLM

from lorachain.cli import main
from lorachain.config import RunConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
X = torch.tensor([[2, 4, 10, 11, 12, 13, 5, 6, 5]])


def write_cfg(tmp_path: Path, toy_data, tiny_dir: Path, **over) -> Path:
    cfg = run_config(tmp_path, toy_data, "llama", **over)
    cfg["model"]["name_or_path"] = str(tiny_dir)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_train_then_export(tmp_path, toy_data, tiny_dir, capsys):
    cfg = write_cfg(tmp_path, toy_data, tiny_dir)
    assert main(["train", str(cfg), "chain.links.1.rank=3", "optim.lr=0.02"]) == 0
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert [link["rank"] for link in summary["links"]] == [4, 3]
    assert json.loads((run / "config.json").read_text())["optim"]["lr"] == 0.02
    assert list((run / "tb").glob("events.out.tfevents.*"))
    assert (
        main(["export", str(run), "--out", str(tmp_path / "ad"), "--merged", str(tmp_path / "merged")]) == 0
    )
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    adapter = PeftModel.from_pretrained(base, str(tmp_path / "ad")).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            adapter(input_ids=X).logits, merged(input_ids=X).logits, rtol=1e-4, atol=1e-5
        )
    assert (tmp_path / "merged" / "tokenizer.json").is_file()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["chain.links.0.rank=0"], "chain.links: rank must be > 0, got 0"),
        (["chain.links.0.fraction=0.5", "chain.links.1.fraction=0.2"], "must be positive and add up to"),
        (["optim.name=lion"], "optim.name: expected one of ('adamw', 'sgd', 'adagrad'), got 'lion'"),
        (["chain.target_modules=[qkv]"], "chain.target_modules: qkv not found in llama"),
        (["data.prompt=Review : {review}"], "line 1: missing field 'review'"),
        (["optim.lr=fast"], "optim.lr: expected a number, got 'fast'"),
        (["train.bogus=1"], "train.bogus: unknown key"),
        (["chain.knot.policy=magic"], "chain.knot.policy: expected one of ['auto', 'fixed']"),
    ],
)
def test_bad_config_fails_with_one_clear_line(tmp_path, toy_data, tiny_dir, capsys, overrides, message):
    cfg = write_cfg(tmp_path, toy_data, tiny_dir)
    assert main(["train", str(cfg), *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    last = err.splitlines()[-1]  # transformers may print a loading bar first
    assert last.startswith("lorachain: error: ") and message in last


def test_missing_label_value_names_file_line_field(tmp_path, toy_data, tiny_dir, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "good film", "label": 1}\n{"text": "bad film", "label": 7}\n')
    cfg = write_cfg(tmp_path, toy_data, tiny_dir)
    assert main(["train", str(cfg), f"data.train={bad}"]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: line 2: field 'label' is 7; expected one of ['0', '1']" in err


def test_cli_error_has_no_traceback(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("model: {name_or_path: x}\ndata: {train: t.jsonl}\nchain: {links: [{rank: -1}]}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "lorachain", "train", str(bad)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "lorachain: error: chain.links: rank must be > 0, got -1"


@pytest.mark.parametrize("path", sorted((ROOT / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path):
    from lorachain.experiment.config import ExperimentConfig
    from lorachain.routing.config import RouteConfig

    if "experiments" in path.parts:  # every method's RunConfig must build too
        from lorachain.experiment.runner import Cell, run_config
        from lorachain.tasks import get_task

        cfg = load_config(path, cls=ExperimentConfig)
        for name, method in cfg.methods.items():
            if not method.get("baseline"):
                run = run_config(cfg, Cell(cfg.tasks[0], name, 0, 1e-3), get_task(cfg.tasks[0]), Path("/tmp"))
                assert run.chain.links and (run.train.max_steps or run.train.epochs)
        return
    cls = RouteConfig if "route" in path.parts else RunConfig
    cfg = load_config(path, cls=cls)
    assert cfg.chain.links and cfg.model.name_or_path
    if cls is RunConfig:
        assert (ROOT / cfg.data.train).is_file()


def test_ctrl_c_saves_and_rerun_resumes_to_same_weights(tmp_path, toy_data, tiny_dir):
    """SIGINT mid-run: the step finishes, a checkpoint is written, exit 130; the same command
    resumes and ends with the weights of an uninterrupted run."""
    import signal
    import time

    from safetensors.torch import load_file

    over = {
        "train": {"max_steps": 300, "batch_size": 8, "save_every": 1000, "seed": 0},
        "chain": {"links": [{"rank": 4, "alpha": 8}, {"rank": 2, "alpha": 4}], "dropout": 0.1},
    }
    ref_cfg = write_cfg(tmp_path, toy_data, tiny_dir, output_dir=str(tmp_path / "ref"), **over)
    assert main(["train", str(ref_cfg)]) == 0
    cfg = write_cfg(tmp_path, toy_data, tiny_dir, output_dir=str(tmp_path / "run"), **over)
    cmd = [sys.executable, "-m", "lorachain", "train", str(cfg)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 20):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "run the same command again to resume" in err
    assert (tmp_path / "run" / "checkpoint.pt").is_file()
    stopped_at = len(metrics.read_text().splitlines())
    assert 20 <= stopped_at < 300
    assert subprocess.run(cmd, cwd=tmp_path, capture_output=True, timeout=300).returncode == 0
    a = load_file(str(tmp_path / "ref" / "chain.safetensors"))
    b = load_file(str(tmp_path / "run" / "chain.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
