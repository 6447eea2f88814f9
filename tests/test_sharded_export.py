"""An fsdp run's merged model, gathered to rank 0 a unit at a time (training/merged_shards.py), equals
the one-process run's; fsdp with a bitsandbytes base is refused in one line, and the ddp it points to
trains a quantized base on 2 processes as one process does."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import make_tokenizer
from safetensors.torch import load_file
from test_parallel import config, run_one, torchrun
from test_quantization import wide_llama
from transformers import AutoModelForCausalLM

from lorachain.config import ConfigError, RunConfig, from_dict
from lorachain.training.parallel import Dist, check_parallel

X = torch.tensor([[2, 10, 11, 12, 13, 14, 15, 16], [2, 20, 21, 22, 23, 24, 25, 26]])


def edit(path, **top):
    data = yaml.safe_load(path.read_text())
    for key, value in top.items():
        if isinstance(value, dict):
            data[key].update(value)
        else:
            data[key] = value
    path.write_text(yaml.safe_dump(data))
    return path


def logits(folder) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=X).logits


def test_fsdp_writes_the_merged_model_a_unit_at_a_time(tmp_path, toy_data, tiny_dir):
    run_one(edit(config(tmp_path, toy_data, tiny_dir, "one", "auto"), export_merged=True))
    proc = torchrun(str(edit(config(tmp_path, toy_data, tiny_dir, "two", "fsdp"), export_merged=True)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged = tmp_path / "two" / "merged"
    index = json.loads((merged / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) == 5  # 2 decoder layers, then the embeddings, the final norm, the head
    layer0 = load_file(str(merged / index["weight_map"]["model.layers.0.self_attn.q_proj.weight"]))
    assert all(k.startswith("model.layers.0.") for k in layer0) and len(layer0) == 9
    assert index["weight_map"]["lm_head.weight"] != index["weight_map"]["model.embed_tokens.weight"]
    assert (merged / "config.json").is_file() and (merged / "tokenizer.json").is_file()
    assert not list((tmp_path / "two").glob(".merged*"))  # written whole, then swapped in
    one, two = logits(tmp_path / "one" / "merged"), logits(merged)
    assert float((one - two).abs().max()) < 1e-5
    assert float((two - logits(tiny_dir)).abs().max()) > 1e-3  # the knots are in it


def test_fsdp_with_a_quantized_base_is_refused_in_one_line(tmp_path, toy_data, tiny_dir):
    raw = yaml.safe_load(config(tmp_path, toy_data, tiny_dir, "q", "fsdp").read_text())
    raw["model"]["quantization"] = "nf4"
    with pytest.raises(ConfigError) as e:
        check_parallel(from_dict(RunConfig, raw), Dist(0, 2, "fsdp"))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("model.quant_backend: fsdp does not shard a bitsandbytes nf4")
    assert "model.quant_backend: torchao, or train.parallel: ddp" in msg


def test_ddp_trains_a_quantized_base_as_one_process_does(tmp_path, toy_data):
    pytest.importorskip("bitsandbytes")
    folder = tmp_path / "wide"
    wide_llama().save_pretrained(folder)  # Linears wide enough for 4-bit blocks of 64
    make_tokenizer().save_pretrained(folder)
    q = {"quantization": "nf4", "compute_dtype": "float32"}
    one = edit(config(tmp_path, toy_data, folder, "one", "auto"), model=q)
    two = edit(config(tmp_path, toy_data, folder, "two", "ddp"), model=q)
    run_one(one)
    proc = torchrun(str(two))
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = (load_file(str(tmp_path / d / "chain.safetensors")) for d in ("one", "two"))
    assert a.keys() == b.keys() and len(a) > 0
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-3
    s = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert s["quantization"] == "nf4" and len(s["links"]) == 2
