"""Writers for other tools: the vLLM layout and a launch command that starts as printed."""

from __future__ import annotations

import shlex

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
