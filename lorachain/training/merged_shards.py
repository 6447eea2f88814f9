"""The merged model of an fsdp run, written without any rank holding the whole model.

Every rank takes part; the weights are gathered to rank 0 one unit at a time (a decoder layer, or one
weight outside the layers: the embeddings, the final norm, the head) and each unit is written as a
safetensors file of its own before the next is gathered, with the `model.safetensors.index.json`
that `from_pretrained` reads a sharded checkpoint by. Rank 0 also writes the config, the generation
config and the tokenizer. The folder appears whole or not at all (`io.atomic_dir`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from lorachain.io import atomic_dir
from lorachain.training.base_checkpoint import base_state
from lorachain.training.parallel import Dist


def units(model: nn.Module) -> list[list[str]]:
    """The base's weight names (plain names, tied weights once, persistent buffers included) grouped
    into the units written one at a time: a decoder layer each, any other weight alone."""
    names = list(base_state(model)) + [n for n, _ in persistent_buffers(model)]
    layers = set(getattr(model, "_no_split_modules", None) or [])  # FSDP2 renames a class FSDP<name>
    prefixes = [n + "." for n, m in model.named_modules() if type(m).__name__.removeprefix("FSDP") in layers]
    groups: dict[str, list[str]] = {}
    for name in names:
        key = next((p for p in prefixes if name.startswith(p)), name)
        groups.setdefault(key, []).append(name)
    return list(groups.values())


def persistent_buffers(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    out = []
    for mname, module in model.named_modules():
        for bname, b in module.named_buffers(recurse=False):
            if b is not None and bname not in module._non_persistent_buffers_set:
                out.append((f"{mname}.{bname}" if mname else bname, b))
    return out


def gather_to_rank0(t: torch.Tensor, dist: Dist) -> torch.Tensor | None:
    """The full value of `t` on rank 0 (None on the others); sharded along dim 0 or whole."""
    from torch.distributed.tensor import DTensor

    if not isinstance(t, DTensor):
        return t.detach().cpu() if dist.main else None
    import torch.distributed as tdist

    local = t.to_local().detach()
    n, world = t.shape[0], dist.world
    chunk = -(-n // world)
    padded = torch.zeros((chunk, *t.shape[1:]), dtype=t.dtype, device=local.device)  # (chunk, ...)
    padded[: local.shape[0]].copy_(local)
    parts = [torch.empty_like(padded) for _ in range(world)] if dist.main else None
    tdist.gather(padded, parts, dst=0)
    return torch.cat(parts)[:n].cpu() if dist.main else None


def gathered_units(model: nn.Module, dist: Dist) -> Iterator[dict[str, torch.Tensor]]:
    """Each unit's full weights on rank 0 (empty dicts on the others), one unit at a time."""
    state = base_state(model) | dict(persistent_buffers(model))
    for names in units(model):
        full = {name: gather_to_rank0(state[name], dist) for name in names}
        yield {k: v.contiguous() for k, v in full.items() if v is not None}


def write_merged_shards(out_dir: str | Path, model: nn.Module, tokenizer, dist: Dist) -> Path | None:
    """Write the merged (knotted) base `model` of an fsdp run to `out_dir` as a sharded safetensors
    checkpoint; every rank calls this, rank 0 writes and returns the folder."""
    from safetensors.torch import save_file

    if not dist.main:
        for _ in gathered_units(model, dist):
            pass
        return None
    n = len(units(model))

    def fill(tmp: Path) -> None:
        weight_map, total = {}, 0
        for i, tensors in enumerate(gathered_units(model, dist), 1):
            name = f"model-{i:05d}-of-{n:05d}.safetensors"
            save_file(tensors, str(tmp / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, name))
            total += sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))

    return atomic_dir(out_dir, fill)
