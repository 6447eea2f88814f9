"""Loaded adapters live in a fixed set of PEFT adapter slots, reused in LRU order.

Creating a PEFT adapter injects new modules into every target layer (~80 ms on SmolLM2); copying
2 MB of weights into an existing slot of the same shape takes about a millisecond. So a cold load
reuses the least recently used slot when the shapes match (same rank, alpha, targets, bias), and
only builds a new slot otherwise. Switching sets the active adapter on the LoRA layers directly.

Each slot keeps all its LoRA weights in one contiguous buffer laid out like the safetensors file's
data section (PEFT's parameters become views into it): one allocation per adapter instead of ~120
small ones, and a cold load of a same-layout file is a single `readinto` straight into the buffer,
with no state dict in between.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from pathlib import Path

import torch
from peft import PeftConfig, PeftModel, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors.torch import load as load_safetensors

from lorachain.models import device_of
from lorachain.store import StoreError, sha256_file, short_reason

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


class AdapterSlots:
    def __init__(self, model: PeftModel, capacity: int) -> None:
        self.model, self.capacity = model, capacity
        self.lru: OrderedDict[str, str] = OrderedDict()  # adapter name -> slot, least recent first
        self.params: dict[str, list[torch.nn.Parameter]] = {}  # slot -> parameters in layout order
        self.flat: dict[str, torch.Tensor | None] = {}  # slot -> one buffer (N,) its parameters view
        self.layout: dict[str, Layout] = {}  # slot -> layout of its buffer (shared between slots)
        self.shape: dict[str, str] = {}  # slot -> signature
        self.layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
        self.fast = bool(self.layers) and all(hasattr(m, "_active_adapter") for m in self.layers)
        self._layouts: dict[Layout, Layout] = {}  # one copy of each distinct layout
        self.identity = torch.nn.Identity()

    def adopt(self, name: str, folder: Path) -> None:
        """Count the adapter the model was wrapped with (PEFT name `name`) as a loaded slot."""
        self._pack(name, folder)
        self.shape[name] = signature(folder)
        self.lru[name] = name

    def get(self, name: str, folder: Path, digest: str | None = None) -> tuple[str, bool]:
        """The slot holding adapter `name` (from `folder`), loading it if needed; (slot, cold).
        `digest`: the weights file's sha256, checked on the read that loads it."""
        if name in self.lru:
            self.lru.move_to_end(name)
            return self.lru[name], False
        sig = signature(folder)
        used = set(self.lru.values())
        free = [s for s in self.params if s not in used]
        slot = next((s for s in free if self.shape[s] == sig), None)
        if slot is None and len(self.params) >= self.capacity:
            victim = next((n for n, s in self.lru.items() if self.shape[s] == sig), next(iter(self.lru)))
            slot = self.lru.pop(victim)
        if slot is not None and self.shape.get(slot) == sig and self._copy_into(slot, folder, digest):
            self.lru[name] = slot
            return slot, True
        slot = slot or f"slot{len(self.params)}"
        self._build(slot, folder, sig, digest)
        self.lru[name] = slot
        return slot, True

    def _copy_into(self, slot: str, folder: Path, digest: str | None) -> bool:
        """Load the weights of `folder` into `slot`'s buffer; False if its keys do not fit the slot."""
        path = folder / WEIGHTS
        flat = self.flat[slot]
        if flat is not None and read_weights(path, digest, flat, self.layout[slot]) is not None:
            return True  # the data section is the buffer, byte for byte
        check_sha256(path, digest)
        tensors = load_safetensors(path.read_bytes())
        keys = [e[0] for e in self.layout[slot][1]]
        if tensors.keys() != set(keys):
            return False
        params = dict(zip(keys, self.params[slot], strict=True))
        for key, value in tensors.items():
            if value.shape != params[key].shape:
                raise StoreError(
                    f"{folder}: {key} has shape {tuple(value.shape)}, expected "
                    f"{tuple(params[key].shape)} (rank {self.shape[slot]})"
                )
        with torch.no_grad():
            for key, value in tensors.items():
                params[key].copy_(value)
        return True

    def _build(self, slot: str, folder: Path, sig: str, digest: str | None = None) -> None:
        if slot in self.params:
            self.model.delete_adapter(slot)
            del self.params[slot], self.flat[slot], self.layout[slot]
        path = folder / WEIGHTS
        read = read_weights(path, digest) if device_of(self.model).type == "cpu" else None
        if read is None:
            check_sha256(path, digest)
        try:
            if read is not None:
                self._build_from(slot, folder, *read)
            else:
                self.model.load_adapter(str(folder), adapter_name=slot, low_cpu_mem_usage=True)
        except (RuntimeError, ValueError, KeyError) as e:  # shapes or names that do not fit the base
            if slot in self.model.peft_config:
                self.model.delete_adapter(slot)
            self.shape.pop(slot, None)
            raise StoreError(f"{folder}: does not fit the base model ({short_reason(e)})") from None
        self._pack(slot, folder)
        self.shape[slot] = sig

    def _build_from(self, slot: str, folder: Path, flat: torch.Tensor, layout: Layout) -> None:
        """PEFT's `load_adapter` without its state dict: the slot's modules are made on the meta
        device and their weights become views of `flat`, read from the file."""
        config = PeftConfig.from_pretrained(str(folder))
        config.inference_mode = True
        self.model.add_adapter(slot, config, low_cpu_mem_usage=True)
        views = {key: flat[a // 4 : b // 4].view(shape) for key, shape, a, b in layout[1]}
        result = set_peft_model_state_dict(self.model, views, adapter_name=slot, low_cpu_mem_usage=True)
        missing = [k for k in result.missing_keys if f".{slot}." in k]
        if missing:
            raise KeyError(f"no weights for {missing[0]}")
        self.model.eval()  # as load_adapter: the new dropout modules in inference mode

    @torch.no_grad()
    def _pack(self, slot: str, folder: Path) -> None:
        """Move `slot`'s parameters into one buffer, laid out as `folder`'s file when it can be."""
        tag = f".{slot}."
        params = {n.replace(tag, "."): p for n, p in self.model.named_parameters() if tag in n}
        layout = read_layout(folder / WEIGHTS)
        if not params:
            raise StoreError(f"{folder}: the adapter has no LoRA weights")
        first = next(iter(params.values()))
        fits = (
            layout is not None
            and ST_DTYPES[layout[0]] == first.dtype
            and {e[0] for e in layout[1]} == params.keys()
            and all(tuple(params[k].shape) == shape for k, shape, _, _ in layout[1])
        )
        uniform = all(p.dtype == first.dtype and p.device == first.device for p in params.values())
        layout = layout if fits and uniform else packed_layout(params)
        layout = self._layouts.setdefault(layout, layout)
        flat = None  # mixed dtypes or devices: the parameters stay as PEFT made them
        base = first.untyped_storage()
        if fits and all(p.untyped_storage().data_ptr() == base.data_ptr() for p in params.values()):
            flat = torch.empty(0, dtype=first.dtype, device=first.device).set_(base)  # built from the file
        elif uniform:
            size = first.element_size()
            flat = torch.empty(layout[1][-1][3] // size, dtype=first.dtype, device=first.device)  # (N,)
            for key, shape, a, b in layout[1]:
                view = flat[a // size : b // size].view(shape)
                view.copy_(params[key])
                params[key].data = view
        self.flat[slot], self.layout[slot] = flat, layout
        for layer in self.layers:  # one stateless Identity for every slot's (absent) dropout
            if slot in layer.lora_dropout and type(layer.lora_dropout[slot]) is torch.nn.Identity:
                layer.lora_dropout[slot] = self.identity
        self.params[slot] = [params[e[0]] for e in layout[1]]

    def switch(self, adapter: str) -> None:
        """Make `adapter` (a slot name, or the selector's name) the active adapter."""
        if not self.fast:
            self.model.set_adapter(adapter)
            return
        for layer in self.layers:
            layer._active_adapter = adapter
        self.model.base_model.active_adapter = adapter
