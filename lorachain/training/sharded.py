"""Sharded loading for `train.parallel: fsdp`: no rank ever holds the whole model.

The model is built on the meta device (parameters without memory; buffers such as RoPE's `inv_freq`
computed on the CPU at construction), sharded with FSDP2 (`parallel.shard_base`), materialised with
`to_empty` (only this rank's rows are allocated), its buffers put back, and then each rank fills its
own rows from the safetensors files:

- `map` (the default): a shard whose rows are the file's bytes as they are (the same dtype, a full
  chunk, CPU, not tied) becomes a private map of them: file-backed pages the ranks share through the
  page cache, copied page by page only where written (a knot, a resume), as `from_pretrained`'s
  mmap'd weights are on one process; the others are read as below;
- `read`: each rank reads the byte ranges of its own rows straight into its shard (`readinto`);
- `broadcast`: rank 0 reads each tensor and scatters the rows (for ranks that cannot see the files).

GGUF files and hub ids are converted or downloaded to a safetensors folder first (rank 0, then the
others). A folder without safetensors is loaded whole and sharded after, as before.

A torchao NF4 base (`model.quant_backend: torchao`) is made NF4 on the meta device before it is
sharded, and each rank quantizes the rows it reads (`nf4_torchao.shard_of`), one weight at a time:
no rank holds more than its rows of one weight in full precision.
"""

from __future__ import annotations

import json
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lorachain.chain.shards import local_rows
from lorachain.chain.sidepath import is_nf4
from lorachain.config import ConfigError, ModelConfig
from lorachain.models import DTYPES, best_device, load_model, not_loadable, resolve_path
from lorachain.training import nf4_torchao
from lorachain.training.heap import return_freed_memory
from lorachain.training.parallel import Dist, shard_base
from lorachain.training.quantization import DTYPES as COMPUTE_DTYPES
from lorachain.training.quantization import compute_dtype_modules, linear_names

LOADS = ("map", "read", "broadcast")
ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
BLOCK = 64 * 1024**2  # bytes read at a time when a tensor's file dtype differs from the model's


@dataclass(frozen=True)
class Entry:
    """Where one tensor lies in a safetensors file."""

    file: Path
    offset: int  # byte offset of its first element in the file
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def row_bytes(self) -> int:
        n = 1
        for d in self.shape[1:]:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


def read_header(file: Path) -> dict[str, Entry]:
    """The tensors of one safetensors file, from its JSON header alone."""
    with open(file, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return {
        k: Entry(file, 8 + size + v["data_offsets"][0], ST_DTYPES[v["dtype"]], tuple(v["shape"]))
        for k, v in header.items()
    }


def safetensors_index(folder: Path) -> dict[str, Entry] | None:
    """Every tensor of the folder's safetensors checkpoint (one file or an index of shards); None if
    the folder has no safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    entries: dict[str, Entry] = {}
    for name in files:
        entries.update(read_header(folder / name))
    return entries or None


def weights_folder(mcfg: ModelConfig, dist: Dist) -> Path:
    """The local folder of the model `mcfg` names: GGUF converted, a hub id downloaded (rank 0 first,
    so the others find it cached)."""
    path = None
    for turn in (0, 1):
        if (dist.rank == 0) == (turn == 0):
            path = resolve_path(mcfg)
            if not Path(path).is_dir():
                path = _download(path)
        dist.barrier()
    return Path(path)


def _download(repo: str) -> str:
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
    except Exception as e:  # offline, unknown id, no access: one line, as models.load_model says it
        raise not_loadable(repo, "model", e) from None


def build_on_meta(folder: Path, mcfg: ModelConfig) -> nn.Module:
    """The causal LM of `folder`'s config with its parameters on meta (tied ones still tied) and its
    buffers computed on the CPU."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise not_loadable(str(folder), "model", e) from None
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[mcfg.dtype])
    model.tie_weights()  # accelerate's meta parameters are new objects: tie them again
    try:
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(folder)
    except OSError:
        pass
    return model.eval()


def load_sharded(
    mcfg: ModelConfig,
    dist: Dist,
    offload: bool = False,
    how: str = "map",
    targets=(),
    autocast: torch.dtype | None = None,
) -> nn.Module:
    """The base model `mcfg` names, sharded with FSDP2 as it loads (see the module docstring). An NF4
    base's `quantization.compute_dtype_modules` (for LoRA `targets` under `autocast`) are made in the
    compute dtype before sharding, as `quantization.prepare` makes them on one process."""
    if how not in LOADS:
        raise ConfigError(f"train.fsdp_load: expected one of {LOADS}, got {how!r}")
    folder = weights_folder(mcfg, dist)
    entries = safetensors_index(folder)
    if entries is None:
        warnings.warn(
            f"{folder}: no safetensors; loading the whole model on every rank, then sharding", stacklevel=2
        )
        model = load_model(mcfg)
        make_nf4(model, mcfg, dist, targets, autocast)
        return shard_base(model, offload)
    return_freed_memory()
    model = build_on_meta(folder, mcfg)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    nf4 = make_nf4(model, mcfg, dist, targets, autocast)  # (shapes only, on meta)
    shard_base(model, offload)
    model.to_empty(device="cpu" if offload else best_device())
    with torch.no_grad():
        for name, b in model.named_buffers():  # to_empty left them uninitialised (RoPE's inv_freq)
            b.copy_(buffers[name])
    mapped = map_shards(model, entries) if how == "map" and not offload else set()
    fill_shards(model, entries, dist, how, skip=mapped | nf4)
    fill_nf4(model, entries, dist, how, nf4)
    return model


def make_nf4(model: nn.Module, mcfg: ModelConfig, dist: Dist, targets=(), autocast=None) -> set[str]:
    """When `mcfg` asks for a torchao NF4 base: its Linears as NF4Tensors and its
    `compute_dtype_modules` in the compute dtype, in place. Returns the quantized parameters' names
    (none otherwise)."""
    if mcfg.quantization == "none" or mcfg.quant_backend != "torchao":
        return set()
    dtype = COMPUTE_DTYPES[mcfg.compute_dtype]
    done = nf4_torchao.quantize_linears(model, linear_names(model), dtype, dist.world)
    for module in compute_dtype_modules(model, mcfg, targets, autocast):
        module.to(dtype)
    return done


def fill_nf4(model: nn.Module, entries: dict[str, Entry], dist: Dist, how: str, names: set[str]) -> None:
    """Quantize this rank's rows of each NF4 weight of `names` from the checkpoint, one at a time."""
    for name in sorted(names):
        param = model.get_parameter(name)
        entry = entries[checkpoint_key(model, name, entries)]
        if tuple(entry.shape) != tuple(param.shape):
            shapes = f"{list(entry.shape)} in the checkpoint, {list(param.shape)} here"
            raise ConfigError(f"model.name_or_path: {name} is {shapes}")
        local, start = local_rows(param)
        rows = torch.empty(local.shape, dtype=entry.dtype)  # (rows / world, in), full precision
        if how == "broadcast" and dist.world > 1:
            scatter_rows(entry, rows, dist)
        else:
            read_rows(entry, start, rows)
        shard = nf4_torchao.shard_of(param, rows.to(local.device))
        model.load_state_dict({name: shard}, strict=False, assign=True)  # FSDP2 adopts the new shard
        del rows, shard


def checkpoint_key(model: nn.Module, name: str, entries: dict[str, Entry]) -> str:
    """The checkpoint's name for parameter `name`: itself, with or without the base model prefix, or
    a weight it is tied to."""
    prefix = getattr(model, "base_model_prefix", "") + "."
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    names = [name, name.removeprefix(prefix), prefix + name]
    names += [s for t, s in tied.items() if t == name] + [t for t, s in tied.items() if s == name]
    for key in names:
        if key in entries:
            return key
    raise ConfigError(f"model.name_or_path: the checkpoint has no tensor for {name} (nor a tied one)")


def fill_shards(
    model: nn.Module, entries: dict[str, Entry], dist: Dist, how: str = "read", skip: set[str] = frozenset()
) -> None:
    """Fill this rank's rows of every parameter (and checkpointed buffer) of `model` but `skip` from
    `entries`."""
    tensors = list(model.named_parameters()) + [
        (n, b) for n, b in model.named_buffers() if n in entries
    ]  # named_parameters gives tied weights once
    for name, t in tensors:
        if name in skip:
            continue
        entry = entries[checkpoint_key(model, name, entries)]
        if tuple(entry.shape) != tuple(t.shape):
            raise ConfigError(
                f"model.name_or_path: {name} is {list(entry.shape)} in the checkpoint, {list(t.shape)} here"
            )
        target, start = local_rows(t)
        with torch.no_grad():
            if how == "broadcast" and dist.world > 1:
                scatter_rows(entry, target, dist)
            else:
                read_rows(entry, start, target)


def map_shards(model: nn.Module, entries: dict[str, Entry]) -> set[str]:
    """Make each shard that can be the file's bytes as they are a private map of them (CPU, the file's
    dtype, a full chunk of rows, not tied): file-backed pages, shared by the ranks through the page
    cache, that a write (a knot, a resume) copies page by page. Returns the names mapped."""
    import mmap
    from collections import Counter

    from torch.distributed.tensor import DTensor

    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    maps: dict[Path, mmap.mmap] = {}
    state = {}
    for name, t in model.named_parameters():
        entry = entries.get(checkpoint_key(model, name, entries))
        if entry is None or not isinstance(t, DTensor) or uses[id(t)] > 1 or entry.dtype != t.dtype:
            continue
        if is_nf4(t):
            continue  # (quantized from its rows: fill_nf4)
        local, start = local_rows(t)
        if (
            local.device.type != "cpu"
            or not local.numel()
            or local.shape[0] != -(-t.shape[0] // t.device_mesh.size())
        ):
            continue  # (a short last chunk is padded by FSDP: a copy either way)
        if entry.file not in maps:
            with open(entry.file, "rb") as f:
                maps[entry.file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # MAP_PRIVATE
        offset = entry.offset + start * entry.row_bytes
        view = torch.frombuffer(maps[entry.file], dtype=entry.dtype, count=local.numel(), offset=offset)
        state[name] = DTensor.from_local(
            view.view(local.shape),
            t.device_mesh,
            t.placements,
            run_check=False,
            shape=t.shape,
            stride=t.stride(),
        )
    # FSDP2 adopts an assigned local tensor of the padded size as the shard's storage, without a copy
    model.load_state_dict(state, strict=False, assign=True)
    return set(state)


def read_rows(entry: Entry, start: int, out: torch.Tensor) -> None:
    """Read rows [start, start + len(out)) of `entry` into `out` (converting the dtype if needed)."""
    if not out.numel():
        return
    if not (out.is_contiguous() and out.device.type == "cpu"):  # a GPU shard: through a CPU copy
        tmp = torch.empty(out.shape, dtype=out.dtype)
        read_rows(entry, start, tmp)
        out.copy_(tmp)
        return
    rows = out.shape[0] if out.dim() else 1
    flat = out.view(rows, -1)  # (rows, row elements), the shard's own storage
    direct = out.dtype == entry.dtype
    step = rows if direct else max(1, BLOCK // max(1, entry.row_bytes))
    with open(entry.file, "rb", buffering=0) as f:
        for r in range(0, rows, step):
            n = min(step, rows - r)
            f.seek(entry.offset + (start + r) * entry.row_bytes)
            if direct:
                _read_into(f, flat[r : r + n].view(-1).view(torch.uint8))
            else:
                buf = torch.empty(n * entry.row_bytes, dtype=torch.uint8)
                _read_into(f, buf)
                flat[r : r + n].copy_(buf.view(entry.dtype).view(n, -1))


def _read_into(f, buf: torch.Tensor) -> None:
    view, done = memoryview(buf.numpy()), 0
    while done < len(view):
        got = f.readinto(view[done:])
        if not got:
            raise ConfigError(f"model.name_or_path: {f.name} ends early (a truncated download?)")
        done += got


def scatter_rows(entry: Entry, out: torch.Tensor, dist: Dist) -> None:
    """Rank 0 reads the whole tensor of `entry` and sends each rank its rows (chunked like FSDP2)."""
    import torch.distributed as tdist

    n = entry.shape[0] if entry.shape else 1
    chunk = -(-n // dist.world)
    rest = entry.shape[1:]
    recv = torch.empty((chunk, *rest), dtype=entry.dtype)
    parts = None
    if dist.rank == 0:
        full = torch.zeros((chunk * dist.world, *rest), dtype=entry.dtype)  # (world·chunk, ...) padded
        read_rows(entry, 0, full[:n])
        parts = list(full.split(chunk))
    tdist.scatter(recv, parts, src=0)
    if out.numel():
        out.copy_(recv[: out.shape[0]].reshape(out.shape))


def is_sharded(model: nn.Module) -> bool:
    """Whether `model` is already sharded with FSDP2 (`fully_shard`)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)
