"""Loaded adapters are buffers; one PEFT adapter slot per adapter form is re-pointed at them to run.

A *resident* adapter is only its weights: one buffer holding the safetensors file's data section
byte for byte (a cold load is one `readinto`, sha256-checked on that read) and the file's layout.
The LRU of residents is bounded by the router's `cache_size`; an evicted adapter's buffer is reused
by the load that evicted it when the layouts match.

Running an adapter through PEFT needs its modules: two `nn.Linear` per target layer, ~0.3 MB of
Python objects per adapter on SmolLM2, and ~80 ms to build. So there is one PEFT adapter *slot* per
adapter form (signature: rank, alpha, targets, ...; dtype; tensor names and shapes), built from the
first adapter of that form. Switching to a resident adapter re-points the slot's parameters at its
buffer (`set_`, one call per tensor, ~0.1 ms for 120) and makes the slot active. Mixed batches use
no slot: `factors` gives GatheredLoRA views of each resident's buffer.

Fallbacks: a file whose tensors cannot share one buffer (mixed dtypes) keeps a PEFT slot of its
own, dropped when it is evicted; a file that cannot be read straight into a buffer (non-CPU model,
non-fp32 file) is read as a state dict and copied into a buffer laid out like its form's slot.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftConfig, PeftModel, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors.torch import load as load_safetensors

from lorachain.models import device_of
from lorachain.serve.adapter_file import (
    ST_DTYPES,
    WEIGHTS,
    Layout,
    check_sha256,
    fill,
    packed_layout,
    read_layout,
    read_weights,
    signature,
)
from lorachain.serve.batched_lora import Factors, peft_factors
from lorachain.store import StoreError, short_reason

__all__ = ["WEIGHTS", "AdapterSlots", "Resident", "Slot"]

Form = tuple  # (signature, dtype name, ((key, shape), ...) sorted by key)


@dataclass(eq=False)
class Resident:
    """A loaded adapter. `flat` (N,) holds its weights at `layout`'s offsets; None when they live
    only in the modules of its own slot."""

    flat: torch.Tensor | None
    layout: Layout
    form: Form
    slot: str | None = None  # the PEFT adapter whose parameters are its weights right now


@dataclass(eq=False)
class Slot:
    """A PEFT adapter used to run residents of one form; `params` in the order of `layout`."""

    form: Form
    layout: Layout
    params: list[torch.nn.Parameter]
    adapter: str | None = None  # the resident it runs now


def _strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    out, step = [], 1
    for n in reversed(shape):
        out.append(step)
        step *= n
    return tuple(reversed(out))


class AdapterSlots:
    def __init__(self, model: PeftModel, capacity: int) -> None:
        self.model, self.capacity = model, capacity
        self.lru: OrderedDict[str, Resident] = OrderedDict()  # resident adapters, least recent first
        self.slots: dict[str, Slot] = {}  # PEFT adapter name -> slot
        self.pool: dict[Form, str] = {}  # the slot re-pointed for each form
        self.spare: Resident | None = None  # an evicted adapter's buffer, for the next load
        self.layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
        self.prefix = {id(m): n for n, m in model.named_modules() if isinstance(m, LoraLayer)}
        self.fast = bool(self.layers) and all(hasattr(m, "_active_adapter") for m in self.layers)
        self._layouts: dict[Layout, Layout] = {}  # one copy of each distinct layout
        self._forms: dict[Form, Form] = {}
        self._offsets: dict[int, dict[str, tuple[int, tuple[int, ...]]]] = {}  # id(layout) -> key -> at
        self._plans: dict[tuple[int, str], list] = {}  # (id(layout), slot) -> set_ arguments
        self._made = 0
        self.identity = torch.nn.Identity()

    # -- loading -----------------------------------------------------------------------------
    def adopt(self, name: str, folder: Path) -> None:
        """Count the adapter the model was wrapped with (PEFT name `name`) as a resident adapter
        running in its own PEFT adapter, which becomes its form's slot."""
        self._register(name, folder, signature(folder), name)

    def load(self, name: str, folder: Path, digest: str | None = None) -> bool:
        """Make adapter `name` (from `folder`) resident; True if it was read now. `digest`: the
        weights file's sha256, checked on the read that loads it."""
        if name in self.lru:
            self.lru.move_to_end(name)
            return False
        path = folder / WEIGHTS
        check_sha256(path, None)  # a missing file: a clear error before anything is evicted
        want = self._layouts.get(read_layout(path))
        if len(self.lru) >= self.capacity:
            self._evict(want)
        sig = signature(folder)
        res = self._read(path, digest, want, sig)
        if res is None or res.form not in self.pool:
            self._build(name, folder, sig, res)
        else:
            self.lru[name] = res
        return True

    def _read(self, path: Path, digest: str | None, want: Layout | None, sig: str) -> Resident | None:
        """The file's weights in a buffer (the spare one if its layout fits); None when only PEFT
        can load the file (no slot of its form yet, and no fp32 buffer layout to read it into)."""
        spare = self.spare if self.spare is not None and want is not None else None
        if device_of(self.model).type == "cpu":
            into = spare.flat if spare is not None and spare.layout is want else None
            read = read_weights(path, digest, into, want if into is not None else None)
            if read is not None:
                self.spare = None
                layout = self._layouts.setdefault(read[1], read[1])
                return Resident(read[0], layout, self._form(sig, layout))
        check_sha256(path, digest)
        tensors = load_safetensors(path.read_bytes())
        shapes = tuple(sorted((k, tuple(v.shape)) for k, v in tensors.items()))
        form = next((f for f in self.pool if f[0] == sig and f[2] == shapes), None)
        if form is None:
            return None
        slot = self.slots[self.pool[form]]
        flat = self.spare.flat if self.spare is not None and self.spare.layout is slot.layout else None
        if flat is None:
            p = slot.params[0]
            flat = torch.empty(slot.layout[1][-1][3] // p.element_size(), dtype=p.dtype, device=p.device)
        fill(flat, slot.layout, tensors, path)
        self.spare = None
        return Resident(flat, slot.layout, form)

    def _evict(self, want: Layout | None) -> None:
        """Drop the least recently used adapter, preferring one whose buffer the next file fits."""
        first = next(iter(self.lru))
        victim = next((n for n, r in self.lru.items() if r.flat is not None and r.layout is want), first)
        res = self.lru.pop(victim)
        if res.slot is not None:
            self.slots[res.slot].adapter = None
            if self.pool.get(res.form) != res.slot:  # a slot of its own: nothing else runs in it
                self.model.delete_adapter(res.slot)
                del self.slots[res.slot]
        if res.flat is not None:
            self.spare = res

    def _build(self, name: str, folder: Path, sig: str, res: Resident | None) -> None:
        """A new PEFT slot for adapter `name`: its modules are made on the meta device and view
        `res`'s buffer, or (`res` None) PEFT loads the file itself."""
        slot = f"slot{self._made}"
        self._made += 1
        try:
            if res is not None:
                self._build_from(slot, folder, res.flat, res.layout)
            else:  # `_read` checked the file's sha256 before giving up on it
                self.model.load_adapter(str(folder), adapter_name=slot, low_cpu_mem_usage=True)
        except (RuntimeError, ValueError, KeyError) as e:  # shapes or names that do not fit the base
            if slot in self.model.peft_config:
                self.model.delete_adapter(slot)
            raise StoreError(f"{folder}: does not fit the base model ({short_reason(e)})") from None
        self._register(slot, folder, sig, name)

    def _build_from(self, slot: str, folder: Path, flat: torch.Tensor, layout: Layout) -> None:
        """PEFT's `load_adapter` without its state dict: the slot's weights are views of `flat`."""
        config = PeftConfig.from_pretrained(str(folder))
        config.inference_mode = True
        self.model.add_adapter(slot, config, low_cpu_mem_usage=True)
        views = {key: flat[a // 4 : b // 4].view(shape) for key, shape, a, b in layout[1]}
        result = set_peft_model_state_dict(self.model, views, adapter_name=slot, low_cpu_mem_usage=True)
        missing = [k for k in result.missing_keys if f".{slot}." in k]
        if missing:
            raise KeyError(f"no weights for {missing[0]}")
        self.model.eval()  # as load_adapter: the new dropout modules in inference mode

    def _register(self, slot: str, folder: Path, sig: str, name: str) -> None:
        """Record PEFT adapter `slot`, just made, as the slot running adapter `name`."""
        flat, layout, params = self._pack(slot, folder)
        form = self._form(sig, layout)
        self.slots[slot] = Slot(form, layout, params, name)
        if flat is not None:
            self.pool.setdefault(form, slot)
        self.lru[name] = Resident(flat, layout, form, slot)

    def _form(self, sig: str, layout: Layout) -> Form:
        form = (sig, layout[0], tuple(sorted((key, shape) for key, shape, _, _ in layout[1])))
        return self._forms.setdefault(form, form)

    @torch.no_grad()
    def _pack(self, slot: str, folder: Path) -> tuple[torch.Tensor | None, Layout, list[torch.nn.Parameter]]:
        """Move `slot`'s parameters into one buffer, laid out as `folder`'s file when it can be:
        (buffer or None for mixed dtypes or devices, layout, parameters in layout order)."""
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
        for layer in self.layers:  # one stateless Identity for every slot's (absent) dropout
            if slot in layer.lora_dropout and type(layer.lora_dropout[slot]) is torch.nn.Identity:
                layer.lora_dropout[slot] = self.identity
        return flat, layout, [params[e[0]] for e in layout[1]]

    # -- running -----------------------------------------------------------------------------
    def switch(self, adapter: str) -> None:
        """Make `adapter` the active one: a resident adapter (its form's slot re-pointed at its
        buffer first) or the name of a PEFT adapter (the selector)."""
        res = self.lru.get(adapter)
        if res is not None:
            adapter = self._bind(adapter, res)
        if not self.fast:
            self.model.set_adapter(adapter)
            return
        for layer in self.layers:
            layer._active_adapter = adapter
        self.model.base_model.active_adapter = adapter

    def _bind(self, name: str, res: Resident) -> str:
        """The slot running resident `name`, re-pointing its form's slot at its buffer if needed."""
        if res.slot is not None:
            return res.slot
        slot_name = self.pool[res.form]
        slot = self.slots[slot_name]
        if slot.adapter is not None:
            self.lru[slot.adapter].slot = None
        storage, base = res.flat.untyped_storage(), res.flat.storage_offset()
        with torch.no_grad():
            for p, (offset, shape, stride) in zip(slot.params, self._plan(res, slot_name)):
                p.set_(storage, base + offset, shape, stride)
        slot.adapter, res.slot = name, slot_name
        return slot_name

    def _at(self, res: Resident) -> dict[str, tuple[int, tuple[int, ...]]]:
        """Key -> (offset in elements, shape) in `res`'s buffer (shared by residents of a layout)."""
        at = self._offsets.get(id(res.layout))
        if at is None:
            size = res.flat.element_size()
            at = {key: (a // size, shape) for key, shape, a, _ in res.layout[1]}
            self._offsets[id(res.layout)] = at
        return at

    def _plan(self, res: Resident, slot: str) -> list[tuple[int, tuple[int, ...], tuple[int, ...]]]:
        """`set_` arguments pointing `slot`'s parameters into a buffer laid out like `res`'s."""
        plan = self._plans.get((id(res.layout), slot))
        if plan is None:
            at = self._at(res)
            plan = [(at[key][0], shape, _strides(shape)) for key, shape, _, _ in self.slots[slot].layout[1]]
            self._plans[(id(res.layout), slot)] = plan
        return plan

    def factors(self, layer: LoraLayer, name: str) -> Factors | None:
        """Adapter `name`'s factors in `layer` for GatheredLoRA (None if it does not adapt the
        layer): views of a resident's buffer, whatever its slot runs, or a PEFT adapter's modules."""
        res = self.lru.get(name)
        if res is None or res.flat is None:
            return peft_factors(layer, name if res is None else res.slot)
        slot = self.pool[res.form]
        if slot not in layer.lora_A:
            return None
        at, prefix = self._at(res), self.prefix[id(layer)]

        def view(key: str) -> torch.Tensor | None:
            hit = at.get(f"{prefix}.{key}")
            return None if hit is None else res.flat[hit[0] : hit[0] + math.prod(hit[1])].view(hit[1])

        return view("lora_A.weight"), view("lora_B.weight"), layer.scaling[slot], view("lora_B.bias")
