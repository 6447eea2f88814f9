"""Invariants of tying knots and extending the chain, over model families and chain shapes."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from lorachain.chain.knot import (
    KnotError,
    apply_factors,
    check_lora_bias,
    extend,
    lora_config,
    lora_layers,
    tie_knot,
    unload,
)
from lorachain.config import ChainConfig, ConfigError, LinkConfig, OptimConfig
from lorachain.models import resolve_target_modules, uses_conv1d
from lorachain.training.loop import make_optimizer, trainable

FAMILIES = ["llama", "gpt2", "opt", "bert", "qwen2", "gemma3_text", "bloom", "gpt_neox"]
SHAPES = {"one": [8], "three": [8, 8, 8], "step-down": [8, 4], "step-up": [2, 6]}
X = torch.tensor([[2, 10, 11, 12, 13, 14, 15, 16], [2, 20, 21, 22, 23, 24, 25, 26]])


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=X).logits


def link_config(model, rank: int, bias: str = "none"):
    targets = resolve_target_modules(model, None)
    chain = ChainConfig(links=[LinkConfig(rank=rank, alpha=2.0 * rank)], dropout=0.0, bias=bias)
    task = "classification" if "Sequence" in type(model).__name__ else "causal_lm"
    return lora_config(chain.links[0], chain, targets, uses_conv1d(model, targets), task)


def pretend_training(peft, seed: int) -> None:
    """Give every LoRA factor random non-zero values, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(peft).values():
            for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("family", FAMILIES)
def test_chain_invariants(family: str, shape: str) -> None:
    model = tiny_model(family)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    knots = []
    for i, rank in enumerate(SHAPES[shape]):
        before_extend = logits(model)
        peft = extend(model, link_config(model, rank))
        eval_mode = peft.eval()
        # B = 0: a fresh link changes nothing
        torch.testing.assert_close(logits(eval_mode), before_extend, rtol=0, atol=1e-6)
        # trainable parameters follow the rank schedule: r * (in + out) per LoRA layer (+ head)
        lora_params = sum(
            rank * (layer.in_features + layer.out_features) for layer in lora_layers(peft).values()
        )
        head = sum(p.numel() for n, p in peft.named_parameters() if p.requires_grad and "lora_" not in n)
        assert sum(p.numel() for p in trainable(peft)) == lora_params + head
        opt = make_optimizer(trainable(peft), OptimConfig())
        assert opt.state_dict()["state"] == {}  # optimizer state reset for the new link
        pretend_training(peft, seed=i)
        before_knot = logits(peft)
        knots.append(tie_knot(peft, i, i, rank, 2.0 * rank, "test"))
        model = unload(peft)
        torch.testing.assert_close(logits(model), before_knot, rtol=1e-4, atol=1e-5)
    # base weights at the end equal W0 + sum of recorded scale * B @ A
    for name, _ in knots[0].factors.items():
        delta = sum(k.factors[name].scale * (k.factors[name].B @ k.factors[name].A) for k in knots)
        if knots[0].factors[name].fan_in_fan_out:
            delta = delta.T
        weight = model.get_submodule(name).weight
        torch.testing.assert_close(weight, w0[f"{name}.weight"] + delta, rtol=1e-5, atol=1e-6)


def test_knot_with_lora_bias_merges_bias() -> None:
    model = tiny_model("opt")
    peft = extend(model, link_config(model, 4, bias="lora_only"))
    pretend_training(peft, 0)
    with torch.no_grad():
        for layer in lora_layers(peft).values():
            layer.lora_B["default"].bias.normal_()
    before = logits(peft.eval())
    knot = tie_knot(peft, 0, 0, 4, 8.0, "test")
    model = unload(peft)
    assert all(f.bias is not None for f in knot.factors.values())
    torch.testing.assert_close(logits(model), before, rtol=1e-4, atol=1e-5)


def test_lora_bias_needs_biased_targets() -> None:
    model = tiny_model("llama")
    with pytest.raises(ConfigError, match="q_proj in LlamaForCausalLM has none"):
        check_lora_bias(model, ["q_proj", "v_proj"])


def test_non_finite_knot_is_refused_and_merges_nothing() -> None:
    model = tiny_model("llama")
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft = extend(model, link_config(model, 4))
    pretend_training(peft, 0)
    last = list(lora_layers(peft).values())[-1]
    with torch.no_grad():
        last.lora_B["default"].weight[0, 0] = float("inf")
    with pytest.raises(KnotError, match="non-finite"):
        tie_knot(peft, 0, 0, 4, 8.0, "test")
    base = unload(peft)
    for n, p in base.named_parameters():
        assert torch.equal(p, w0[n]), n


def test_apply_factors_reproduces_knot() -> None:
    model, copy = tiny_model("gpt2"), tiny_model("gpt2")
    peft = extend(model, link_config(model, 4))
    pretend_training(peft, 3)
    knot = tie_knot(peft, 0, 0, 4, 8.0, "test")
    merged = unload(peft)
    apply_factors(copy, knot.factors)
    for (n, p), (_, q) in zip(merged.named_parameters(), copy.named_parameters(), strict=True):
        assert torch.equal(p, q), n


def test_unknown_target_lists_linear_layers() -> None:
    with pytest.raises(ConfigError, match=r"qkv not found in llama; its linear layers are: .*q_proj"):
        resolve_target_modules(tiny_model("llama"), ["qkv"])
