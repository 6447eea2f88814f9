"""Mixed precision: autocast semantics, fp32 LoRA state, exact knots, rounding records, resume."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import run_config, tiny_model
from peft import PeftModel

from lorachain.chain.knot import apply_factors, extend, lora_config, tie_knot
from lorachain.config import ConfigError, LinkConfig, RunConfig, from_dict
from lorachain.training.loop import train
from lorachain.training.precision import Precision, compute_copies, resolve, restore_masters

X = torch.tensor([[2, 4, 10, 11, 12, 13, 5, 6, 5], [2, 4, 20, 21, 22, 23, 5, 6, 5]])


def cfg_for(tmp_path, toy_data, name, precision, **over) -> RunConfig:
    over.setdefault("chain__links", [{"rank": 4, "alpha": 8}, {"rank": 2, "alpha": 4}])
    raw = run_config(tmp_path, toy_data, "llama", output_dir=str(tmp_path / name), **over)
    raw["train"]["precision"] = precision
    return from_dict(RunConfig, raw)


def test_auto_resolves_by_device_capability(monkeypatch):
    import lorachain.training.precision as p

    monkeypatch.setattr(p, "cpu_flags", lambda: {"avx2", "avx512_bf16"})
    assert resolve("auto", torch.device("cpu")).name == "bf16"
    monkeypatch.setattr(p, "cpu_flags", lambda: {"avx2", "avx512f"})
    assert resolve("auto", torch.device("cpu")).name == "fp32"
    assert resolve("fp16", torch.device("cpu")).scaler() is not None
    assert resolve("bf16", torch.device("cpu")).scaler() is None


def test_bad_precision_names_the_field(tmp_path, toy_data):
    with pytest.raises(ConfigError, match="train.precision"):
        cfg_for(tmp_path, toy_data, "x", "int8")


def test_compute_copies_give_what_autocast_computes():
    """Frozen weights held in bf16 give bit-identical logits to autocast over the fp32 weights."""
    model = tiny_model("llama").eval()
    prec = Precision("bf16")
    with torch.no_grad(), prec.autocast():
        ref = model(input_ids=X).logits
    copies = copy.deepcopy(model)
    masters = compute_copies(copies, prec)
    assert masters and all(w.dtype == torch.float32 for w in masters.values())
    assert copies.get_submodule(next(iter(masters))).weight.dtype == torch.bfloat16
    assert copies.get_input_embeddings().weight.dtype == torch.float32  # autocast leaves lookups alone
    with torch.no_grad(), prec.autocast():
        assert torch.equal(copies(input_ids=X).logits, ref)
    restore_masters(copies, masters)
    for (n, p), (_, q) in zip(model.named_parameters(), copies.named_parameters(), strict=True):
        assert torch.equal(p, q), n


def _knot_on(model, masters=None):
    torch.manual_seed(0)
    cfg = lora_config(
        LinkConfig(rank=4, alpha=8), from_dict_chain(), ["q_proj", "v_proj"], False, "causal_lm"
    )
    peft = extend(model, cfg, gaussian=True)
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    before = {
        n: m.weight.detach().clone() for n, m in peft.base_model.model.named_modules() if n.endswith("_proj")
    }
    return peft, before, tie_knot(peft, 0, 5, 4, 8.0, "test", masters)


def from_dict_chain():
    from lorachain.config import ChainConfig

    return ChainConfig(dropout=0.0)


def test_knot_on_bf16_base_records_its_rounding():
    """What the knot lost by storing W + sBA in bf16, checked against a direct computation."""
    model = tiny_model("llama").to(torch.bfloat16)
    peft, before, knot = _knot_on(model)
    lost_sq, delta_sq, max_abs = 0.0, 0.0, 0.0
    for name, f in knot.factors.items():
        exact = before[name].float() + f.scale * (f.B @ f.A)
        stored = peft.base_model.model.get_submodule(name).base_layer.weight
        assert stored.dtype == torch.bfloat16
        assert torch.equal(stored, exact.to(torch.bfloat16))
        lost = exact - stored.float()
        lost_sq += float(lost.double().square().sum())
        delta_sq += float((exact - before[name].float()).double().square().sum())
        max_abs = max(max_abs, float(lost.abs().max()))
    assert knot.rounding["max_abs"] == pytest.approx(max_abs, rel=1e-6)
    assert knot.rounding["rel_fro"] == pytest.approx((lost_sq / delta_sq) ** 0.5, rel=1e-6)
    assert 0 < knot.rounding["rel_fro"] < 1


def test_knot_with_fp32_masters_is_exact():
    model = tiny_model("llama")
    reference = copy.deepcopy(model)
    masters = compute_copies(model, Precision("bf16"))
    peft, _, knot = _knot_on(model, masters)
    assert knot.rounding == {"max_abs": 0.0, "rel_fro": 0.0}
    apply_factors(reference, knot.factors)
    base = peft.unload()
    restore_masters(base, masters)
    for (n, p), (_, q) in zip(reference.named_parameters(), base.named_parameters(), strict=True):
        assert torch.equal(p, q), n


@pytest.mark.parametrize(
    ("precision", "base"), [("bf16", "float32"), ("fp16", "float32"), ("bf16", "bfloat16")]
)
def test_resume_is_bit_exact_in_every_precision(tmp_path, toy_data, tokenizer, precision, base):
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[base]

    def run(name, stops=()):
        cfg = cfg_for(tmp_path, toy_data, name, precision, model__dtype=base)
        for stop in stops:
            r = train(cfg, tiny_model("llama").to(dtype), tokenizer, stop_after=stop, progress=False)
            assert r.summary["status"] == "interrupted"
        return train(cfg, tiny_model("llama").to(dtype), tokenizer, progress=False)

    ref, done = run("ref"), run("resumed", stops=(4, 7))
    assert ref.summary["precision"] == precision
    for (n, p), (_, q) in zip(ref.model.named_parameters(), done.model.named_parameters(), strict=True):
        assert torch.equal(p, q), n
    assert ref.summary["links"][-1]["final_loss"] == done.summary["links"][-1]["final_loss"]
    rounding = ref.summary["knot_rounding"]
    assert (rounding["max_abs"] > 0) == (base == "bfloat16")  # fp32 masters make knots exact


def test_mixed_precision_keeps_lora_state_fp32_and_export_exact(tmp_path, toy_data, tokenizer):
    cfg = cfg_for(tmp_path, toy_data, "bf16", "bf16")
    res = train(cfg, tiny_model("llama"), tokenizer, progress=False)
    assert all(p.dtype == torch.float32 for p in res.model.parameters())  # fp32 weights restored
    ck_losses = [
        json.loads(x)["loss"] for x in (tmp_path / "bf16" / "metrics.jsonl").read_text().splitlines()
    ]
    assert all(loss > 0 for loss in ck_losses)
    fp32 = train(cfg_for(tmp_path, toy_data, "fp32", "fp32"), tiny_model("llama"), tokenizer, progress=False)
    a, b = res.summary["final_eval"]["eval_loss"], fp32.summary["final_eval"]["eval_loss"]
    assert a == pytest.approx(b, rel=0.05)  # the same training, to bf16's precision
    # the exported adapter on the original fp32 base is the trained model, in fp32
    loaded = PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path / "bf16" / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=X).logits, res.model.eval()(input_ids=X).logits)


def test_lora_factors_and_optimizer_state_stay_fp32_on_a_bf16_base(tmp_path, toy_data, tokenizer):
    from lorachain.training.loop import Trainer

    cfg = cfg_for(tmp_path, toy_data, "t", "bf16", model__dtype="bfloat16")
    trainer = Trainer(cfg, tiny_model("llama").to(torch.bfloat16), tokenizer, progress=False)
    trainer.run(stop_after=2)
    lora = {n: p for n, p in trainer.peft.named_parameters() if p.requires_grad}
    assert lora and all(p.dtype == torch.float32 for p in lora.values())
    states = [s for s in trainer.opt.state.values()]
    assert states and all(s["exp_avg"].dtype == torch.float32 for s in states)


def test_attention_policy_picks_eager_for_short_mixed_precision_on_cpu():
    from lorachain.training.precision import EAGER_MAX_LENGTH, attention

    bf16, fp32 = Precision("bf16"), Precision("fp32")
    assert attention("auto", bf16, 64) == "eager"
    assert attention("auto", bf16, EAGER_MAX_LENGTH + 1) is None  # long sequences keep SDPA
    assert attention("auto", fp32, 64) is None
    assert attention("auto", Precision("bf16", "cuda"), 64) is None
    assert attention("sdpa", bf16, 64) == "sdpa"  # an explicit choice wins


def test_training_uses_and_records_the_attention_kernel(tmp_path, toy_data, tokenizer):
    cfg = cfg_for(tmp_path, toy_data, "bf16", "bf16", train__max_steps=2)
    res = train(cfg, tiny_model("llama"), tokenizer, progress=False)
    assert res.summary["attention"] == res.model.config._attn_implementation == "eager"
    cfg = cfg_for(tmp_path, toy_data, "fp32", "fp32", train__max_steps=2)
    cfg.model.attn_implementation = "sdpa"
    assert train(cfg, tiny_model("llama"), tokenizer, progress=False).summary["attention"] == "sdpa"


def test_unknown_attention_kernel_names_the_field(tmp_path, toy_data, tokenizer):
    cfg = cfg_for(tmp_path, toy_data, "bad", "fp32", train__max_steps=2)
    cfg.model.attn_implementation = "no_such_kernel"
    with pytest.raises(ConfigError, match="model.attn_implementation"):
        train(cfg, tiny_model("llama"), tokenizer, progress=False)
