"""Router memory and selection cost: resident adapters are one buffer each and share one PEFT slot;
batched `score` selection."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tokenizer, tiny_model
from peft import PeftModel
from safetensors.torch import load_file

from lorachain.data import prompt_ids
from lorachain.routing.selectors import batch_logprobs, score_labels
from lorachain.serve.batched_lora import GatheredLoRA
from lorachain.serve.router import Router
from lorachain.serve.slots import WEIGHTS
from lorachain.store import MIXED, SELECTOR, StoreError, random_store
from lorachain.training.evaluate import continuation_logprobs

TEMPLATES = {"prompt": "{instruction} =>", "task_prompt": "{instruction} task:", "max_length": 32}
TASKS = ("alpha", "beta", "gamma", "delta_long_label")
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


def data_section(path) -> bytes:
    raw = path.read_bytes()
    return raw[8 + int.from_bytes(raw[:8], "little") :]


def test_resident_adapters_are_one_buffer_each_and_share_one_peft_slot(store):
    r = router(store, cache_size=4)
    for name in (*TASKS, "alpha"):  # the first builds slot0; the others are only read into buffers
        r.activate(name)
        res = r.slots.lru[name]
        params = r.slots.slots[res.slot].params
        assert {p.untyped_storage().data_ptr() for p in params} == {res.flat.untyped_storage().data_ptr()}
        path = store / "adapters" / name / WEIGHTS
        assert res.flat.view(torch.uint8).numpy().tobytes() == data_section(path)  # byte for byte
        tag = f".{res.slot}."
        live = {n.replace(tag, "."): p for n, p in r.model.named_parameters() if tag in n}
        saved = load_file(str(path))
        assert live.keys() == saved.keys()
        for key, value in saved.items():
            assert torch.equal(live[key], value), key
    assert r.cache == ["beta", "gamma", "delta_long_label", "alpha"]
    assert len({res.flat.untyped_storage().data_ptr() for res in r.slots.lru.values()}) == 4
    assert set(r.model.peft_config) == {SELECTOR, "slot0"}  # 4 resident adapters, one PEFT adapter
    assert all(set(layer.lora_A) == {SELECTOR, "slot0"} for layer in r.slots.layers)
    assert {id(layer.lora_dropout["slot0"]) for layer in r.slots.layers} == {id(r.slots.identity)}
    r.activate(SELECTOR)
    evicted = r.slots.lru["beta"].flat.untyped_storage().data_ptr()
    r.activate(MIXED)  # the cache is full: beta is evicted and its buffer reused
    assert r.cache == ["gamma", "delta_long_label", "alpha", MIXED]
    assert r.slots.lru[MIXED].flat.untyped_storage().data_ptr() == evicted
    assert set(r.model.peft_config) == {SELECTOR, "slot0"}


def test_resident_adapters_answer_like_plain_peft_alone_and_mixed(store):
    r = router(store, cache_size=4)
    plain = PeftModel.from_pretrained(
        tiny_model("llama"), str(store / "adapters" / "alpha"), adapter_name="alpha"
    )
    for name in TASKS[1:]:
        plain.load_adapter(str(store / "adapters" / name), adapter_name=name)
    plain.eval()
    x = torch.randint(4, 40, (5, 6))
    with torch.no_grad():
        for name in ("gamma", "alpha", "delta_long_label", "beta", "alpha"):
            r.activate(name)  # switches re-point slot0 at each adapter's buffer
            plain.set_adapter(name)
            assert torch.equal(r.model(input_ids=x).logits, plain(input_ids=x).logits), name
        rows = ["beta", "alpha", None, "delta_long_label", "gamma"]
        reference = plain(input_ids=x, adapter_names=[n or "__base__" for n in rows]).logits
        with GatheredLoRA(r.model, [r.slot(n) if n else None for n in rows], r.slots.factors):
            gathered = r.model(input_ids=x).logits  # every row from a resident buffer, no slot each
    torch.testing.assert_close(gathered, reference, rtol=1e-4, atol=1e-5)
    assert set(r.model.peft_config) == {SELECTOR, "slot0"}


@pytest.mark.parametrize("first", ["fp32", "fp16"])
def test_fp16_files_are_copied_into_buffers_of_their_form(store, tmp_path, first):
    """A file that cannot be read straight into an fp32 buffer goes through a state dict: into a
    buffer of the slot's layout if its form has a slot, else PEFT loads it and builds one."""
    import shutil

    from safetensors.torch import save_file

    from lorachain.store import file_hashes, read_manifest, write_manifest

    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    folder = copy / "adapters" / "beta"
    save_file({k: v.half() for k, v in load_file(str(folder / WEIGHTS)).items()}, str(folder / WEIGHTS))
    m = read_manifest(copy)
    m.adapters["beta"]["files"] = file_hashes(folder, copy)
    write_manifest(copy, m)
    r = router(copy, cache_size=2)
    x = torch.tensor([[2, 49, 50, 49, 7]])
    for name in ("beta", "alpha", "gamma", "beta") if first == "fp16" else ("alpha", "beta", "gamma", "beta"):
        r.activate(name)
        assert r.slots.lru[name].flat.dtype == torch.float32
        with torch.no_grad():
            fresh = PeftModel.from_pretrained(tiny_model("llama"), str(copy / "adapters" / name)).eval()
            torch.testing.assert_close(r.model(input_ids=x).logits, fresh(input_ids=x).logits)
    assert len(r.model.peft_config) == 2  # the selector and one slot


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
    assert all(float(p.abs().sum()) == 0 for p in r.slots.slots["slot0"].params)  # no half-read weights
    x = torch.tensor([[2, 49, 50, 49, 7]])
    for name in ("gamma", "alpha"):
        r.activate(name)
        with torch.no_grad():
            fresh = PeftModel.from_pretrained(tiny_model("llama"), str(store / "adapters" / name)).eval()
            torch.testing.assert_close(r.model(input_ids=x).logits, fresh(input_ids=x).logits)
    with pytest.raises(StoreError, match="sha256 does not match"):
        router(copy, cache_size=2).activate("beta")  # a new slot: refused before PEFT sees the file
