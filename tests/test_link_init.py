"""Link kinds (chain/init.py): every start keeps the chain exact, the function is unchanged when a
link starts, and a `gradient` link's first step moves along the gradient's top singular direction."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import run_config, tiny_model
from peft import LoraConfig, PeftModel, get_peft_model

from lorachain.chain.export import load_chain
from lorachain.chain.init import learned, start_link
from lorachain.chain.knot import apply_factors, extend, layer_factors, lora_layers, total_delta
from lorachain.config import ConfigError, LinkConfig, RunConfig, from_dict
from lorachain.data import collate, load_examples, micro_batches
from lorachain.training.gradients import check_fits, layer_gradients
from lorachain.training.loop import train
from lorachain.training.precision import FP32
from lorachain.training.step import loss_units, summed_loss

X = torch.tensor([[2, 5, 9, 14, 22, 7, 30, 31]])


def _cfg(tmp_path, toy_data, name, **over) -> RunConfig:
    over.setdefault("chain__links", [{"rank": 2, "alpha": 4}, {"rank": 2, "alpha": 4}])
    raw = run_config(tmp_path, toy_data, "llama", output_dir=str(tmp_path / name), **over)
    raw["train"].update(max_steps=6, batch_size=8, save_every=100)
    return from_dict(RunConfig, raw)


@pytest.mark.parametrize(
    "chain",
    [
        {"init": "gaussian"},
        {"init": "kaiming"},
        {"init": "pissa"},
        {"init": "olora"},
        {"init": "gradient", "init_batches": 2},
        {"init": "gaussian", "use_rslora": True},
    ],
)
def test_every_link_kind_keeps_the_chain_exact(tmp_path, toy_data, tokenizer, chain):
    """The trained model equals the base plus what each knot recorded, and the one-adapter export."""
    links = [{"rank": 2, "alpha": 4}, {"rank": 2, "alpha": 4, "init": "olora"}]
    cfg = _cfg(
        tmp_path,
        toy_data,
        "run",
        chain__links=links,
        chain__dropout=0.0,
        **{f"chain__{k}": v for k, v in chain.items()},
    )
    result = train(cfg, tiny_model("llama"), tokenizer, progress=False)
    knots, _, _ = load_chain(tmp_path / "run" / "chain.safetensors")
    moving = chain["init"] in ("pissa", "olora", "gradient")
    assert [k.rank for k in knots] == [4 if moving else 2, 4]  # the olora link learned rank 2r
    rebuilt = tiny_model("llama")
    apply_factors(rebuilt, total_delta(knots))
    adapter = PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path / "run" / "adapter")).eval()
    with torch.no_grad():
        trained = result.model.eval()(input_ids=X).logits
        assert (trained - rebuilt(input_ids=X).logits).abs().max() < 1e-5
        assert (trained - adapter(input_ids=X).logits).abs().max() < 1e-5
        assert (trained - tiny_model("llama")(input_ids=X).logits).abs().max() > 1e-3  # it trained


@pytest.mark.parametrize("kind", ["pissa", "olora", "gradient"])
def test_the_function_is_unchanged_when_a_link_starts(kind):
    model = tiny_model("llama")
    with torch.no_grad():
        before = model(input_ids=X).logits
    grads = None
    if kind == "gradient":
        w = {
            n: torch.randn_like(m.weight)
            for n, m in model.named_modules()
            if n.endswith(("q_proj", "v_proj"))
        }
        grads = w
    peft = extend(
        model,
        LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights="gaussian"),
    )
    start = start_link(peft, kind, {}, apply_factors, grads)
    assert start and all(f.B.abs().max() > 0 for f in start.values())  # away from zero
    with torch.no_grad():
        assert (peft(input_ids=X).logits - before).abs().max() < 1e-5


@pytest.mark.parametrize("kind", ["pissa", "olora"])
def test_pissa_and_olora_starts_match_peft(kind):
    ours = extend(tiny_model("llama"), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    start_link(ours, kind, {}, apply_factors)
    theirs = get_peft_model(
        tiny_model("llama"), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=kind)
    )
    for (name, a), (_, b) in zip(lora_layers(ours).items(), lora_layers(theirs).items(), strict=True):
        fa, fb = layer_factors(a), layer_factors(b)
        assert (fa.B @ fa.A - fb.B @ fb.A).abs().max() < 1e-5, name
        assert (a.base_layer.weight - b.base_layer.weight).abs().max() < 1e-5, name


def test_a_gradient_link_first_step_moves_along_the_top_singular_direction(tmp_path, toy_data, tokenizer):
    cfg = _cfg(tmp_path, toy_data, "g", chain__init="gradient", chain__init_batches=1)
    cfg.train.grad_accum = 1
    model = tiny_model("llama")
    examples = load_examples(cfg.data.train, cfg.data, tokenizer, False)
    grads = layer_gradients(model, ["q_proj", "v_proj"], examples, cfg, 0, FP32, tokenizer.pad_token_id)
    peft = extend(
        model,
        LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights="gaussian"),
    )
    start = start_link(peft, "gradient", {}, apply_factors, grads)
    opt = torch.optim.SGD([p for p in peft.parameters() if p.requires_grad], lr=1e-3)
    (chunk,) = micro_batches(examples, 0, cfg.train.batch_size, 1, cfg.train.seed)  # the batches G came from
    batch = collate(chunk, tokenizer.pad_token_id, False)
    units = sum(loss_units(e, False) for e in chunk)
    (summed_loss(peft, batch, False) / units).backward()
    opt.step()
    after = {n: layer_factors(layer) for n, layer in lora_layers(peft).items()}
    for name, moved in learned(after, start).items():
        delta = moved.scale * moved.B @ moved.A  # what the first step did to the weight
        U, _, Vh = torch.linalg.svd(delta)
        Ug, _, Vhg = torch.linalg.svd(-grads[name])
        assert abs(float(U[:, 0] @ Ug[:, 0])) > 0.99 and abs(float(Vh[0] @ Vhg[0])) > 0.99, name
        assert float(U[:, 0] @ delta @ Vh[0]) * float(Ug[:, 0] @ -grads[name] @ Vhg[0]) > 0  # downhill


def test_layer_gradients_take_only_the_target_weights_gradients(tmp_path, toy_data, tokenizer):
    """A base with every parameter trainable (the first link's) gets no other gradient computed or
    left behind; its flags and any `.grad` it had are as before, and G is the frozen base's, bit for bit."""
    cfg = _cfg(tmp_path, toy_data, "g", chain__init="gradient", chain__init_batches=2)
    examples = load_examples(cfg.data.train, cfg.data, tokenizer, False)
    model, frozen = tiny_model("llama"), tiny_model("llama").requires_grad_(False)
    embed = model.get_input_embeddings().weight
    kept = torch.ones_like(embed)
    embed.grad = kept
    grads = layer_gradients(model, ["q_proj", "v_proj"], examples, cfg, 0, FP32, tokenizer.pad_token_id)
    same = layer_gradients(frozen, ["q_proj", "v_proj"], examples, cfg, 0, FP32, tokenizer.pad_token_id)
    assert sorted(grads) == [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]
    assert all(torch.equal(grads[n], same[n]) and grads[n].abs().sum() > 0 for n in grads)
    assert all(p.requires_grad for p in model.parameters())
    assert not any(p.requires_grad for p in frozen.parameters())
    assert embed.grad is kept and all(p.grad is None for p in model.parameters() if p is not embed)


def test_layer_gradients_of_bf16_weights_are_summed_in_fp32(tmp_path, toy_data, tokenizer):
    """Over several batches the micro-batch gradients of bf16 weights add up in fp32: G is the fp32
    sum of each batch's own bf16 gradient, not a sum rounded to bf16 after every batch."""
    cfg = _cfg(tmp_path, toy_data, "g", chain__init="gradient", chain__init_batches=4)
    cfg.train.grad_accum = 1
    examples = load_examples(cfg.data.train, cfg.data, tokenizer, False)
    model = tiny_model("llama").to(torch.bfloat16)
    grads = layer_gradients(model, ["q_proj", "v_proj"], examples, cfg, 0, FP32, tokenizer.pad_token_id)
    chunks = [
        c for k in range(4) for c in micro_batches(examples, k, cfg.train.batch_size, 1, cfg.train.seed)
    ]
    units = sum(loss_units(e, False) for c in chunks for e in c)
    want, rounded = {}, {}
    for chunk in chunks:
        model.zero_grad()
        (summed_loss(model, collate(chunk, tokenizer.pad_token_id, False), False) / units).backward()
        for n in grads:
            g = model.get_submodule(n).weight.grad
            want[n] = want.get(n, 0) + g.float()
            rounded[n] = rounded.get(n, 0) + g  # what bf16 accumulation gives
    assert all(grads[n].dtype == torch.float32 for n in grads)
    assert max(float((grads[n] - want[n]).abs().max()) for n in grads) < 1e-6
    assert max(float((want[n] - rounded[n].float()).abs().max()) for n in grads) > 0  # it matters here


def test_link_kinds_refuse_what_they_cannot_do(tmp_path, toy_data):
    with pytest.raises(ConfigError, match=r"^chain\.init: .*full-precision base; model.quantization nf4"):
        _cfg(tmp_path, toy_data, "q", chain__init="pissa", model__quantization="nf4")
    links = [{"rank": 2}, {"rank": 2, "init": "gradient"}]
    with pytest.raises(ConfigError, match=r"^chain\.links\.1\.init: "):
        _cfg(tmp_path, toy_data, "q", chain__links=links, model__quantization="nf4")
    with pytest.raises(ConfigError, match="chain.links: init must be one of"):
        LinkConfig(init="svd")
    with pytest.raises(ConfigError, match=r"chain\.init: gradient needs .* GiB"):
        check_fits(tiny_model("llama"), ["q_proj", "v_proj"], available=1000.0)
    assert (
        copy.deepcopy(_cfg(tmp_path, toy_data, "ok", chain__init="gradient")).chain.link_init(1) == "gradient"
    )


def test_loraplus_gives_b_factors_a_faster_lr(tmp_path, toy_data, tokenizer):
    from lorachain.training.loop import Trainer

    cfg = _cfg(tmp_path, toy_data, "lp", optim__loraplus_lr_ratio=16.0)
    trainer = Trainer(cfg, tiny_model("llama"), tokenizer, progress=False)
    trainer.run(stop_after=1)
    slow, fast = trainer.opt.param_groups
    assert fast["lr"] == pytest.approx(16 * slow["lr"]) and slow["lr"] > 0
    names = {id(p): n for n, p in trainer.peft.named_parameters()}
    assert all(".lora_B." in names[id(p)] for p in fast["params"])
    assert all(".lora_A." in names[id(p)] for p in slow["params"])


def test_a_dora_chain_stays_exact_and_exports_merged(tmp_path, toy_data, tokenizer):
    from transformers import AutoModelForCausalLM

    from lorachain.export.run import export_run

    cfg = _cfg(tmp_path, toy_data, "dora", chain__use_dora=True, chain__dropout=0.0)
    result = train(cfg, tiny_model("llama"), tokenizer, progress=False)
    run = tmp_path / "dora"
    knots, _, _ = load_chain(run / "chain.safetensors")
    assert all(f.magnitude is not None for k in knots for f in k.factors.values())
    assert not (run / "adapter").exists() and (run / "merged" / "config.json").is_file()
    rebuilt = tiny_model("llama")
    for knot in knots:  # DoRA knots depend on the weight they rescale: replayed in order
        apply_factors(rebuilt, knot.factors)
    merged = AutoModelForCausalLM.from_pretrained(run / "merged").eval()
    with torch.no_grad():
        trained = result.model.eval()(input_ids=X).logits
        assert (trained - rebuilt(input_ids=X).logits).abs().max() < 1e-5
        assert (trained - merged(input_ids=X).logits).abs().max() < 1e-5
        assert (trained - tiny_model("llama")(input_ids=X).logits).abs().max() > 1e-3
    with pytest.raises(ConfigError, match="DoRA chain exports as a merged model only"):
        export_run(run)
    with pytest.raises(ConfigError, match="chain.use_dora: .*quantized base"):
        _cfg(tmp_path, toy_data, "q", chain__use_dora=True, model__quantization="nf4")
    with pytest.raises(ConfigError, match="chain.use_dora: DoRA links start from zero"):
        _cfg(tmp_path, toy_data, "q", chain__use_dora=True, chain__init="pissa")


def test_a_dora_knot_gives_the_function_peft_computed():
    from lorachain.chain.knot import tie_knot, unload

    torch.manual_seed(1)
    peft = extend(
        tiny_model("llama"), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], use_dora=True)
    )
    with torch.no_grad():
        for layer in lora_layers(peft).values():  # a trained-looking link: B and the magnitude moved
            layer.lora_B["default"].weight.normal_(std=0.3)
            layer.lora_magnitude_vector["default"].weight.mul_(1.2)
        before = peft.eval()(input_ids=X).logits
    knot = tie_knot(peft, 0, 5, 2, 4.0, "test")
    with torch.no_grad():
        after = unload(peft)(input_ids=X).logits
    assert (after - before).abs().max() < 1e-5 and (
        before - tiny_model("llama")(input_ids=X).logits
    ).abs().max() > 1e-2
    assert all(f.magnitude is not None for f in knot.factors.values())
