"""Router memory and selection cost: one buffer per cached adapter, batched `score` selection."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tokenizer, tiny_model
from peft import PeftModel
from safetensors.torch import load_file

from lorachain.data import prompt_ids
from lorachain.evaluate import continuation_logprobs
from lorachain.routing.selectors import batch_logprobs, score_labels
from lorachain.serve.router import Router
from lorachain.serve.slots import WEIGHTS
from lorachain.store import SELECTOR, StoreError, random_store

TEMPLATES = {"prompt": "{instruction} =>", "task_prompt": "{instruction} task:", "max_length": 32}
TEXTS = ["red", "blue sea blue sky", "a b c d e f g h i j", "sky", "red sky red sea red", "x y", "z", "b"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("mem") / "store"
    labels = ["alpha", "beta", "gamma", "delta_long_label"]
    random_store(root, tiny_model("llama"), labels, TEMPLATES, rank=4, target_modules=["q_proj", "v_proj"])
    return root


def router(store, **kw) -> Router:
    return Router.from_store(store, model=tiny_model("llama"), tokenizer=make_tokenizer(), **kw)


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
def test_batched_logprobs_equal_one_at_a_time(family):
    model, tok = tiny_model(family).eval(), make_tokenizer()
    prompts = [tok(x)["input_ids"] for x in TEXTS]
    conts = [tok(f" {x}", add_special_tokens=False)["input_ids"] for x in ["red sky", "blue", "sea red sky"]]
    assert len({len(p) for p in prompts}) > 3 and max(map(len, conts)) > 1  # padding and a second pass
    with torch.no_grad():
        single = torch.tensor([continuation_logprobs(model, p, conts) for p in prompts])  # (P, C)
    batched = batch_logprobs(model, prompts, conts)  # (P, C)
    assert batched.shape == (len(TEXTS), 3)
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-4)


def test_router_score_selection_same_in_batches_as_one_by_one(store):
    r = router(store)
    r.activate(SELECTOR)
    args = (r.model, r.tok, r.select_cfg, r.label_ids, r.labels, TEXTS)
    one, batched = score_labels(*args, batch_size=1), score_labels(*args, batch_size=8)
    for a, b, c in zip(one, batched, score_labels(*args, batch_size=3), strict=True):  # c: regrouped
        assert a.ranked == b.ranked == c.ranked
        torch.testing.assert_close(torch.tensor(a.scores), torch.tensor(b.scores), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(torch.tensor(a.scores), torch.tensor(c.scores), rtol=1e-4, atol=1e-5)
    reserve = max(map(len, r.label_ids))
    for x, sel in zip(TEXTS, batched, strict=True):  # and the log-probs of the old per-prompt path
        lp = continuation_logprobs(
            r.model, prompt_ids(r.select_cfg, r.tok, {"instruction": x}, reserve), r.label_ids
        )
        assert sel.ranked[0] == r.labels[max(range(len(lp)), key=lp.__getitem__)]
    r.score_batch = 3  # ask batches the selector too, with the same answers
    assert [a.adapter for a in r.ask(TEXTS)] == [r.adapters.get(s.ranked[0]) for s in batched]


def test_each_cached_adapter_is_one_buffer_equal_to_the_file(store):
    r = router(store, cache_size=2)
    for name in ("alpha", "beta", "gamma", "alpha"):  # builds two slots, then cold loads into them
        r.activate(name)
        slot = r.slots.lru[name]
        params = r.slots.params[slot]
        flat = r.slots.flat[slot]
        assert {p.untyped_storage().data_ptr() for p in params} == {flat.untyped_storage().data_ptr()}
        assert flat.nbytes == sum(p.numel() * p.element_size() for p in params)
        saved = load_file(str(store / "adapters" / name / WEIGHTS))
        assert flat.numel() == sum(t.numel() for t in saved.values()) > 0
        tag = f".{slot}."
        live = {n.replace(tag, "."): p for n, p in r.model.named_parameters() if tag in n}
        assert live.keys() == saved.keys()
        for key, value in saved.items():
            assert torch.equal(live[key], value), key
    assert set(r.model.peft_config) == {SELECTOR, "slot0", "slot1"}
    drops = {id(layer.lora_dropout[s]) for layer in r.slots.layers for s in ("slot0", "slot1")}
    assert drops == {id(r.slots.identity)}  # one shared Identity, not one module per slot and layer


def test_buffered_slots_answer_like_plain_peft(store):
    r = router(store, cache_size=2)
    x = torch.tensor([[2, 49, 50, 49, 7]])
    for name in ("gamma", "alpha", "beta", "gamma"):
        r.activate(name)
        with torch.no_grad():
            got = r.model(input_ids=x).logits
            fresh = PeftModel.from_pretrained(tiny_model("llama"), str(store / "adapters" / name)).eval()
            torch.testing.assert_close(got, fresh(input_ids=x).logits)


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_weights_are_refused_on_the_one_read_and_the_slot_is_not_used(store, tmp_path, damage):
    import shutil

    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    weights = copy / "adapters" / "beta" / WEIGHTS
    data = bytearray(weights.read_bytes())
    if damage == "truncate":
        data = data[:-10]
    else:
        data[-5] ^= 0x01  # same size, same header, one weight changed
    weights.write_bytes(bytes(data))
    r = router(copy, cache_size=1)
    r.activate("alpha")
    with pytest.raises(StoreError, match=r"beta/adapter_model.safetensors: sha256 does not match"):
        r.activate("beta")  # into alpha's reused slot
    assert r.cache == []  # alpha was evicted, beta never counted as loaded
    assert all(float(p.abs().sum()) == 0 for p in r.slots.params["slot0"])  # no half-read weights
    x = torch.tensor([[2, 49, 50, 49, 7]])
    for name in ("gamma", "alpha"):
        r.activate(name)
        with torch.no_grad():
            fresh = PeftModel.from_pretrained(tiny_model("llama"), str(store / "adapters" / name)).eval()
            torch.testing.assert_close(r.model(input_ids=x).logits, fresh(input_ids=x).logits)
    with pytest.raises(StoreError, match="sha256 does not match"):
        router(copy, cache_size=2).activate("beta")  # a new slot: refused before PEFT sees the file
