"""The on-disk adapter store: the folder users copy and serve. Trains nothing.

    STORE/manifest.json           base model identity + fingerprint, labels, templates, adapters
    STORE/adapters/<name>/        one standard PEFT adapter folder per task, `_selector`, `_mixed`
    STORE/splits/{train,val,test}.jsonl

Every adapter file's sha256 is in the manifest; loading checks it, and checks the base model's
fingerprint, so a tampered file or a different base model fails with a message naming it.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lorachain import __version__
from lorachain.io import write_json

TEXT_FORMAT, CHAT_FORMAT = 1, 2  # a chat store (templates['chat']) is format 2
FORMAT = CHAT_FORMAT  # the newest format this version reads
SELECTOR, MIXED = "_selector", "_mixed"


class StoreError(ValueError):
    """The store is missing, corrupt, or does not match the base model; the message names the file."""


def short_reason(err: Exception) -> str:
    """The telling line of a long loading error (a size mismatch, a missing key), else its first."""
    lines = [x.strip() for x in str(err).splitlines() if x.strip()] or [type(err).__name__]
    telling = [x for x in lines if "size mismatch" in x or "Missing key" in x or "Unexpected key" in x]
    return (telling or lines)[0][:300]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint(model: nn.Module) -> str:
    """A cheap identity of the base weights: sha256 over each parameter's name, shape and first
    4096 values (fp32). Differs for another checkpoint, dtype change aside."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in sorted(model.state_dict().items()):
            name = name.removeprefix("base_model.model.")
            if "lora_" in name or "modules_to_save" in name:
                continue
            h.update(f"{name}:{tuple(p.shape)}".encode())
            h.update(p.detach().flatten()[:4096].float().cpu().numpy().tobytes())
    return h.hexdigest()


def safe_name(label: str) -> str:
    """A folder name for a task label (letters, digits, _ . -)."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("._") or "task"
    return name


@dataclass
class Manifest:
    base_model: dict  # name_or_path, gguf_file, task, fingerprint
    labels: list[str]
    templates: dict  # prompt (task adapters), task_prompt (selector); chat stores: chat, selector_input
    adapters: dict[str, dict] = field(default_factory=dict)  # name -> path, kind, task, files, summary
    lorachain_version: str = __version__
    format: int = TEXT_FORMAT
    complete: bool = True  # False while `route train` is still adding adapters
    # kind (lora: the `_selector` adapter; older stores have no field), path, files (sha256), settings
    selector: dict = field(default_factory=lambda: {"kind": "lora"})


def file_hashes(folder: Path, root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def write_manifest(root: str | Path, manifest: Manifest) -> Path:
    return write_json(Path(root) / "manifest.json", vars(manifest))


def read_manifest(root: str | Path) -> Manifest:
    path = Path(root) / "manifest.json"
    if not path.is_file():
        raise StoreError(f"{path}: no manifest (is {root} an adapter store made by `lorachain route train`?)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise StoreError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise StoreError(f"{path}: expected a JSON object, got {type(data).__name__}")
    fmt = data.get("format", 0)
    if not isinstance(fmt, int) or isinstance(fmt, bool):
        raise StoreError(f"{path}: field 'format' should be an integer, got {fmt!r}")
    if data.get("format", 0) > FORMAT:
        raise StoreError(
            f"{path}: store format {data['format']} is newer than this lorachain reads ({FORMAT})"
        )
    try:
        manifest = Manifest(**data)
    except TypeError as e:
        raise StoreError(f"{path}: unexpected manifest fields ({e})") from None
    expected = {"base_model": dict, "labels": list, "templates": dict, "adapters": dict, "selector": dict}
    for name, kind in expected.items():
        if not isinstance(getattr(manifest, name), kind):
            raise StoreError(f"{path}: field {name!r} should be a {kind.__name__}")
    for name, entry in manifest.adapters.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("files"), dict) or "path" not in entry:
            raise StoreError(f"{path}: adapter {name!r} needs 'path' and 'files'")
    return manifest


def check_complete(root: str | Path, manifest: Manifest) -> None:
    """Refuse a store that `route train` has not finished (interrupted or still running)."""
    if manifest.complete is not True:
        raise StoreError(
            f"{Path(root) / 'manifest.json'}: the store is incomplete ({len(manifest.adapters)} adapters "
            "so far; training was interrupted or is still running); run the same `lorachain route train` "
            "command again to finish it"
        )


def verify_adapter(root: str | Path, manifest: Manifest, name: str) -> Path:
    """The adapter folder of `name`, after checking every file against the manifest's sha256."""
    if name not in manifest.adapters:
        raise StoreError(f"{root}: no adapter named {name!r}; known: {sorted(manifest.adapters)}")
    entry = manifest.adapters[name]
    root = Path(root)
    for rel, digest in entry["files"].items():
        path = root / rel
        if not path.is_file():
            raise StoreError(f"{path}: missing (listed in the manifest of adapter {name!r})")
        if sha256_file(path) != digest:
            raise StoreError(f"{path}: sha256 does not match the manifest (file changed or truncated)")
    return root / entry["path"]


def verify_selector(root: str | Path, manifest: Manifest) -> Path:
    """The folder of a non-LoRA selector (`manifest.selector`), after checking its files' sha256."""
    entry = manifest.selector
    if not isinstance(entry.get("files"), dict) or "path" not in entry:
        raise StoreError(
            f"{Path(root) / 'manifest.json'}: selector {entry.get('kind')!r} needs 'path' and 'files'"
        )
    _check_files(Path(root), entry["files"], f"selector {entry.get('kind')!r}")
    return Path(root) / entry["path"]


def _check_files(root: Path, files: dict[str, str], owner: str) -> None:
    for rel, digest in files.items():
        path = root / rel
        if not path.is_file():
            raise StoreError(f"{path}: missing (listed in the manifest of {owner})")
        if sha256_file(path) != digest:
            raise StoreError(f"{path}: sha256 does not match the manifest (file changed or truncated)")


def check_base(root: str | Path, manifest: Manifest, model: nn.Module) -> None:
    """Refuse a base model whose weights differ from the one the store was trained on."""
    expected = manifest.base_model.get("fingerprint")
    if expected and fingerprint(model) != expected:
        raise StoreError(
            f"{Path(root) / 'manifest.json'}: adapters were trained on base "
            f"{manifest.base_model.get('name_or_path')!r} with another weight fingerprint; "
            "load the same base model"
        )


def random_store(
    root: str | Path,
    model: nn.Module,
    labels: list[str],
    templates: dict,
    rank: int = 8,
    target_modules: list[str] | None = None,
    seed: int = 0,
    base_name: str = "random",
) -> Manifest:
    """A store of random (non-zero) LoRA adapters, one per label plus selector and mixed: real
    files and manifest, for cost benchmarks and serving tests, not for answers."""
    from peft import LoraConfig, get_peft_model

    root = Path(root)
    manifest = Manifest(
        base_model={
            "name_or_path": base_name,
            "gguf_file": None,
            "dtype": "float32",
            "fingerprint": fingerprint(model),
        },
        labels=list(labels),
        templates=dict(templates),
    )
    peft = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=target_modules))
    for i, name in enumerate([*[safe_name(x) for x in labels], MIXED, SELECTOR]):
        g = torch.Generator().manual_seed(seed + i)
        with torch.no_grad():
            for n, p in peft.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        peft.save_pretrained(str(root / "adapters" / name))
        kind = "task" if i < len(labels) else name.strip("_")
        manifest.adapters[name] = {
            "path": f"adapters/{name}",
            "kind": kind,
            "task": labels[i] if kind == "task" else None,
            "files": file_hashes(root / "adapters" / name, root),
            "summary": {},
        }
    peft.unload()
    write_manifest(root, manifest)
    return manifest
