"""ChainCallback and the link kinds of `lorachain train`: rsLoRA chains are exact (knots at
alpha/sqrt(r), the export equal to the live chain), a link's own init is drawn, and what a link drawn
in place cannot be (moving starts, DoRA, a PEFT model of another kind) is refused in one line."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_tokenizer, tiny_model
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import Trainer, TrainingArguments

from lorachain.chain.export import load_chain
from lorachain.chain.knot import ADAPTER, extend, lora_config, lora_layers
from lorachain.config import ChainConfig, ConfigError, DataConfig, from_dict
from lorachain.data import collate, load_examples
from lorachain.integrations import ChainCallback

LINKS = [{"rank": 4, "alpha": 8}, {"rank": 2, "alpha": 4}]
TARGETS = ["q_proj", "v_proj"]


def chain_cfg(**over) -> ChainConfig:
    return from_dict(ChainConfig, {"links": LINKS, "dropout": 0.0} | over, "chain")


@pytest.fixture
def examples(toy_data):
    words = {"0": "negative", "1": "positive"}
    data = DataConfig(train=toy_data[0], prompt="Review : {text} Sentiment :", label_words=words)
    return load_examples(toy_data[0], data, make_tokenizer(), False)


def trainer(tmp_path, examples, model, callbacks, optimizer=None) -> Trainer:
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=12,
        per_device_train_batch_size=8,
        learning_rate=0.01,
        optim="adamw_torch",
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        remove_unused_columns=False,
        seed=0,
    )
    pad = make_tokenizer().pad_token_id
    collator = lambda b: collate(b, pad, False)  # noqa: E731
    return Trainer(
        model,
        args=args,
        train_dataset=examples,
        data_collator=collator,
        callbacks=callbacks,
        optimizers=(optimizer, None),
    )


def peft_model(chain: ChainConfig):
    torch.manual_seed(0)
    config = lora_config(chain.links[0], chain, TARGETS, False, "causal_lm")
    return extend(tiny_model("llama"), config, gaussian=True)


def test_rslora_chain_is_exact(tmp_path, examples):
    """Knots at alpha/sqrt(r) through a rank step-down; the live chain equals its exported adapter."""
    chain = chain_cfg(use_rslora=True)
    seen = {}

    def probe(link: int, model) -> None:  # right after each knot: the fresh link's scale and A
        layer = lora_layers(model)["model.layers.0.self_attn.q_proj"]
        seen[link] = (float(layer.scaling[ADAPTER]), float(layer.lora_A[ADAPTER].weight.abs().max()))

    callback = ChainCallback(chain, link_init=probe)
    t = trainer(tmp_path, examples, peft_model(chain), [callback])
    t.train()
    knots, _, _ = load_chain(tmp_path / "chain" / "chain.safetensors")
    assert [(k.step, k.rank) for k in knots] == [(6, 4), (12, 2)]
    scales = [{f.scale for f in k.factors.values()} for k in knots]
    assert scales == [{8 / math.sqrt(4)}, {4 / math.sqrt(2)}]  # rsLoRA's, not alpha/r (2.0 both)
    assert seen[1][0] == 4 / math.sqrt(2)
    ids = torch.tensor([examples[0].input_ids])
    live = t.model.eval()(input_ids=ids).logits
    loaded = PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path / "chain" / "adapter")).eval()
    torch.testing.assert_close(loaded(input_ids=ids).logits, live, rtol=1e-4, atol=1e-5)
    assert (live - tiny_model("llama")(input_ids=ids).logits).abs().max() > 1e-3


def test_a_links_own_init_is_drawn(tmp_path, examples):
    """links.1.init: kaiming draws A in +-1/sqrt(in) (hidden 32: 0.177), gaussian N(0, 1/r^2)."""
    seen = {}

    def probe(link: int, model) -> None:
        seen[link] = max(float(m.lora_A[ADAPTER].weight.abs().max()) for m in lora_layers(model).values())

    chain = chain_cfg(links=[LINKS[0], {**LINKS[1], "init": "kaiming"}])
    trainer(tmp_path / "k", examples, peft_model(chain), [ChainCallback(chain, link_init=probe)]).train()
    assert 0.1 < seen[1] <= 1 / math.sqrt(32)
    chain = chain_cfg()
    trainer(tmp_path / "g", examples, peft_model(chain), [ChainCallback(chain, link_init=probe)]).train()
    assert seen[1] > 1.0  # std 1/2: over 2 sigma in a few hundred draws


@pytest.mark.parametrize(
    ("over", "key"),
    [
        ({"init": "pissa"}, "chain.init"),
        ({"init": "olora"}, "chain.init"),
        ({"init": "gradient"}, "chain.init"),
        ({"links": [LINKS[0], {**LINKS[1], "init": "pissa"}]}, "chain.links.1.init"),
        ({"use_dora": True}, "chain.use_dora"),
    ],
)
def test_moving_starts_and_dora_are_refused(over, key):
    with pytest.raises(ConfigError) as err:
        ChainCallback(chain_cfg(**over))
    assert str(err.value).startswith(f"{key}: ChainCallback ") and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("over", "chain_over", "message"),
    [
        ({"use_dora": True}, {}, "ChainCallback: the PEFT model has use_dora=True"),
        ({"init_lora_weights": "pissa"}, {}, "ChainCallback: the PEFT model has init_lora_weights='pissa'"),
        ({"use_rslora": True}, {}, "chain.use_rslora: false, but the PEFT model has use_rslora=True"),
        ({"use_rslora": False}, {"use_rslora": True}, "chain.use_rslora: true, but the PEFT model has"),
    ],
)
def test_a_peft_model_of_another_kind_is_refused(tmp_path, examples, over, chain_over, message):
    chain = chain_cfg(**chain_over)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0, **over)
    model = get_peft_model(tiny_model("llama"), config)
    with pytest.raises(ConfigError) as err:
        trainer(tmp_path, examples, model, [ChainCallback(chain)]).train()
    assert str(err.value).startswith(message)
    assert not (tmp_path / "chain").exists()


def test_loraplus_optimizer_keeps_bs_learning_rate_through_a_stepdown(tmp_path, examples):
    """PEFT's LoRA+ optimizer (B at 16x A's lr): the new rank-2 factors take their predecessors'
    places, so after the knot every B is in the fast group and every A in the slow one."""
    from peft.optimizers import create_loraplus_optimizer

    chain, seen = chain_cfg(), {}
    model = peft_model(chain)
    opt = create_loraplus_optimizer(model, torch.optim.AdamW, lr=0.01, loraplus_lr_ratio=16)

    def probe(link: int, model) -> None:
        rates = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
        for name, layer in lora_layers(model).items():
            a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
            seen[name] = (tuple(a.shape), rates[id(b)] / rates[id(a)])  # KeyError: not in the optimizer

    t = trainer(tmp_path, examples, model, [ChainCallback(chain, link_init=probe)], optimizer=opt)
    t.train()
    assert len(seen) == 4  # q and v of 2 layers
    assert {shape for shape, _ in seen.values()} == {(2, 32)}
    assert [ratio for _, ratio in seen.values()] == pytest.approx([16.0] * 4)
