"""The setup pipeline (`training/setup.py`): the order of its steps, and what it hands the loop."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import torch
from conftest import run_config, tiny_model, write_jsonl

import lorachain.training.setup as setup
from lorachain.config import RunConfig, from_dict
from lorachain.data import DataError


def _cfg(tmp_path, toy_data, **over) -> RunConfig:
    return from_dict(
        RunConfig, run_config(tmp_path, toy_data, "llama", output_dir=str(tmp_path / "r"), **over)
    )


def test_prepare_lists_its_steps_in_order_in_a_few_lines():
    src = inspect.getsource(setup.prepare)
    assert len(src.splitlines()) <= 40
    nodes = [n for n in ast.walk(ast.parse(src)) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)]
    calls = [n.func.id for n in sorted(nodes, key=lambda n: (n.lineno, n.col_offset))]
    order = ["init_dist", "load_data", "check_before_load", "load_base", "resolve", "quantize", "place"]
    order += ["set_attention", "check_model", "resolve_target_modules", "compute_copies", "shard"]
    assert [c for c in calls if c in order] == order


def test_bad_data_fails_before_the_model_loads(tmp_path, toy_data, monkeypatch, tokenizer):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "good film", "label": 1}, {"txt": "x"}])
    cfg = _cfg(tmp_path, toy_data)
    cfg.data.train = str(bad)
    loaded = []
    monkeypatch.setattr(setup, "load_base", lambda *a, **k: loaded.append(1))
    with pytest.raises(DataError, match="bad.jsonl"):
        setup.prepare(cfg, None, tokenizer)
    assert loaded == []


def test_prepare_hands_the_loop_a_ready_model_and_budget(tmp_path, toy_data, tokenizer):
    cfg = _cfg(tmp_path, toy_data)
    cfg.train.precision = "bf16"
    s = setup.prepare(cfg, tiny_model("llama"), tokenizer)
    assert s.data.total == s.data.steps_per_epoch * int(cfg.train.epochs)
    assert len(s.data.train) == 48 and len(s.data.eval) == 16
    assert s.targets == ["q_proj", "v_proj"] and not s.fan_in_fan_out
    # frozen targets held in bf16 for autocast, their fp32 masters kept for the knots
    q = s.model.model.layers[0].self_attn.q_proj
    assert q.weight.dtype == torch.bfloat16
    assert s.masters["model.layers.0.self_attn.q_proj"].dtype == torch.float32
    assert s.n_params == sum(p.numel() for p in s.model.parameters())


def test_models_imports_nothing_from_training():
    tree = ast.parse((Path(setup.__file__).parents[1] / "models.py").read_text())
    mods = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert mods and not [m for m in mods if m.startswith("lorachain.training")]
