"""Loaded adapters live in a fixed set of PEFT adapter slots, reused in LRU order.

Creating a PEFT adapter injects new modules into every target layer (~80 ms on SmolLM2); copying
2 MB of weights into an existing slot of the same shape takes about a millisecond. So a cold load
reuses the least recently used slot when the shapes match (same rank, alpha, targets, bias), and
only builds a new slot otherwise. Switching sets the active adapter on the LoRA layers directly.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import load as load_safetensors

from lorachain.store import StoreError, short_reason

SIGNATURE_KEYS = (
    "r",
    "lora_alpha",
    "target_modules",
    "lora_bias",
    "fan_in_fan_out",
    "use_rslora",
    "use_dora",
)


def signature(folder: Path) -> str:
    cfg = json.loads((folder / "adapter_config.json").read_text())
    return json.dumps(
        {k: sorted(v) if isinstance(v, list) else v for k, v in cfg.items() if k in SIGNATURE_KEYS},
        sort_keys=True,
    )


class AdapterSlots:
    def __init__(self, model: PeftModel, capacity: int) -> None:
        self.model, self.capacity = model, capacity
        self.lru: OrderedDict[str, str] = OrderedDict()  # adapter name -> slot, least recent first
        self.params: dict[str, dict[str, torch.nn.Parameter]] = {}  # slot -> saved key -> parameter
        self.shape: dict[str, str] = {}  # slot -> signature
        self.layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
        self.fast = bool(self.layers) and all(hasattr(m, "_active_adapter") for m in self.layers)

    def adopt(self, name: str, folder: Path) -> None:
        """Count the adapter the model was wrapped with (PEFT name `name`) as a loaded slot."""
        tag = f".{name}."
        self.params[name] = {n.replace(tag, "."): p for n, p in self.model.named_parameters() if tag in n}
        self.shape[name] = signature(folder)
        self.lru[name] = name

    def get(self, name: str, folder: Path) -> tuple[str, bool]:
        """The slot holding adapter `name` (from `folder`), loading it if needed; (slot, cold)."""
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
        if slot is not None and self.shape.get(slot) == sig and self._copy_into(slot, folder):
            self.lru[name] = slot
            return slot, True
        slot = slot or f"slot{len(self.params)}"
        self._build(slot, folder, sig)
        self.lru[name] = slot
        return slot, True

    def _copy_into(self, slot: str, folder: Path) -> bool:
        tensors = load_safetensors((folder / "adapter_model.safetensors").read_bytes())
        params = self.params[slot]
        if tensors.keys() != params.keys():
            return False
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

    def _build(self, slot: str, folder: Path, sig: str) -> None:
        if slot in self.params:
            self.model.delete_adapter(slot)
        try:
            self.model.load_adapter(str(folder), adapter_name=slot)
        except (RuntimeError, ValueError, KeyError) as e:  # shapes or names that do not fit the base
            if slot in self.model.peft_config:
                self.model.delete_adapter(slot)
            self.params.pop(slot, None)
            raise StoreError(f"{folder}: does not fit the base model ({short_reason(e)})") from None
        tag = f".{slot}."
        self.params[slot] = {n.replace(tag, "."): p for n, p in self.model.named_parameters() if tag in n}
        self.shape[slot] = sig

    def switch(self, adapter: str) -> None:
        """Make `adapter` (a slot name, or the selector's name) the active adapter."""
        if not self.fast:
            self.model.set_adapter(adapter)
            return
        for layer in self.layers:
            layer._active_adapter = adapter
        self.model.base_model.active_adapter = adapter
