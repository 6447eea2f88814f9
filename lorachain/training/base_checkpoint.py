"""The knotted base of a checkpoint, saved with `torch.distributed.checkpoint` (DCP) once per knot.

The base changes only at knots, so `out/base-K/` (K = the knots tied so far) is written once, after
the K-th knot, by every rank in parallel: each rank its own shards under fsdp, one copy of a
replicated base otherwise. `checkpoint.pt` (resume.py: the link, the optimizer, the chain's position,
replicated and small) names the folder it goes with. A resume loads that folder into the model it
just built, at any world size (DCP reshards: 2 → 1, 1 → 2), instead of replaying the knots.

A folder is written as `base-K.tmp` and renamed when complete; `checkpoint.pt` is written after it
and the older folders are removed after that, so a kill at any moment leaves the last complete
checkpoint and the folder it names. Saved when `train.base_checkpoint` says so (default: under fsdp)
and the base's weights are its exact values: not a quantized base, not fp32 masters held beside
low-precision copies, not a link init that moves the base (those resume by replaying the knots).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch
from torch import nn

from lorachain.chain.knot import reshard

PREFIX = "base-"
METADATA = ".metadata"  # the file DCP writes last


def base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base's weights by their plain names (a PEFT wrapper's `base_layer` removed, LoRA factors
    and trained heads left out, tied weights once), as DTensors under fsdp."""
    reshard(model)  # a forward without backward leaves the root gathered
    state = {}
    for name, p in model.named_parameters():
        if "lora_" in name or "modules_to_save" in name:
            continue
        state[name.replace(".base_layer.", ".").replace(".original_module.", ".")] = p
    return state


def enabled(cfg, setup) -> bool:
    """Whether this run saves its base at knots (`cfg` a RunConfig, `setup` training.setup.Setup)."""
    want = cfg.train.base_checkpoint
    want = setup.dist.sharded if want is None else want
    return bool(want and exact(cfg, setup))


def exact(cfg, setup) -> bool:
    """Whether the model's base weights are the chain's exact base (W₀ + the knots), nothing else."""
    plain = cfg.model.quantization == "none" and not setup.masters and cfg.chain.method != "full"
    return plain and not cfg.chain.moving_inits()


def save_base(out: Path, model: nn.Module, knots: int, cfg, setup) -> str | None:
    """Write `out/base-<knots>/` unless it exists (every rank calls this); its name, or None when
    this run does not save its base."""
    if not enabled(cfg, setup):
        return None
    import torch.distributed.checkpoint as dcp

    name = f"{PREFIX}{knots}"
    if (out / name / METADATA).is_file():
        return name
    tmp = out / f"{name}.tmp"
    if setup.dist.main:
        shutil.rmtree(tmp, ignore_errors=True)
    setup.dist.barrier()
    with torch.no_grad():
        dcp.save(base_state(model), checkpoint_id=str(tmp))
    setup.dist.barrier()  # every rank's shards are written
    if setup.dist.main:
        tmp.rename(out / name)
    setup.dist.barrier()
    return name


def prune(out: Path, keep: str | None) -> None:
    """Remove every base folder but `keep` (rank 0, after checkpoint.pt names `keep`)."""
    for path in out.glob(f"{PREFIX}*"):
        if path.is_dir() and path.name != keep and re.fullmatch(rf"{PREFIX}\d+(\.tmp)?", path.name):
            shutil.rmtree(path, ignore_errors=True)


def load_base(out: Path, ck: dict, model: nn.Module, cfg, setup) -> bool:
    """Load the base folder the checkpoint `ck` (resume.load's) names into `model` (built as at the
    start, sharded or not) in place; False when there is none to load here (then the knots are
    replayed)."""
    name, knots = ck.get("base"), len(ck["knots"])
    if not name or name != f"{PREFIX}{knots}" or not (out / name / METADATA).is_file():
        return False
    if not exact(cfg, setup):
        return False
    import torch.distributed.checkpoint as dcp

    with torch.no_grad():
        dcp.load(base_state(model), checkpoint_id=str(out / name))
    return True
