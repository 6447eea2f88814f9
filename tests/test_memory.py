"""The memory estimate: exact weight bytes on tiny models, and one refusal line that says what fits."""

from __future__ import annotations

import pytest
import torch
from conftest import run_config, tiny_model
from test_quantization import qcfg, wide_llama
from transformers import LlamaConfig

from lorachain.config import ConfigError, RunConfig, from_dict
from lorachain.training import memory, train
from lorachain.training.memory import GIB, check_memory, estimate
from lorachain.training.quantization import quantized_base

LLAMA2_7B = LlamaConfig(
    hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, vocab_size=32000
)


def measured_bytes(model: torch.nn.Module) -> int:
    """Bytes of every tensor the model holds: parameters (tied ones once) and 4-bit constants."""
    total, seen = 0, set()
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    for m in model.modules():
        qs = getattr(getattr(m, "weight", None), "quant_state", None)
        if qs is not None:
            total += qs.absmax.numel() * qs.absmax.element_size()
            if qs.nested:
                total += qs.state2.absmax.numel() * qs.state2.absmax.element_size()
        scb = getattr(getattr(m, "weight", None), "SCB", None)
        if scb is not None:
            total += scb.numel() * scb.element_size()
    return total


def cfg_for(tmp_path, toy_data, **model) -> RunConfig:
    raw = run_config(tmp_path, toy_data)
    raw["model"] = {"name_or_path": "tiny", **model}
    return from_dict(RunConfig, raw)


@pytest.mark.parametrize(
    "setting",
    [
        {},
        {"dtype": "bfloat16"},
        {"quantization": "nf4"},
        {"quantization": "fp4", "double_quant": False},
        {"quantization": "nf4", "compute_dtype": "bfloat16"},  # embeddings and head in bf16
    ],
)
def test_the_weight_estimate_is_what_a_tiny_model_holds(tmp_path, toy_data, setting):
    model = wide_llama()
    if "dtype" in setting:
        model = model.to(torch.bfloat16)
    if "quantization" in setting:
        extra = {k: setting[k] for k in ("double_quant", "compute_dtype") if k in setting}
        model = quantized_base(model, qcfg(setting["quantization"], **extra))
    est = estimate(cfg_for(tmp_path, toy_data, **setting), wide_llama().config)
    assert est.weights == pytest.approx(measured_bytes(model), rel=0.01)
    # LoRA r=4 on q_proj (64->64) and v_proj (64->32) of 2 layers: weights, grads, AdamW m and v
    assert est.lora == 16 * 4 * 2 * ((64 + 64) + (64 + 32))


def test_a_model_that_cannot_fit_is_refused_with_the_estimate_and_what_fits(tmp_path, toy_data):
    cfg = cfg_for(tmp_path, toy_data)
    fp32 = estimate(cfg, LLAMA2_7B)
    assert 25 * GIB < fp32.weights < 25.2 * GIB  # 6.74e9 parameters in fp32
    with pytest.raises(ConfigError) as e:
        check_memory(cfg, LLAMA2_7B, available=8 * GIB)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("model.name_or_path: training tiny needs about 2")
    assert (
        "8.0 GiB is available; would fit with train.gradient_checkpointing=true model.quantization=nf4" in msg
    )
    nf4 = estimate(
        from_dict(RunConfig, {**cfg.to_dict(), "model": {"name_or_path": "t", "quantization": "nf4"}}),
        LLAMA2_7B,
    )
    assert 0.16 < nf4.weights / fp32.weights < 0.18
    assert check_memory(cfg, tiny_model("llama").config, available=8 * GIB).total < 1 * GIB
    # the loop passes its longest row: shorter rows, fewer activations
    assert estimate(cfg, LLAMA2_7B, seq=8).activations < fp32.activations / 3


def test_train_refuses_before_loading(tmp_path, toy_data, tiny_dir, monkeypatch):
    raw = run_config(tmp_path, toy_data)
    raw["model"] = {"name_or_path": str(tiny_dir)}
    monkeypatch.setattr(memory, "available_bytes", lambda: 1e6)
    with pytest.raises(
        ConfigError, match=r"needs about 0\.\d GiB .* but 0\.0 GiB is available; no setting tried fits"
    ):
        train(from_dict(RunConfig, raw), progress=False)
    raw["train"]["check_memory"] = False
    raw["output_dir"] = str(tmp_path / "unchecked")
    assert train(from_dict(RunConfig, raw), progress=False).summary["status"] == "finished"
