"""Gradient checkpointing: the same LoRA gradients as without it, through knots, and a clear refusal."""

from __future__ import annotations

import pytest
import torch
from conftest import run_config, tiny_model
from safetensors.torch import load_file

from lorachain.chain.knot import extend, lora_config, lora_layers
from lorachain.config import ChainConfig, ConfigError, LinkConfig, RunConfig, from_dict
from lorachain.models import resolve_target_modules
from lorachain.training import train
from lorachain.training.checkpointing import enable_checkpointing
from lorachain.training.step import summed_loss

IDS = torch.tensor([[2, 10, 11, 12, 13, 14, 15, 16], [2, 20, 21, 22, 23, 24, 25, 0]])
BATCH = {"input_ids": IDS, "attention_mask": (IDS != 0).long(), "labels": torch.where(IDS != 0, IDS, -100)}


def lora_grads(checkpointing: bool) -> dict[str, torch.Tensor]:
    model = tiny_model("llama")
    if checkpointing:
        enable_checkpointing(model)
        enable_checkpointing(model)  # idempotent
    chain = ChainConfig(links=[LinkConfig(rank=4, alpha=8)], dropout=0.0)
    peft = extend(model, lora_config(chain.links[0], chain, resolve_target_modules(model, None), False, "x"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B != 0, so that A gets a gradient too
        for layer in lora_layers(peft).values():
            b = layer.lora_B["default"].weight
            b.copy_(torch.randn(b.shape, generator=g))
    peft.train()
    summed_loss(peft, BATCH, False).backward()
    return {n: p.grad.clone() for n, p in peft.named_parameters() if p.requires_grad}


def test_checkpointing_keeps_the_lora_gradients():
    plain, ckpt = lora_grads(False), lora_grads(True)
    assert plain.keys() == ckpt.keys() and len(plain) == 2 * 2 * 2  # q, v x A, B x 2 layers
    for name in plain:
        assert ckpt[name].abs().sum() > 0, name
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_checkpointed_chain_through_a_knot_trains_the_same_weights(
    tmp_path, toy_data, tokenizer, precision
):
    chains = []
    for ckpt in (False, True):
        raw = run_config(tmp_path / str(ckpt), toy_data, train__gradient_checkpointing=ckpt)
        raw["train"]["precision"] = precision
        cfg = from_dict(RunConfig, raw)
        model = tiny_model("llama")
        summary = train(cfg, model, tokenizer, progress=False).summary
        assert len(summary["links"]) == 2 and summary["chain_rank"] == 6
        assert model.is_gradient_checkpointing == ckpt
        chains.append(load_file(tmp_path / str(ckpt) / "run" / "chain.safetensors"))
    assert chains[0].keys() == chains[1].keys()
    for key in chains[0]:
        torch.testing.assert_close(chains[1][key], chains[0][key], rtol=1e-4, atol=1e-6)


def test_a_model_without_checkpointing_is_refused_in_one_line(tmp_path, toy_data, tokenizer):
    from transformers import JetMoeConfig, JetMoeForCausalLM

    model = JetMoeForCausalLM(
        JetMoeConfig(hidden_size=32, num_hidden_layers=1, kv_channels=8, num_key_value_heads=2, vocab_size=64)
    )
    cfg = from_dict(RunConfig, run_config(tmp_path, toy_data, train__gradient_checkpointing=True))
    with pytest.raises(ConfigError, match=r"^train.gradient_checkpointing: JetMoeForCausalLM does not") as e:
        train(cfg, model, tokenizer, progress=False)
    assert "\n" not in str(e.value)
