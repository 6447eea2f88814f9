"""`lorachain export vllm STORE OUT`: the store's adapters in the layout vLLM loads, and its command."""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path

from lorachain.io import atomic_dir, write_text
from lorachain.serve.proxy import upstream_name
from lorachain.store import SELECTOR, read_manifest, verify_adapter


def export_vllm(store: str | Path, out: str | Path, port: int = 8001) -> str:
    """Copy every task adapter and the mixed one (hash-checked) to OUT/<name>; return the launch
    command of a vLLM server that serves them under those names, for `serve --upstream`."""
    manifest = read_manifest(store)
    base = manifest.base_model["name_or_path"]
    names = [n for n in manifest.adapters if n != SELECTOR]
    ranks = []

    def fill(tmp: Path) -> None:
        for name in names:
            src = verify_adapter(store, manifest, name)
            shutil.copytree(src, tmp / upstream_name(name, base))
            cfg = (src / "adapter_config.json").read_text()
            ranks.append(int(__import__("json").loads(cfg)["r"]))

    out = atomic_dir(out, fill)
    modules = " ".join(
        f"{upstream_name(n, base)}={shlex.quote(str((out / upstream_name(n, base)).resolve()))}"
        for n in names
    )
    max_rank = max([8, 16, 32, 64, 128, 256, 512], key=lambda r: (r < max(ranks), -r))
    command = (
        f"vllm serve {shlex.quote(base)} --enable-lora --max-loras {len(names)} "
        f"--max-lora-rank {max_rank} --port {port} --lora-modules {modules}"
    )
    write_text(out / "vllm_command.sh", f"#!/bin/sh\n{command}\n")
    return command
