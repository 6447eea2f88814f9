"""A quantized base (bitsandbytes NF4/FP4/int8): knots keep the chain W0 + sum s*B*A, the export is one
adapter for the full-precision base, and resume gives the same weights."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from conftest import SMALL, run_config
from peft import PeftModel
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from lorachain.chain.knot import extend, lora_config, lora_layers, tie_knot, unload
from lorachain.chain.sidepath import dequantized, merge_quantized
from lorachain.config import ChainConfig, ConfigError, LinkConfig, ModelConfig, RunConfig, from_dict
from lorachain.models import resolve_target_modules
from lorachain.training import train
from lorachain.training.quantization import is_quantized, quantized_base, require_bnb

X = torch.tensor([[2, 10, 11, 12, 13, 14, 15, 16], [2, 20, 21, 22, 23, 24, 25, 26]])


def wide_llama() -> LlamaForCausalLM:
    """A tiny Llama whose Linears are wide enough for 4-bit blocks of 64."""
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        **SMALL,
    )
    return LlamaForCausalLM(cfg).eval()


def qcfg(kind: str, **kw) -> ModelConfig:
    return ModelConfig(name_or_path="tiny", quantization=kind, **kw)


def logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=X).logits


def pretend_training(peft, seed: int, size: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(peft).values():
            for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
                p.copy_(torch.randn(p.shape, generator=g) * size)


def link(model, rank):
    chain = ChainConfig(links=[LinkConfig(rank=rank, alpha=2.0 * rank)], dropout=0.0)
    return lora_config(chain.links[0], chain, resolve_target_modules(model, None), False, "causal_lm")


def test_bad_quantization_settings_are_one_line(monkeypatch, tmp_path, toy_data):
    with pytest.raises(ConfigError, match=r"^model.quantization: expected one of .*'nf4'.* got 'nf3'$"):
        qcfg("nf3")
    raw = run_config(
        tmp_path, toy_data, model={"name_or_path": "x", "quantization": "nf4"}, export_merged=True
    )
    with pytest.raises(ConfigError, match="^export_merged: a quantized base"):
        from_dict(RunConfig, raw)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    with pytest.raises(
        ConfigError, match=r"^model.quantization: needs bitsandbytes.*pip install bitsandbytes$"
    ):
        require_bnb()


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
def test_every_linear_but_the_head_is_quantized(kind):
    model = quantized_base(wide_llama(), qcfg(kind))
    kinds = {type(m).__name__ for n, m in model.named_modules() if "proj" in n and "." in n}
    assert kinds == {"Linear8bitLt" if kind == "int8" else "Linear4bit"}
    assert type(model.lm_head) is torch.nn.Linear and is_quantized(model)
    q_bytes = (
        model.model.layers[0].mlp.up_proj.weight.numel()
        * model.model.layers[0].mlp.up_proj.weight.element_size()
    )
    assert q_bytes == 64 * 128 // (1 if kind == "int8" else 2)  # 1 byte or half a byte per weight


def side_chain(kind: str, mode: str, ranks=(4, 2), size: float = 0.3):
    """Two links with random factors on a quantized base, knotted with `mode`."""
    model = quantized_base(wide_llama(), qcfg(kind))
    names = [n for n, m in model.named_modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt")]
    w0 = {n: dequantized(model.get_submodule(n)) for n in names}
    knots, jumps = [], []
    for i, r in enumerate(ranks):
        peft = extend(model, link(model, r))
        pretend_training(peft, i, size)
        before = logits(peft)
        knots.append(
            tie_knot(peft, i, i, r, 2.0 * r, "test", None, lambda b, f, m: merge_quantized(b, f, m, mode))
        )
        model = unload(peft)
        jumps.append(float((logits(model) - before).abs().max()))
    return model, w0, knots, jumps


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
def test_a_side_path_knot_is_the_chains_definition(kind):
    model, w0, knots, jumps = side_chain(kind, "side")
    assert max(jumps) < 1e-4  # a knot changes nothing the model computes
    assert all(k.rounding == {"max_abs": 0.0, "rel_fro": 0.0} for k in knots)
    x = torch.randn(3, 64)
    for name, f in knots[0].factors.items():
        layer = model.get_submodule(name)
        torch.testing.assert_close(dequantized(layer), w0[name], rtol=0, atol=0)  # W0 never written
        delta = sum(k.factors[name].scale * k.factors[name].B @ k.factors[name].A for k in knots)
        with torch.no_grad():
            # y = Q(W0) x + sum s B A x; `forward` runs the quantized kernel alone (no hooks)
            torch.testing.assert_close(layer(x), layer.forward(x) + x @ delta.T, rtol=1e-5, atol=1e-6)
            if kind != "int8":  # (LLM.int8() quantizes the activations too)
                torch.testing.assert_close(layer.forward(x), x @ w0[name].T, rtol=1e-4, atol=1e-5)
        assert layer.chain_side.A.shape == (6, f.A.shape[1])  # stacked: rank 4 + 2


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_requantize_drifts_and_says_how_much(kind):
    # a short link's update: small beside the weights (|dW| ~ 5e-3 |W|), as after a few steps
    _, _, knots, jumps = side_chain(kind, "requantize", size=0.005)
    _, _, _, side_jumps = side_chain(kind, "side", size=0.005)
    for k in knots:  # most of the update is lost in the rounding
        assert k.rounding["rel_fro"] > 0.5 and k.rounding["max_abs"] > 0
    assert max(jumps) > 10 * max(side_jumps)


def run(tmp_path, toy_data, tokenizer, name, stops=(), **over):
    raw = run_config(tmp_path / name, toy_data, **over)
    raw["model"] = {"name_or_path": "tiny-llama", "quantization": "nf4", **raw.get("model_extra", {})}
    cfg = from_dict(RunConfig, raw)
    for stop in stops:
        assert train(cfg, wide_llama(), tokenizer, stop_after=stop, progress=False).summary["step"] == stop
    return train(cfg, wide_llama(), tokenizer, progress=False)


def test_a_quantized_chain_exports_one_adapter_and_resumes(tmp_path, toy_data, tokenizer):
    done = run(tmp_path, toy_data, tokenizer, "ref")
    s = done.summary
    assert s["quantization"] == "nf4" and s["chain_rank"] == 6 and s["knot_rounding"]["max_rel_fro"] == 0.0
    out = tmp_path / "ref" / "run"
    trained = logits(done.model)
    # the adapter on a fresh NF4 quantization of the same base: what was trained, exactly
    fresh = PeftModel.from_pretrained(quantized_base(wide_llama(), qcfg("nf4")), str(out / "adapter"))
    torch.testing.assert_close(logits(fresh), trained, rtol=1e-4, atol=1e-4)
    # on the fp32 base: within the quantization error of the base itself
    fp32 = logits(PeftModel.from_pretrained(wide_llama(), str(out / "adapter")))
    q_err = float((logits(wide_llama()) - logits(quantized_base(wide_llama(), qcfg("nf4")))).abs().max())
    assert 0 < float((fp32 - trained).abs().max()) <= 2 * q_err + 1e-4
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 6
    # killed mid-link 0 and mid-link 1 (after the knot): the same chain
    resumed = run(tmp_path, toy_data, tokenizer, "resumed", stops=(3, 8))
    a, b = load_file(out / "chain.safetensors"), load_file(tmp_path / "resumed" / "run" / "chain.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    torch.testing.assert_close(logits(resumed.model), trained, rtol=0, atol=1e-6)


def test_loading_quantized_equals_quantizing_in_memory(tmp_path):
    from lorachain.models import load_model

    wide_llama().save_pretrained(tmp_path / "m")
    cfg = ModelConfig(name_or_path=str(tmp_path / "m"), quantization="nf4")
    loaded = quantized_base(load_model(cfg), cfg)
    assert type(loaded.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    assert torch.equal(logits(loaded), logits(quantized_base(wide_llama(), qcfg("nf4"))))


def test_a_quantized_run_from_its_folder_with_checkpointing_and_packing(tmp_path, toy_data, tokenizer):
    """What `lorachain train` does: load the folder in NF4 as it loads, check memory, train through a
    knot; with checkpointing and packing, the same chain as without them."""
    folder = tmp_path / "wide"
    wide_llama().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    runs = []
    for on in (False, True):
        raw = run_config(tmp_path / str(on), toy_data, data__packing=on, train__gradient_checkpointing=on)
        raw["model"] = {"name_or_path": str(folder), "quantization": "nf4"}
        done = train(from_dict(RunConfig, raw), progress=False)
        assert done.summary["status"] == "finished" and done.summary["chain_rank"] == 6
        assert is_quantized(done.model)
        runs.append((done, load_file(tmp_path / str(on) / "run" / "chain.safetensors")))
    for key in runs[0][1]:
        torch.testing.assert_close(runs[1][1][key], runs[0][1][key], rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(logits(runs[1][0].model), logits(runs[0][0].model), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize(
    ("kind", "compute", "autocast", "targets", "emb", "head"),
    [
        ("nf4", "bfloat16", torch.bfloat16, (), torch.bfloat16, torch.bfloat16),
        ("fp4", "float16", torch.float16, (), torch.float16, torch.float16),
        ("nf4", "bfloat16", None, (), torch.bfloat16, torch.float32),  # fp32 training: an fp32 head
        ("nf4", "float32", torch.bfloat16, (), torch.float32, torch.float32),
        ("int8", "bfloat16", torch.bfloat16, (), torch.float32, torch.float32),  # (no compute dtype)
        ("nf4", "bfloat16", torch.bfloat16, ("q_proj", "lm_head"), torch.bfloat16, torch.float32),
    ],
)
def test_a_4bit_base_holds_its_embeddings_and_head_in_the_compute_dtype(
    kind, compute, autocast, targets, emb, head
):
    cfg = qcfg(kind, compute_dtype=compute)
    model = quantized_base(wide_llama().to(torch.bfloat16), cfg, targets, autocast)
    assert model.lm_head.weight is not model.model.embed_tokens.weight  # (untied: both are checked)
    assert model.model.embed_tokens.weight.dtype == emb and model.lm_head.weight.dtype == head
    norms = (model.model.norm.weight, model.model.layers[0].input_layernorm.weight)
    assert {w.dtype for w in norms} == {torch.float32}
    assert not any(p.requires_grad for p in model.parameters())


def test_a_chain_on_bf16_embeddings_and_head_stays_exact(tmp_path, toy_data, tokenizer):
    """NF4 with compute_dtype bfloat16: the embeddings and head are bf16, the knots still add nothing
    to the base (side path, no rounding), and the adapter on a fresh quantization is what trained."""
    raw = run_config(tmp_path, toy_data, train__precision="bf16")
    raw["model"] = {"name_or_path": "tiny-llama", "quantization": "nf4", "compute_dtype": "bfloat16"}
    done = train(from_dict(RunConfig, raw), wide_llama(), tokenizer, progress=False)
    s = done.summary
    assert s["chain_rank"] == 6 and s["knot_rounding"]["max_rel_fro"] == 0.0
    m = done.model
    assert m.get_input_embeddings().weight.dtype == m.get_output_embeddings().weight.dtype == torch.bfloat16
    base = quantized_base(wide_llama(), qcfg("nf4", compute_dtype="bfloat16"), (), torch.bfloat16)
    fresh = PeftModel.from_pretrained(base, str(tmp_path / "run" / "adapter"))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 logits: equal within a bf16 ulp or two
        torch.testing.assert_close(logits(fresh), logits(done.model), rtol=0, atol=8e-3)


@pytest.mark.parametrize(("kind", "compute"), [("nf4", "bfloat16"), ("fp4", "float16"), ("nf4", "float32")])
def test_a_4bit_backward_dequantizes_in_the_compute_dtype_with_the_same_gradients(kind, compute):
    """bitsandbytes' backward dequantizes to the weight's quant_state dtype, then casts to the gradient's
    (the compute dtype): held in the compute dtype, no fp32 copy, the same gradients; the exact fp32
    weight (`dequantized`) and a requantized weight are unchanged by it."""
    import bitsandbytes.functional as bf

    from lorachain.chain.sidepath import requantize

    layer = quantized_base(wide_llama(), qcfg(kind, compute_dtype=compute)).model.layers[0].mlp.up_proj
    want = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[compute]
    assert layer.weight.quant_state.dtype == want
    w0 = dequantized(layer)
    x = torch.randn(5, 64, requires_grad=True)
    grads = []
    for dtype in (want, torch.float32):  # the compute dtype, then bitsandbytes' own fp32
        layer.weight.quant_state.dtype = dtype
        layer(x).square().sum().backward()
        grads.append(x.grad)
        x.grad = None
    assert torch.equal(grads[0], grads[1]) and grads[0].abs().sum() > 0
    assert w0.dtype == torch.float32 and torch.equal(
        w0, bf.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    )
    layer.weight.quant_state.dtype = want
    requantize(layer, w0 + 0.01)
    assert layer.weight.quant_state.dtype == want and dequantized(layer).dtype == torch.float32
