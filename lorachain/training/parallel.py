"""Data parallelism over torch.distributed, for runs started by `torchrun` or `accelerate launch`.

`train.parallel` picks how the ranks share the work (`auto`: `ddp` when launched on several
processes, else `none`):

- `ddp`: every rank holds the whole model; PyTorch's `DistributedDataParallel` sums the trainable
  gradients in buckets, overlapped with the backward pass.
- `fsdp`: the frozen base is sharded per decoder layer with FSDP2 (`fully_shard`), so each rank
  holds 1/world of every base weight; the LoRA factors stay whole on every rank (they are small)
  and are reduced by DDP as above. Knots add into each rank's local rows (`chain/shards.py`). A 4-bit
  base shards as torchao NF4Tensors (`model.quant_backend: torchao`, `training/nf4_torchao.py`).

Every rank takes its share of each global micro-batch. The loss is a sum over the global batch
divided by its size; DDP averages gradients over ranks, so each rank's loss is multiplied by the
world size (`loss_scale`) and the reduced gradient is that of the single-process run with the same
global batch. Only rank 0 writes files.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import gc
import os
import sys
from dataclasses import dataclass

import torch
from torch import nn

from lorachain.config import ConfigError

TIMEOUT_ENV = "LORACHAIN_DIST_TIMEOUT"  # seconds a collective waits for a dead rank (default 300)


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    mode: str = "none"  # none | ddp | fsdp (see the module docstring)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.mode == "fsdp"

    def shard(self, items: list) -> list:
        """This rank's share of a global micro-batch."""
        return items[self.rank :: self.world]

    def wrap(self, model: nn.Module) -> nn.Module:
        """`model` under DistributedDataParallel over its trainable parameters (the model itself for
        one process). Re-wrap at every link: a new link brings new parameters."""
        if self.mode == "none":
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
        # the frozen base (FSDP DTensors under fsdp) and buffers are equal on all ranks: no broadcast
        DDP._set_params_and_buffers_to_ignore_for_model(model, frozen + [n for n, _ in model.named_buffers()])
        device = next(model.parameters()).device
        ids = [device.index] if device.type == "cuda" else None
        return DDP(model, device_ids=ids, init_sync=False)

    def loss_scale(self, model: nn.Module) -> float:
        """What each rank's share of the loss is multiplied by, so that DDP's average over ranks is
        the single-process gradient of the global batch."""
        if self.mode == "none":
            return 1.0
        if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
            raise RuntimeError("train.parallel: the model must be wrapped with Dist.wrap before training")
        return float(self.world)

    def accumulate(self, model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
        """Around forward and backward of a micro-batch: gradients are reduced only when `sync`
        (the last micro-batch of a step); before that they accumulate locally."""
        if self.mode == "none" or sync:
            return contextlib.nullcontext()
        return model.no_sync()

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def sum(self, value: float) -> float:
        return self.reduce(value, "sum")

    def reduce(self, value: float, op: str = "sum") -> float:
        """`value` summed (or `max`ed) over the ranks."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return float(t.item())


def init_dist(parallel: str = "auto") -> Dist:
    """The process group of this launch (torchrun or accelerate launch: gloo on CPU, NCCL on GPUs),
    or a single process when not launched distributed. `parallel` is `train.parallel`."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        if parallel == "fsdp":
            raise ConfigError(
                "train.parallel: fsdp needs a process group of 2 or more ranks; launch with "
                "`torchrun --nproc-per-node N` (or use none/ddp)"
            )
        return Dist()
    if parallel == "none":
        raise ConfigError(
            f"train.parallel: none, but launched on {world} processes (WORLD_SIZE); use ddp or fsdp, "
            "or run one process"
        )
    import torch.distributed as dist

    if not dist.is_initialized():  # (Accelerate may have done it already)
        timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "300")))
        cuda = torch.cuda.is_available()
        if cuda:  # the launcher's device for this rank
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    mode = "ddp" if parallel == "auto" else parallel
    return Dist(dist.get_rank(), dist.get_world_size(), mode)


def end_launch(code: int) -> int:
    """End this process of a distributed launch with exit status `code`; `code` itself when there is
    no process group. All ranks meet at a barrier (after success), the group is destroyed and the
    atexit handlers run (trackers flush), then the process exits without Python's interpreter
    teardown: there, gloo's worker threads may still free tensors, which needs the GIL of a
    finalizing interpreter, and glibc aborts ("terminate called without an active exception", seen on
    rank 1 in CI; pytorch/pytorch#179291)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return code
    if code == 0:
        dist.barrier()  # no rank tears gloo down while another still talks to it
    dist.destroy_process_group()
    gc.collect()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks FSDP shards one by one: transformers' `_no_split_modules` classes."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ConfigError(
            f"train.parallel: fsdp cannot find the decoder layers of {type(model).__name__} "
            "(no _no_split_modules); use ddp"
        )
    return layers


def shard_base(model: nn.Module, offload: bool = False) -> nn.Module:
    """Shard `model` (the frozen base, before any LoRA) in place with FSDP2: each decoder layer, the
    input embeddings and the head when they are not tied (each gathered only while it runs), then the
    root. Its weights become DTensors holding 1/world of the rows on each rank; a forward gathers one
    unit at a time. The device mesh is given explicitly (gloo on CPU, NCCL on GPUs)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    mesh = init_device_mesh("cuda" if torch.cuda.is_available() else "cpu", (dist.get_world_size(),))
    policy = CPUOffloadPolicy() if offload else OffloadPolicy()
    units = decoder_layers(model)
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if inp is not None and out is not None and out.weight is not inp.weight:  # tied: both in the root
        units += [inp, out]
    for unit in units:
        fully_shard(unit, mesh=mesh, offload_policy=policy)
    fully_shard(model, mesh=mesh, offload_policy=policy)
    return model


def check_parallel(cfg, dist: Dist) -> None:
    """Refuse, in one line and before any slow work, what this launch cannot run (`cfg` a RunConfig)."""
    t = cfg.train
    if dist.world > 1 and t.batch_size % dist.world:
        raise ConfigError(
            f"train.batch_size: {t.batch_size} does not divide among {dist.world} processes; use a "
            f"multiple of {dist.world} (it is the global batch, shared by the ranks)"
        )
    if not dist.sharded:
        return
    if cfg.chain.method == "full":
        raise ConfigError(
            "train.parallel: fsdp shards the frozen base of a LoRA chain; for full fine-tuning use ddp"
        )
    if cfg.model.task == "classification":
        raise ConfigError("train.parallel: fsdp does not shard a classifier's new head yet; use ddp")
    m = cfg.model
    if m.quantization != "none" and m.quant_backend != "torchao":
        raise ConfigError(
            f"model.quant_backend: fsdp does not shard a bitsandbytes {m.quantization} base (FSDP2 splits "
            "Params4bit's packed bytes without their quant state, axolotl#2992); use model.quantization: "
            "nf4 with model.quant_backend: torchao, or train.parallel: ddp"
        )
    if m.quant_backend == "torchao" and m.quantized_knot != "side":
        raise ConfigError(
            "model.quantized_knot: under fsdp a knot on an NF4 base is a side path; requantize needs "
            "whole weights (use side, or ddp)"
        )
    if cfg.chain.use_dora:
        raise ConfigError(
            "chain.use_dora: fsdp ties knots on shards, and a DoRA knot needs whole rows; use ddp"
        )
    if cfg.chain.moving_inits():
        raise ConfigError(
            f"{cfg.chain.moving_inits()[0]}: fsdp ties knots on shards, and a link that starts away from "
            "zero is not sharded yet; use gaussian or kaiming, or ddp"
        )
