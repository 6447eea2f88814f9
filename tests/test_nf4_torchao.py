"""A torchao NF4 base (`model.quant_backend: torchao`, training/nf4_torchao.py): exact knots on one
process, each fsdp rank holding half of every NF4 weight as the one-process quantization's rows, a
2-rank fsdp run (and a resume from it) equal to one process, and the refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_tokenizer
from test_parallel import config, run_one, torchrun
from test_quantization import wide_llama
from test_sharded_export import X, edit

from lorachain.chain.knot import Factors
from lorachain.chain.sidepath import dequantized, is_nf4, is_quantized_layer, merge_quantized
from lorachain.config import ConfigError, ModelConfig, RunConfig, from_dict
from lorachain.training import nf4_torchao
from lorachain.training.parallel import Dist, check_parallel
from lorachain.training.quantization import linear_names, quantized_base

pytest.importorskip("torchao")

TORCHAO = {"quantization": "nf4", "quant_backend": "torchao", "compute_dtype": "float32"}
SHARD_RUN = str(Path(__file__).parent / "nf4_shard_run.py")


def nf4_base(folder=None) -> torch.nn.Module:
    model = wide_llama()
    if folder is not None:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return quantized_base(model, ModelConfig(name_or_path="x", **TORCHAO))


def wide_dir(tmp_path) -> Path:
    folder = tmp_path / "wide"
    wide_llama().save_pretrained(folder)  # Linears wide enough for blocks of 64
    make_tokenizer().save_pretrained(folder)
    return folder


def test_knots_on_an_nf4_base_are_exact_on_one_process():
    """A knot keeps the NF4 codes as they are and adds the link as a side path: the model is the
    NF4 base plus s·B·A, within fp32 rounding."""
    model = nf4_base()
    names = linear_names(model)
    assert len(names) == 14 and all(is_nf4(model.get_submodule(n).weight) for n in names)
    assert not is_nf4(model.lm_head.weight) and not is_nf4(model.model.embed_tokens.weight)
    name = "model.layers.0.mlp.down_proj"
    layer = model.get_submodule(name)
    assert is_quantized_layer(layer)
    w0 = dequantized(layer)  # (out, in) fp32
    codes = layer.weight.quantized_data.clone()
    g = torch.Generator().manual_seed(0)
    f = Factors(A=torch.randn(3, 128, generator=g), B=torch.randn(64, 3, generator=g), scale=0.5)
    x = torch.randn(2, 5, 128, generator=g)
    merge_quantized(model, {name: f}, mode="side")
    merge_quantized(model, {name: f}, mode="side")  # a second link stacks on the path
    want = x @ (w0 + 2 * f.scale * f.B @ f.A).T
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(layer.weight.quantized_data, codes) and layer.chain_side.A.shape == (6, 128)


def test_requantize_on_an_nf4_base_records_its_rounding():
    model = nf4_base()
    name = "model.layers.1.self_attn.q_proj"
    g = torch.Generator().manual_seed(1)
    f = Factors(A=torch.randn(2, 64, generator=g), B=torch.randn(64, 2, generator=g), scale=0.01)
    out = merge_quantized(model, {name: f}, mode="requantize")
    assert is_nf4(model.get_submodule(name).weight)
    assert 0.0 < out["rel_fro"] and out["max_abs"] > 0.0  # 4 bits cannot hold a small update


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_each_rank_holds_half_of_every_nf4_weight(tmp_path, dtype):
    """Loaded sharded (built on meta, each rank quantizing the rows it reads): every NF4 weight is
    half on each rank, its codes and scalers the one-process quantization's rows, the logits those of
    the one-process NF4 model; a bf16 compute dtype holds the embeddings in bf16 there too."""
    folder = wide_dir(tmp_path)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", SHARD_RUN]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LORACHAIN_DIST_TIMEOUT": "60"}
    args = [str(folder), str(tmp_path), dtype]
    proc = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=150, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        row = json.loads((tmp_path / f"rank{rank}.json").read_text())
        weights = row["weights"]
        assert len(weights) == 14  # 7 Linears in each of 2 decoder layers; not the embeddings, not the head
        for name, w in weights.items():
            assert w["local_nf4"] and w["local_rows"] * 2 == w["rows"], name
            assert w["same_rows"], name  # the rows of the one-process quantization, bit for bit
        print(f"rank {rank} ({dtype}): max abs logit difference to one process {row['logits_max_abs']:.3g}")
        assert row["logits_max_abs"] <= 1e-5
        assert row["gather"].startswith("fsdp all-gather: shared memory")  # composes with NF4's hooks
        assert row["embed_dtype"] == dtype and row["read"] and row["broadcast"]
        assert row["layer_gather_bytes"] < row["layer_fp32_bytes"] / 5  # a layer gathers codes and scalers


def nf4_runs(tmp_path, toy_data, folder, stop: str | None = None, parallel="fsdp") -> tuple[Path, Path]:
    one = edit(config(tmp_path, toy_data, folder, "one", "auto"), model=TORCHAO)
    two = edit(config(tmp_path, toy_data, folder, "two", parallel), model=TORCHAO)
    run_one(one)
    proc = torchrun(str(two), *([stop] if stop else []))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return one, two


def chain_logits(folder: Path, run: Path) -> torch.Tensor:
    """Logits of the NF4 base (quantized on this process) with a run's exported adapter (Σ links)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(nf4_base(folder), str(run / "adapter")).eval()
    with torch.no_grad():
        return model(input_ids=X).logits


def assert_same_logits(folder: Path, one: Path, two: Path) -> float:
    a, b = chain_logits(folder, one), chain_logits(folder, two)
    diff = float((a - b).abs().max())
    print(f"max abs logit difference, 2 ranks vs one process (NF4 torchao): {diff:.3g}")
    assert diff <= 1e-3
    with torch.no_grad():
        base = nf4_base(folder)(input_ids=X).logits
    assert float((a - base).abs().max()) > 1e-2  # the chain moved the model
    s1, s2 = (json.loads((d / "summary.json").read_text()) for d in (one, two))
    assert len(s1["links"]) == len(s2["links"]) == 2  # a knot was tied
    assert s2["final_eval"]["eval_loss"] == pytest.approx(s1["final_eval"]["eval_loss"], rel=1e-4)
    return diff


@pytest.mark.parametrize("parallel", ["fsdp", pytest.param("ddp", marks=pytest.mark.slow)])
def test_fsdp_on_an_nf4_base_equals_one_process(tmp_path, toy_data, parallel):
    folder = wide_dir(tmp_path)
    one, two = nf4_runs(tmp_path, toy_data, folder, parallel=parallel)
    assert_same_logits(folder, tmp_path / "one", tmp_path / "two")
    assert json.loads((tmp_path / "two" / "config.json").read_text())["model"]["quant_backend"] == "torchao"


@pytest.mark.slow
def test_fsdp_on_an_nf4_base_resumes_on_one_process(tmp_path, toy_data):
    """Stopped after the knot (step 3) and a checkpoint (step 4); resumed unsharded: the knot is
    replayed as a side path on the one-process NF4 base."""
    folder = wide_dir(tmp_path)
    _, two = nf4_runs(tmp_path, toy_data, folder, stop="4")
    assert (tmp_path / "two" / "checkpoint.pt").is_file() and not (tmp_path / "two" / "summary.json").exists()
    assert run_one(two, parallel="auto")["status"] == "finished"
    assert_same_logits(folder, tmp_path / "one", tmp_path / "two")


def test_refusals_name_the_field(tmp_path, toy_data, tiny_dir, monkeypatch):
    for key in [k for k in sys.modules if k == "torchao" or k.startswith("torchao.")] or ["torchao"]:
        monkeypatch.setitem(sys.modules, key, None)  # as if not installed
    with pytest.raises(ConfigError) as e:
        nf4_torchao.require_torchao()
    assert str(e.value) == "model.quant_backend: torchao is not installed; pip install torchao==0.18.0"
    monkeypatch.undo()
    for over, start in [
        ({"quantization": "fp4", "quant_backend": "torchao"}, "model.quant_backend: torchao holds an nf4"),
        ({"quantization": "none", "quant_backend": "torchao"}, "model.quant_backend: torchao holds an nf4"),
        ({**TORCHAO, "double_quant": False}, "model.double_quant: torchao's NF4 always"),
        ({"quantization": "nf4", "quant_backend": "tao"}, "model.quant_backend: expected one of"),
    ]:
        with pytest.raises(ConfigError) as e:
            ModelConfig(name_or_path="x", **over)
        assert "\n" not in str(e.value) and str(e.value).startswith(start)
    raw = yaml.safe_load(config(tmp_path, toy_data, tiny_dir, "q", "fsdp").read_text())
    for over, start in [
        ({"quantization": "int8"}, "model.quant_backend: fsdp does not shard a bitsandbytes int8 base"),
        ({"quantization": "fp4"}, "model.quant_backend: fsdp does not shard a bitsandbytes fp4 base"),
        ({**TORCHAO, "quantized_knot": "requantize"}, "model.quantized_knot: under fsdp"),
    ]:
        raw["model"] = {**raw["model"], "quantization": "none", "quant_backend": "bitsandbytes"} | over
        with pytest.raises(ConfigError) as e:
            check_parallel(from_dict(RunConfig, raw), Dist(0, 2, "fsdp"))
        assert "\n" not in str(e.value) and str(e.value).startswith(start)
    raw["model"] = {**raw["model"], "quantized_knot": "side"}
    check_parallel(from_dict(RunConfig, raw), Dist(0, 2, "fsdp"))  # nf4 with torchao: accepted
    with pytest.raises(
        ConfigError, match=r"^model.quant_backend: torchao's NF4 shards a.weight \[16, 64\] over 3"
    ):
        nf4_torchao.check_weight("a.weight", (16, 64), 3)
    with pytest.raises(
        ConfigError, match=r"^model.quant_backend: torchao's NF4 needs weights of a multiple of 64"
    ):
        nf4_torchao.check_weight("b.weight", (3, 5))
