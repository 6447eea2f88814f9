"""Sharded loading (`train.parallel: fsdp`, training/sharded.py) on 2 CPU processes (torchrun, gloo):
each rank holds its half of every parameter, nothing is left on meta, RoPE and tied embeddings are
right, the logits are `from_pretrained`'s; and the per-rank memory estimate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_config
from transformers import LlamaConfig, LlamaForCausalLM

from lorachain.config import ConfigError, RunConfig, from_dict
from lorachain.training.memory import GIB, check_memory, estimate
from lorachain.training.sharded import Entry, read_header, read_rows, safetensors_index

RUN = str(Path(__file__).parent / "sharded_run.py")


def torchrun(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", RUN]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LORACHAIN_DIST_TIMEOUT": "60"}
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout, env=env)


def llama(tied: bool) -> LlamaForCausalLM:
    """A 2-layer Llama with rows that do not divide evenly by 2 (vocab 67, kv rows 2·8)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=67,
        max_position_embeddings=64,
        rope_theta=500.0,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize(
    ("tied", "saved", "how"),
    [(False, torch.float32, "map"), (False, torch.float32, "read"), (True, torch.bfloat16, "broadcast")],
)
def test_each_rank_loads_its_half_and_the_logits_are_the_whole_models(tmp_path, tied, saved, how):
    llama(tied).to(saved).save_pretrained(tmp_path / "m")
    proc = torchrun(str(tmp_path / "m"), "float32", how, str(tmp_path / "r"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"r.rank{k}.json").read_text()) for k in (0, 1)]
    names = set(ranks[0]["rows"])
    assert ("lm_head.weight" in names) is not tied and len(names) == 20 + (not tied)
    for name in names:  # rows split like torch.chunk: ceil(n/2) on rank 0, the rest on rank 1
        (r0, n), (r1, _) = ranks[0]["rows"][name], ranks[1]["rows"][name]
        assert (r0, r1) == (-(-n // 2), n - -(-n // 2)), name
    assert ranks[0]["rows"]["model.embed_tokens.weight"] == [34, 67]
    for r in ranks:
        assert r["meta"] == [] and r["dtypes"] == ["torch.float32"]
        assert r["rope_diff"] == 0.0  # inv_freq recomputed, not left as to_empty's garbage
        assert r["tied"] is tied and r["ref_tied"] is tied
        assert r["logit_diff"] < 1e-5
    full_chunks = {n for n, (rows, total) in ranks[0]["rows"].items() if rows == -(-total // 2)}
    if how == "map":  # every full chunk of rows is a private map of the file, still after a forward
        assert ranks[0]["file_backed"] == sorted(full_chunks) and "model.norm.weight" in full_chunks
        assert ranks[1]["file_backed"] == sorted(
            n for n in full_chunks if ranks[1]["rows"][n][0] == ranks[0]["rows"][n][0]
        )
        assert "model.embed_tokens.weight" not in ranks[1]["file_backed"]  # 33 of 67 rows: padded, copied
    else:
        assert ranks[0]["file_backed"] == ranks[1]["file_backed"] == []


def test_read_rows_reads_a_row_range_and_converts_the_dtype(tmp_path):
    from safetensors.torch import save_file

    w = torch.arange(7 * 5, dtype=torch.float32).reshape(7, 5)
    save_file({"a": torch.zeros(3), "w": w.to(torch.bfloat16)}, str(tmp_path / "model.safetensors"))
    entry = safetensors_index(tmp_path)["w"]
    assert entry == read_header(tmp_path / "model.safetensors")["w"] and entry.shape == (7, 5)
    out = torch.empty(3, 5)
    read_rows(entry, 4, out)  # rows 4..6, bf16 on disk -> fp32 here
    assert torch.equal(out, w[4:])
    bf = torch.empty(2, 5, dtype=torch.bfloat16)
    read_rows(entry, 0, bf)  # same dtype: straight into the tensor's bytes
    assert torch.equal(bf.float(), w[:2])
    short = Entry(entry.file, entry.offset + 60, entry.dtype, entry.shape)
    with pytest.raises(ConfigError, match="ends early"):
        read_rows(short, 5, torch.empty(2, 5))
    assert safetensors_index(tmp_path / "nothing-here") is None


LLAMA_1B = LlamaConfig(  # benchmarks/scale_models.py's 1b shape
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    vocab_size=32000,
)


def test_the_estimate_holds_a_shard_and_two_gathered_units_per_rank(tmp_path, toy_data):
    raw = run_config(tmp_path, toy_data)
    raw["model"] = {"name_or_path": "big"}
    raw["train"].update(parallel="fsdp", batch_size=2)
    cfg = from_dict(RunConfig, raw)
    one = estimate(cfg, LLAMA_1B)
    two = estimate(cfg, LLAMA_1B, world=2)
    layer = 4 * (2 * 2048 * 2048 + 2 * 2048 * 256 + 3 * 2048 * 5632 + 2 * 2048)  # q, o, k, v, MLP, norms
    assert layer < 4 * 32000 * 2048  # the embeddings are the largest unit
    arena = 0 if torch.cuda.is_available() else 3 * 4 * 32000 * 2048 / 2  # shared-memory slots, a host
    assert two.weights == pytest.approx(one.weights / 2 + 2 * 4 * 32000 * 2048 + arena)
    raw["train"].update(fsdp_all_gather="process_group")
    gloo = estimate(from_dict(RunConfig, raw), LLAMA_1B, world=2)
    assert gloo.weights == pytest.approx(one.weights / 2 + 2 * 4 * 32000 * 2048)
    raw["train"].update(fsdp_reshard_after_forward=False)  # every unit gathered at the forward's end
    kept = estimate(from_dict(RunConfig, raw), LLAMA_1B, world=2)
    assert kept.weights == pytest.approx(one.weights / 2 + one.weights)
    assert 4.0 * GIB < one.weights < 4.2 * GIB and two.activations == pytest.approx(one.activations / 2)
    assert two.lora == one.lora  # the LoRA factors and their AdamW state stay whole on every rank
    with pytest.raises(ConfigError) as e:
        check_memory(cfg, LLAMA_1B, available=1.8 * GIB, world=2)
    msg = str(e.value)
    assert "\n" not in msg and "per process (fsdp: 1/2 of the weights each), but 1.8 GiB is available" in msg
    assert "would fit on 8 processes" in msg and "quantization" not in msg
    assert check_memory(cfg, LLAMA_1B, available=4 * GIB, world=2).total < 4 * GIB


def test_hub_ids_and_gguf_files_become_a_local_folder_first(tmp_path, monkeypatch):
    """`weights_folder`: what `models.resolve_path` gives (a GGUF converted to a safetensors folder, a
    local copy) is used as it is; a hub id is downloaded (rank 0 first, then the others)."""
    import lorachain.training.sharded as sharded
    from lorachain.config import ModelConfig
    from lorachain.training.parallel import Dist

    converted = tmp_path / "converted"
    converted.mkdir()
    monkeypatch.setattr(sharded, "resolve_path", lambda mcfg: str(converted))
    assert sharded.weights_folder(ModelConfig(name_or_path="x", gguf_file="m.gguf"), Dist()) == converted
    fetched = []
    monkeypatch.setattr(sharded, "resolve_path", lambda mcfg: mcfg.name_or_path)
    monkeypatch.setattr(sharded, "_download", lambda repo: fetched.append(repo) or str(tmp_path / "snap"))
    assert sharded.weights_folder(ModelConfig(name_or_path="org/model"), Dist()) == tmp_path / "snap"
    assert fetched == ["org/model"]
    monkeypatch.undo()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="model.name_or_path: 'no-such-org/no-such-model'"):
        sharded._download("no-such-org/no-such-model")
