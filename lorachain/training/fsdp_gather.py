"""How an fsdp rank gathers a unit of the base (`train.fsdp_all_gather`), and which units gather when.

- `process_group`: FSDP2's all-gather through the process group (NCCL on GPUs, gloo on CPUs).
- `shared_memory`: CPU ranks on one host gather through a shared-memory arena. FSDP2 copies each
  rank's shard into its slot of the all-gather buffer; here that buffer is a slot of a `/dev/shm`
  mapping every rank shares, so after one barrier every rank reads the whole unit from it: no bytes
  go through a socket. gloo moves them over loopback TCP, measured at 0.26-0.28 GiB/s a rank on
  this repository's 2-core machine where a copy of the same bytes runs at 3.8-4.3 GiB/s; an fsdp
  step was 7.3x a ddp step over gloo, 2.8x through shared memory (benchmarks/fsdp_profile.py).
- `auto`: shared memory when the shards are on the CPU, every rank runs on this host and FSDP2
  takes a custom all-gather (`FSDPModule.set_custom_all_gather`); else the process group.

The arena holds `SLOTS` buffers of the largest unit, used in turn: a buffer is written again three
gathers later. FSDP2 copies each gather out before it issues the next one (it prefetches one unit
at most), so two would do and the third is spare: no rank overwrites a buffer another still reads.
The arena is unlinked once every rank has mapped it: its memory goes when the last rank exits,
killed or not. Its pages are shared (RssShmem), not anonymous; a unit bigger than a slot, or a
gather off the CPU, goes through the process group.

`schedule` also sets what gathers when: the input embeddings are not gathered again for the
backward (fsdp trains LoRA factors on a frozen base, and a frozen embedding's backward does not
read its weight; PEFT makes their output require grad, which made FSDP2 gather them), and
`train.fsdp_reshard_after_forward: false` keeps every unit gathered from its forward to its backward
(one all-gather a step instead of two, but the whole model on every rank at the end of the forward).
"""

from __future__ import annotations

import math
import os
import socket
import tempfile
from pathlib import Path

import torch
from torch import nn

from lorachain.config import ConfigError

ALL_GATHERS = ("auto", "shared_memory", "process_group")
SLOTS = 3
SHM = Path("/dev/shm")


def units(model: nn.Module) -> list[nn.Module]:
    """The FSDP2 units of `model` (every `fully_shard`ed module), the root first."""
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def gathered_bytes(model: nn.Module, world: int) -> list[int]:
    """Bytes of each unit's all-gather buffer: its own sharded parameters (not a nested unit's),
    each padded to ceil(rows / world) rows on every rank; a tensor subclass that gathers its own
    parts (torchao's NF4: codes and scalers) counts its parts' bytes."""
    from torch.distributed.tensor import DTensor

    owned: set[int] = set()
    sizes = []
    for unit in units(model)[::-1]:  # nested units before the ones that hold them
        size = 0
        for p in unit.parameters():
            if id(p) in owned or not isinstance(p, DTensor):
                continue
            owned.add(id(p))
            local = p.to_local()
            if hasattr(local, "fsdp_pre_all_gather"):  # its inner tensors, a little more than it sends
                names, _ = local.__tensor_flatten__()
                size += sum(getattr(local, n).nbytes for n in names) * world
                continue
            rows = p.shape[0] if p.dim() else 1
            size += -(-rows // world) * (p.numel() // max(rows, 1)) * p.element_size() * world
        sizes.append(size)
    return sizes


try:  # FSDP2's custom all-gather interface (recent torch only)
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather

    CUSTOM = hasattr(FSDPModule, "set_custom_all_gather")
except ImportError:
    AllGather, CUSTOM = object, False


def on_one_host() -> bool:
    """Whether every rank of the default process group runs on this host (same name, same boot).
    Collective."""
    import torch.distributed as dist

    boot = Path("/proc/sys/kernel/random/boot_id")
    me = (socket.gethostname(), boot.read_text().strip() if boot.is_file() else "")
    hosts: list = [None] * dist.get_world_size()
    dist.all_gather_object(hosts, me)
    return len(set(hosts)) == 1


def shared_memory_reason(model: nn.Module) -> str:
    """Why the shared-memory all-gather cannot serve `model`'s ranks ('' when it can). Collective."""
    same = on_one_host()  # every rank calls it, whatever the answer
    if not CUSTOM:
        return f"torch {torch.__version__}'s FSDP2 takes no custom all-gather (set_custom_all_gather)"
    if any(p.device.type != "cpu" for p in model.parameters()):
        return "the shards are not on the CPU (GPUs gather with NCCL)"
    if not same:
        return "the ranks run on more than one host"
    if not (SHM.is_dir() and os.access(SHM, os.W_OK)):
        return f"{SHM} is not a writable directory"
    return ""


class SharedMemoryGather(AllGather):
    """FSDP2 all-gather buffers in a shared arena: the copy-in writes this rank's slot, a barrier
    completes the gather. A buffer that does not fit a slot goes through the process group."""

    def __init__(self, arena: torch.Tensor, slot: int, slots: int = SLOTS) -> None:
        self.arena, self.slot, self.slots, self.turn = arena, slot, slots, 0
        self.base = arena.untyped_storage().data_ptr()
        self.shared = 0  # gathers served through the arena

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        nbytes = math.prod(int(s) for s in size) * torch.empty((), dtype=dtype).element_size()
        if device.type != "cpu" or nbytes > self.slot:
            return torch.empty(*size, dtype=dtype, device=device)
        start = (self.turn % self.slots) * self.slot
        self.turn += 1
        return self.arena[start : start + nbytes].view(dtype).view(*size)

    def __call__(self, output_tensor, input_tensor, group, async_op: bool = False):
        import torch.distributed as dist

        if output_tensor.untyped_storage().data_ptr() == self.base:
            self.shared += 1
            dist.barrier(group=group)  # every rank has written its slot
            return None
        return dist.all_gather_into_tensor(output_tensor, input_tensor, group=group, async_op=async_op)


def shared_memory_gather(slot_bytes: int, slots: int = SLOTS) -> SharedMemoryGather | None:
    """A `SharedMemoryGather` over `slots` slots of `slot_bytes` in one mapping of a `/dev/shm` file
    every rank maps, made by rank 0 and unlinked once all have mapped it; None when a rank cannot
    map it or the ranks do not see each other's writes (one host name, but separate /dev/shm, as in
    containers). Collective."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    slot = -(-max(slot_bytes, 4 * world) // 4096) * 4096  # page-aligned slots: any dtype's view fits
    path: list = [None]
    if rank == 0:
        fd, name = tempfile.mkstemp(prefix="lorachain-fsdp-", dir=SHM)
        os.ftruncate(fd, slot * slots)
        os.close(fd)
        path[0] = name
    arena = None
    try:
        dist.broadcast_object_list(path, src=0)
        try:
            arena = torch.from_file(path[0], shared=True, size=slot * slots, dtype=torch.uint8)  # MAP_SHARED
            arena[: 4 * world].view(torch.int32)[rank] = rank + 1  # a mark every rank must see
        except (OSError, RuntimeError):
            arena = None
        dist.barrier()
        marks = arena[: 4 * world].view(torch.int32).tolist() if arena is not None else []
        ok = torch.tensor([int(marks == list(range(1, world + 1)))])
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    finally:
        if rank == 0:
            Path(path[0]).unlink(missing_ok=True)  # mapped by every rank: freed when the last exits
    return SharedMemoryGather(arena, slot, slots) if int(ok) else None


def schedule(
    model: nn.Module, world: int, all_gather: str = "auto", reshard_after_forward: bool = True
) -> str:
    """Set how and when the units of the sharded `model` gather (see the module docstring); returns
    a line for the run's log. Collective: every rank calls it."""
    if all_gather not in ALL_GATHERS:
        raise ConfigError(f"train.fsdp_all_gather: expected one of {ALL_GATHERS}, got {all_gather!r}")
    found = units(model)
    if not found:
        return ""
    inp = model.get_input_embeddings()
    for unit in found[1:]:  # (FSDP2 never reshards the root after its forward)
        if not reshard_after_forward:
            unit.set_reshard_after_forward(False, recurse=False)
        if unit is inp and hasattr(unit, "set_unshard_in_backward"):
            unit.set_unshard_in_backward(False)  # the frozen embeddings' backward reads no weight
    how = "process group"
    if all_gather != "process_group":
        why = shared_memory_reason(model)
        if why and all_gather == "shared_memory":
            raise ConfigError(f"train.fsdp_all_gather: shared_memory is not available here: {why}")
        biggest = max(gathered_bytes(model, world))
        comm = None if why else shared_memory_gather(biggest)
        if comm is None and not why and all_gather == "shared_memory":
            raise ConfigError(f"train.fsdp_all_gather: the ranks do not share {SHM} (separate containers?)")
        if comm is not None:
            for unit in found:
                unit.set_custom_all_gather(comm)
            how = f"shared memory ({SLOTS} x {biggest / 1024**2:.0f} MiB in {SHM})"
    when = "" if reshard_after_forward else ", kept gathered from forward to backward"
    return f"fsdp all-gather: {how}{when}"
