"""A 4-bit NF4 frozen base held by torchao (`model.quant_backend: torchao`): the one FSDP2 shards.

torchao's `NF4Tensor` keeps a weight as 4-bit codes, one absmax per block of 64 weights (itself
int8, less the mean of all absmaxes, with one factor per group of `scaler_block_size` blocks) and
implements FSDP2's all-gather hooks: a rank holds its rows' codes and scalers, and a unit gathers
those (about 0.52 bytes a weight) rather than fp32. Its matmul dequantizes the weight to the dtype it
was quantized from (`model.compute_dtype`) and runs in the input's dtype.

Sizes: torchao's blocks of 64 and groups of 256 blocks, but a weight whose block count is not a
multiple of 8·256 (any under 131k weights: tiny test models) takes the largest power-of-two group
that leaves a multiple of 8 groups, so every weight splits into whole groups over up to 8 ranks;
the rule does not depend on the world size, so one process and N ranks quantize alike.

Under fsdp each rank quantizes only its own rows (`shard_of`): the per-block absmaxes (1/64 of the
weight) are all-gathered for the one mean over the whole weight, the rest is local, so the shards
are the rows of the one-process quantization (the mean equal up to the order of its sum).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from lorachain.config import ConfigError

VERSION = "0.18.0"
INSTALL = f"pip install torchao=={VERSION}"
BLOCK = 64  # weights per absmax
SCALER_BLOCK = 256  # absmaxes per double-quantization group (torchao's default)
MAX_WORLD = 8  # ranks every weight can be sharded over (whole groups on each)


def require_torchao():
    """torchao's NF4 module, or one ConfigError line saying how to install it."""
    log = logging.getLogger("torchao")  # it warns about CUDA kernels it cannot load on a CPU build
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torchao.quantization.quantize_.workflows.nf4 import nf4_tensor
    except ImportError:
        raise ConfigError(f"model.quant_backend: torchao is not installed; {INSTALL}") from None
    finally:
        log.setLevel(level)
    return nf4_tensor


def scaler_block_size(numel: int) -> int:
    """The absmaxes per group of a weight of `numel` elements (see the module docstring)."""
    blocks = numel // BLOCK
    size = SCALER_BLOCK
    while size > 1 and blocks % (MAX_WORLD * size):
        size //= 2
    return size


def check_weight(name: str, shape: tuple[int, ...], world: int = 1) -> None:
    """One line if the weight `name` of `shape` cannot be an NF4Tensor sharded over `world` ranks."""
    rows, numel = shape[0], int(torch.Size(shape).numel())
    if numel % BLOCK:
        raise ConfigError(
            f"model.quant_backend: torchao's NF4 needs weights of a multiple of {BLOCK} elements; "
            f"{name} is {list(shape)} (use bitsandbytes)"
        )
    group = BLOCK * scaler_block_size(numel)
    if world > 1 and (rows % world or (numel // world) % group):
        raise ConfigError(
            f"model.quant_backend: torchao's NF4 shards {name} {list(shape)} over {world} ranks only in "
            f"whole groups of {group} weights; use {MAX_WORLD} ranks or fewer, a power of two, or ddp"
        )


def quantize_weight(w: torch.Tensor, dtype: torch.dtype):
    """`w` as an NF4Tensor that dequantizes to `dtype` (its block sizes from `scaler_block_size`)."""
    nf4 = require_torchao()
    return nf4.to_nf4(_own(w.detach(), dtype), BLOCK, scaler_block_size(w.numel()))


def _own(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x` in `dtype`, contiguous and at the start of its storage (an NF4Tensor keeps the storage
    offset of its source as its own, which FSDP2's gathered copy then no longer has)."""
    x = x.to(dtype).contiguous()
    return x if x.storage_offset() == 0 else x.clone()


def quantize_linears(model: nn.Module, names: list[str], dtype: torch.dtype, world: int = 1) -> set[str]:
    """Replace the weight of each Linear of `names` by its NF4Tensor, one at a time (on the meta
    device too: shapes only, for a model sharded before it is filled). Returns the parameter names."""
    require_torchao()
    done = set()
    for name in names:
        linear = model.get_submodule(name)
        check_weight(f"{name}.weight", tuple(linear.weight.shape), world)
        linear.weight = nn.Parameter(quantize_weight(linear.weight, dtype), requires_grad=False)
        if linear.bias is not None:
            linear.bias.requires_grad_(False)
        done.add(f"{name}.weight")
    return done


def _scalers(absmax: torch.Tensor, mean: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torchao's double quantization of block absmaxes about a given `mean`: (int8 codes (blocks,),
    one factor per group (blocks / group,)), with its arithmetic in its order."""
    centred = (absmax - mean).view(-1, group)  # (groups, group)
    factor = 256 / (2 * centred.abs().max(dim=1).values)  # (groups,)
    codes = (centred * factor[:, None]).round().clamp(-128, 127)
    return codes.flatten().to(torch.int8), factor.contiguous()


def shard_of(param, rows: torch.Tensor):
    """This rank's shard of the NF4 weight `param` (an FSDP2 DTensor, dim 0 sharded evenly) quantized
    from its own `rows` as the whole weight is (see the module docstring). Collective over the
    weight's mesh; returns a DTensor to assign in place of `param`."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    nf4 = require_torchao()
    local = param._local_tensor
    dtype, group = local.dtype, local.scaler_block_size
    mesh = param.device_mesh
    x = _own(rows, dtype)  # (rows / world, in)
    q = nf4.to_nf4(x, BLOCK, group)  # its codes are local to each block; its scalers are redone below
    absmax = x.view(-1, BLOCK).abs().max(dim=1).values  # (blocks / world,)
    every = torch.empty(absmax.numel() * mesh.size(), dtype=torch.float32, device=x.device)
    dist.all_gather_into_tensor(every, absmax.float().contiguous(), group=mesh.get_group())
    mean = every.to(dtype).mean()  # exact in dtype: the absmaxes came from it
    q.quantized_scalers, q.quantization_factor = _scalers(absmax, mean, group)
    q.scaler_mean, q.n_blocks = mean, local.n_blocks
    return DTensor.from_local(
        q, mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride()
    )
