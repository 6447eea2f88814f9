"""Load a model folder sharded as a torchao NF4 base (`training/sharded.py`), for
tests/test_nf4_torchao.py:

    torchrun --standalone --nproc-per-node 2 tests/nf4_shard_run.py FOLDER OUT_DIR [COMPUTE_DTYPE]

Each rank writes OUT_DIR/rank<r>.json: per NF4 weight its global and local rows and whether its codes
and scalers are those rows of the one-process quantization (also for `train.fsdp_load` read and
broadcast); the logits' max abs difference to the one-process NF4 model (the units gathered as
`setup` sets them: `fsdp_gather.schedule`, auto)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from lorachain.chain.sidepath import is_nf4
from lorachain.config import ModelConfig
from lorachain.models import load_model
from lorachain.training.fsdp_gather import gathered_bytes, schedule, units
from lorachain.training.parallel import end_launch, init_dist
from lorachain.training.quantization import quantized_base
from lorachain.training.sharded import load_sharded

PARTS = ("quantized_data", "quantized_scalers", "quantization_factor")


def same_rows(local, whole, rank: int) -> bool:
    """Whether the NF4 shard `local` holds rank `rank`'s equal share of every part of `whole`."""
    for part in PARTS:
        mine, all_ = getattr(local, part), getattr(whole, part)
        n = mine.numel()
        if all_.numel() != n * 2 or not torch.equal(all_[rank * n : (rank + 1) * n], mine):
            return False
    return torch.equal(local.scaler_mean, whole.scaler_mean)


if __name__ == "__main__":
    folder, out = sys.argv[1], Path(sys.argv[2])
    dtype = sys.argv[3] if len(sys.argv) > 3 else "float32"
    mcfg = ModelConfig(name_or_path=folder, quantization="nf4", quant_backend="torchao", compute_dtype=dtype)
    dist = init_dist("fsdp")
    model = load_sharded(mcfg, dist)
    gather = schedule(model, dist.world)
    one = quantized_base(load_model(mcfg), mcfg)  # the whole model, quantized on this process
    weights = {}
    for name, p in model.named_parameters():
        if is_nf4(p):
            local = p.to_local()
            weights[name] = {
                "rows": p.shape[0],
                "local_rows": local.shape[0],
                "local_nf4": type(local).__name__ == "NF4Tensor",
                "same_rows": same_rows(local, one.get_parameter(name), dist.rank),
            }
    x = torch.tensor([[2, 10, 11, 12, 13, 14, 15, 16], [2, 20, 21, 22, 23, 24, 25, 26]])
    with torch.no_grad():
        diff = float((model(input_ids=x).logits - one(input_ids=x).logits).abs().max())
    embed = str(model.get_input_embeddings().weight.dtype).removeprefix("torch.")
    layer = model.model.layers[0]  # the arena's slot for a decoder layer, against its fp32 size
    fp32 = sum(p.numel() * 4 for p in layer.parameters())
    slot = gathered_bytes(model, dist.world)[units(model).index(layer)]
    row = {"weights": weights, "logits_max_abs": diff, "gather": gather, "embed_dtype": embed}
    row |= {"layer_gather_bytes": slot, "layer_fp32_bytes": fp32}
    for how in ("read", "broadcast"):  # the other train.fsdp_load ways give the same shards
        other = load_sharded(mcfg, dist, how=how)
        named = [(n, p) for n, p in other.named_parameters() if is_nf4(p)]
        row[how] = len(named) == len(weights) and all(
            same_rows(p.to_local(), one.get_parameter(n), dist.rank) for n, p in named
        )
    (out / f"rank{dist.rank}.json").write_text(json.dumps(row))
    end_launch(0)
