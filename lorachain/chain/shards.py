"""Tie a knot on a sharded base (FSDP2): each rank adds s·B·A into the rows of every target weight it
holds, and nothing else moves.

Under FSDP2 a weight is a DTensor sharded along dim 0: rank k holds rows [k·c, (k+1)·c) with
c = ceil(out / world). Those rows of ΔW = s·B·A are s·B[rows]·A, computed from the LoRA factors,
which are whole on every rank (lorachain's `fsdp` keeps them replicated) or gathered when a
wrapper sharded them too (they are (out + in)·r numbers). A full base weight is never gathered. The
sum is fp32 on fp32 shards; a shard held in a lower dtype records its rounding, as `knot.apply_factors`
does, reduced over the ranks. All ranks agree on refusing a non-finite merge (all or nothing).
"""

from __future__ import annotations

import torch
from peft import PeftModel
from torch import nn

from lorachain.chain.knot import Factors, Knot, KnotError, layer_factors, lora_layers, reshard
from lorachain.chain.sidepath import attach, is_quantized_layer


def is_sharded(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def sharded(model: nn.Module) -> bool:
    """Whether the LoRA or target weights of the PEFT `model` are sharded (FSDP2)."""
    for layer in lora_layers(model).values():
        return is_sharded(layer.get_base_layer().weight) or is_sharded(layer.lora_A["default"].weight)
    return False


def local_rows(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(this rank's local rows, the global index of the first) of a tensor sharded along dim 0,
    or (the tensor, 0) for a plain one. The local tensor is the shard's storage: writes stay."""
    if not is_sharded(t):
        return t.data, 0
    from torch.distributed.tensor import Shard

    if tuple(t.placements) != (Shard(0),):
        raise KnotError(f"a knot on shards needs weights sharded along dim 0, got {t.placements}")
    local = t.to_local()
    n, world, rank = t.shape[0], t.device_mesh.size(), t.device_mesh.get_local_rank()
    chunk = -(-n // world)  # FSDP2 shards like torch.chunk: equal rows, the last ranks fewer
    start = min(rank * chunk, n)
    if local.shape[0] != max(0, min(chunk, n - start)):
        raise KnotError(f"unexpected shard of {tuple(t.shape)}: {tuple(local.shape)} on rank {rank}")
    return local.data, start


def whole(t: torch.Tensor | None) -> torch.Tensor | None:
    """The full tensor of a (small) sharded factor, gathered; a plain tensor as it is."""
    return t.full_tensor() if t is not None and is_sharded(t) else t


def shard_factors(layer) -> Factors:
    """`knot.layer_factors` of a LoRA layer whose factors may be sharded: whole fp32 CPU tensors."""
    f = layer_factors(layer)
    f.A, f.B, f.bias = (None if t is None else whole(t).float().cpu() for t in (f.A, f.B, f.bias))
    return f


def _delta_rows(f: Factors, start: int, rows: int, device) -> torch.Tensor:
    """Rows [start, start + rows) of the stored weight's delta, (rows, in) or (rows, out) for Conv1D."""
    A, B = f.A.to(device), f.B.to(device)  # (r, in), (out, r)
    if f.fan_in_fan_out:  # Conv1D stores (in, out): rows of (B A)^T are columns of A
        return f.scale * (A[:, start : start + rows].T @ B.T)
    return f.scale * (B[start : start + rows] @ A)


def _all_reduce(values: list[float], op: str) -> list[float]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.tolist()


def apply_on_shards(base: nn.Module, factors: dict[str, Factors]) -> dict[str, float]:
    """Merge recorded factors into the local shards of `base` (plain or PEFT-wrapped, sharded or
    not); all-or-nothing on every rank. Returns the rounding like `knot.apply_factors`. A quantized
    layer (a torchao NF4 shard) is not written: its factors join its side path (`chain.sidepath`),
    whole on every rank, as on one process."""
    reshard(base)  # a write into the shards would miss a gathered copy, which the next forward reads
    updates, side = [], []
    bad = ""
    for name, f in factors.items():
        module = base.get_submodule(name)
        module = getattr(module, "base_layer", module)
        if is_quantized_layer(module):
            side.append((module, f, name))
            parts = [t for t in (f.A, f.B, f.bias) if t is not None]
            if not bad and not all(torch.isfinite(t).all() for t in parts):
                bad = name
            continue
        for key in ("weight", "bias") if f.bias is not None else ("weight",):
            target, start = local_rows(getattr(module, key))
            if key == "weight":
                delta = _delta_rows(f, start, target.shape[0], target.device)
            else:
                delta = f.scale * f.bias.to(target.device)[start : start + target.shape[0]]
            value = target.float() + delta
            if not bad and not torch.isfinite(value).all():
                bad = f"{name}.{key}"
            updates.append((target, value, delta))
    if _all_reduce([float(bool(bad))], "max")[0]:
        where = bad or "a layer of another rank"
        raise KnotError(f"tying a knot on {where} gives non-finite weights; nothing was merged")
    lost_sq, delta_sq, max_abs = 0.0, 0.0, 0.0
    with torch.no_grad():
        for target, value, delta in updates:
            stored = value.to(target.dtype)
            lost = value - stored.float()
            delta_sq += float(delta.double().square().sum())
            lost_sq += float(lost.double().square().sum())
            max_abs = max(max_abs, float(lost.abs().max()) if lost.numel() else 0.0)
            target.copy_(stored)
    for module, f, name in side:
        attach(module, f, name)
    lost_sq, delta_sq = _all_reduce([lost_sq, delta_sq], "sum")
    (max_abs,) = _all_reduce([max_abs], "max")
    return {"max_abs": max_abs, "rel_fro": (lost_sq / delta_sq) ** 0.5 if delta_sq else 0.0}


def tie_on_shards(model: PeftModel, link: int, step: int, rank: int, alpha: float, reason: str) -> Knot:
    """`knot.tie_knot` for a sharded base: merge the current link into each rank's local rows."""
    factors = {name: shard_factors(layer) for name, layer in lora_layers(model).items()}
    rounding = apply_on_shards(model.base_model.model, factors)
    return Knot(link, step, rank, alpha, reason, factors, rounding)


def assign(param: torch.Tensor, full: torch.Tensor) -> None:
    """Write the full value `full` into `param`, or into this rank's rows of it when sharded."""
    target, start = local_rows(param)
    with torch.no_grad():
        target.copy_(full[start : start + target.shape[0]].to(target.dtype))
