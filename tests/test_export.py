"""Writers for other tools: the vLLM layout and a launch command that starts as printed."""

from __future__ import annotations

import shlex

import numpy as np
import pytest
from conftest import make_tokenizer, tiny_model
from peft import PeftConfig

from lorachain.export.vllm import export_vllm, max_lora_rank
from lorachain.store import random_store

TEMPLATES = {"prompt": "{instruction} =>", "task_prompt": "{instruction} task:", "max_length": 32}


@pytest.fixture
def store(tmp_path):
    model_dir = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    root = tmp_path / "store"
    random_store(
        root,
        tiny_model("llama"),
        ["alpha", "beta", "gamma"],
        TEMPLATES,
        rank=4,
        target_modules=["q_proj", "v_proj"],
        base_name=str(model_dir),
    )
    return root


def test_export_vllm_layout_and_command(store, tmp_path):
    command = export_vllm(store, tmp_path / "vllm", port=8123)
    out = tmp_path / "vllm"
    assert sorted(p.name for p in out.iterdir()) == ["alpha", "beta", "gamma", "mixed", "vllm_command.sh"]
    assert PeftConfig.from_pretrained(str(out / "alpha")).r == 4
    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "vllm.entrypoints.openai.api_server"]
    opts, key = {}, None
    for a in argv[3:]:
        if a.startswith("--"):
            key = a
            opts[key] = True
        elif opts[key] is True:
            opts[key] = a
    assert opts["--enable-lora"] is True
    assert opts["--model"] == str((tmp_path / "tiny-llama").resolve())  # the local folder, not a hub id
    assert opts["--served-model-name"] == "base"  # the name the proxy sends for `model: base`
    assert opts["--dtype"] == "float32" and opts["--host"] == "127.0.0.1" and opts["--port"] == "8123"
    assert opts["--max-loras"] == "4" and opts["--max-lora-rank"] == "8"
    assert f"alpha={(out / 'alpha').resolve()}" in argv
    script = (out / "vllm_command.sh").read_text()
    assert command in script and "torchvision torchaudio torchcodec" in script


def test_max_lora_rank_is_one_vllm_accepts():
    assert max_lora_rank([4, 8]) == 8
    assert max_lora_rank([8, 8, 8, 4]) == 8
    assert max_lora_rank([24]) == 32  # a 3-link chain of r=8 exported as one adapter
    assert max_lora_rank([300]) == 320
    with pytest.raises(ValueError, match="512"):
        max_lora_rank([600])


def test_adapter_gguf_in_llama_cpp_format(store, tmp_path):
    import gguf
    from safetensors.numpy import load_file
    from transformers import AutoConfig

    from lorachain.export.gguf import adapter_to_gguf, permute_rows

    folder = store / "adapters" / "alpha"
    config = AutoConfig.from_pretrained(tmp_path / "tiny-llama")
    out = adapter_to_gguf(folder, tmp_path / "alpha.gguf", config)
    r = gguf.GGUFReader(str(out))
    assert r.fields["general.type"].contents() == "adapter"
    assert r.fields["adapter.type"].contents() == "lora"
    peft = load_file(str(folder / "adapter_model.safetensors"))
    assert r.fields["adapter.lora.alpha"].contents() == 8.0  # rank 4, alpha 2r in random_store
    tensors = {t.name: t for t in r.tensors}
    assert len(tensors) == len(peft)  # an A and a B per target layer, nothing else
    prefix = "base_model.model.model.layers.0.self_attn"
    a = peft[f"{prefix}.q_proj.lora_A.weight"]
    b = peft[f"{prefix}.q_proj.lora_B.weight"]
    ga, gb = tensors["blk.0.attn_q.weight.lora_a"], tensors["blk.0.attn_q.weight.lora_b"]
    assert list(ga.shape) == [a.shape[1], a.shape[0]]  # ggml order: (in, r)
    np.testing.assert_array_equal(np.asarray(ga.data).reshape(a.shape), a)
    # q rows are permuted for llama.cpp's rotary layout; v rows are not
    np.testing.assert_array_equal(
        np.asarray(gb.data).reshape(b.shape), permute_rows(b, config.num_attention_heads)
    )
    bv = peft[f"{prefix}.v_proj.lora_B.weight"]
    np.testing.assert_array_equal(
        np.asarray(tensors["blk.0.attn_v.weight.lora_b"].data).reshape(bv.shape), bv
    )


def test_dequantised_copy_keeps_metadata_and_values(tmp_path):
    import gguf

    from lorachain.export.gguf import dequantised_copy

    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 64)).astype(np.float32)
    q = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)
    src = tmp_path / "q.gguf"
    writer = gguf.GGUFWriter(str(src), "llama")
    writer.add_string("tokenizer.chat_template", "{{ messages }}")
    writer.add_uint32("llama.block_count", 1)
    writer.add_tensor("blk.0.attn_q.weight", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    r = gguf.GGUFReader(str(dequantised_copy(src, tmp_path / "f32.gguf")))
    assert r.fields["tokenizer.chat_template"].contents() == "{{ messages }}"
    assert r.fields["llama.block_count"].contents() == 1
    (t,) = r.tensors
    assert t.tensor_type == gguf.GGMLQuantizationType.F32
    expected = gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)
    np.testing.assert_array_equal(np.asarray(t.data).reshape(8, 64), expected)
    assert np.abs(expected - w).max() < 0.05  # and that is close to the original weights


def test_an_unfinished_store_is_not_exported(store, tmp_path):
    import json

    from lorachain.export.gguf import export_gguf
    from lorachain.store import StoreError

    manifest = json.loads((store / "manifest.json").read_text())
    (store / "manifest.json").write_text(json.dumps(manifest | {"complete": False}))
    for export in (export_vllm, export_gguf):
        with pytest.raises(StoreError, match="incomplete"):
            export(store, tmp_path / export.__name__)
