"""An adapter's safetensors file read as one buffer: its layout, its signature, one checked read.

A PEFT adapter file is a JSON header and one data section. When the section holds one dtype with no
gaps, it can be read with a single `readinto` straight into a tensor that then *is* the adapter's
weights (each LoRA matrix a view at its offset), and hashed on the same read.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from lorachain.store import StoreError, sha256_file

SIGNATURE_KEYS = (
    "r",
    "lora_alpha",
    "target_modules",
    "lora_bias",
    "fan_in_fan_out",
    "use_rslora",
    "use_dora",
)
WEIGHTS = "adapter_model.safetensors"
ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}

# (dtype name, ((key, shape, start byte, end byte), ...)) in file order
Layout = tuple[str, tuple[tuple[str, tuple[int, ...], int, int], ...]]


def signature(folder: Path) -> str:
    cfg = json.loads((folder / "adapter_config.json").read_text())
    return json.dumps(
        {k: sorted(v) if isinstance(v, list) else v for k, v in cfg.items() if k in SIGNATURE_KEYS},
        sort_keys=True,
    )


def parse_layout(raw: bytes) -> Layout | None:
    """The layout of a safetensors header; None when the file mixes dtypes, has gaps, holds a
    dtype this reader does not map, or is not a header at all."""
    try:
        header = json.loads(raw)
        header.pop("__metadata__", None)
        dtypes = {v["dtype"] for v in header.values()}
        entries = sorted(
            ((k, tuple(v["shape"]), *v["data_offsets"]) for k, v in header.items()), key=lambda e: e[2]
        )
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
    end = 0
    for _, _, a, b in entries:
        if a != end:
            return None
        end = b
    if not entries or len(dtypes) != 1 or next(iter(dtypes)) not in ST_DTYPES:
        return None
    return next(iter(dtypes)), tuple(entries)


def read_layout(path: Path) -> Layout | None:
    with open(path, "rb") as f:
        return parse_layout(f.read(int.from_bytes(f.read(8), "little")))


def check_sha256(path: Path, digest: str | None) -> None:
    if not path.is_file():
        raise StoreError(f"{path}: missing (listed in the manifest)")
    if digest is not None and sha256_file(path) != digest:
        raise StoreError(f"{path}: sha256 does not match the manifest (file changed or truncated)")


def read_weights(
    path: Path, digest: str | None, into: torch.Tensor | None = None, layout: Layout | None = None
) -> tuple[torch.Tensor, Layout] | None:
    """One read of a safetensors file whose data section goes straight into a buffer: `into` if
    the file's layout is `layout`, else a new one (fp32 files only). The file's sha256 is checked
    against `digest` on the way (a mismatch raises, and leaves `into` zeroed). None, with nothing
    written, when the file cannot be read this way."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little")
        if len(head) < 8 or n > 1 << 27:
            return None
        raw = f.read(n)
        found = parse_layout(raw)
        if found is None or (into is None and found[0] != "F32") or (into is not None and found != layout):
            return None
        into = torch.empty(found[1][-1][3] // 4, dtype=torch.float32) if into is None else into  # (N,)
        if into.device.type != "cpu" or found[1][-1][3] != into.nbytes:
            return None
        view = memoryview(into.view(torch.uint8).numpy())
        got = f.readinto(view)
        for part in (head, raw, view[:got]):
            h.update(part)
        for block in iter(lambda: f.read(1 << 16), b""):  # trailing bytes belong to the file too
            h.update(block)
    if got != into.nbytes or (digest is not None and h.hexdigest() != digest):
        into.zero_()  # a reused slot holds no half-read weights: zero LoRA until it is loaded again
        raise StoreError(f"{path}: sha256 does not match the manifest (file changed or truncated)")
    return into, found


def packed_layout(params: dict[str, torch.Tensor]) -> Layout:
    """A layout for `params` when the file's own cannot be used: keys sorted, tightly packed."""
    dtype = next(iter(params.values())).dtype
    name = next((k for k, v in ST_DTYPES.items() if v == dtype), str(dtype))
    size, end, entries = torch.empty((), dtype=dtype).element_size(), 0, []
    for key in sorted(params):
        p = params[key]
        entries.append((key, tuple(p.shape), end, end + p.numel() * size))
        end += p.numel() * size
    return name, tuple(entries)


def fill(flat: torch.Tensor, layout: Layout, tensors: dict[str, torch.Tensor], where: Path) -> bool:
    """Copy `tensors` (a state dict read from `where`) into `flat` at `layout`'s offsets, cast to
    its dtype; False, with nothing written, when the keys differ from the layout's."""
    if tensors.keys() != {e[0] for e in layout[1]}:
        return False
    for key, shape, _, _ in layout[1]:
        if tuple(tensors[key].shape) != shape:
            raise StoreError(f"{where}: {key} has shape {tuple(tensors[key].shape)}, expected {shape}")
    size = flat.element_size()
    with torch.no_grad():
        for key, shape, a, b in layout[1]:
            flat[a // size : b // size].view(shape).copy_(tensors[key])
    return True
