"""ChainCallback's knot on a hand-wrapped FSDP2 PEFT model (LoRA factors sharded too, as Accelerate's
FSDP2 does), against the same callback on an unsharded copy; for the tests:

    torchrun --standalone --nproc-per-node 2 tests/fsdp_callback.py OUT.json
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from conftest import tiny_model  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402

from lorachain.chain.knot import ADAPTER, extend, lora_config, lora_layers  # noqa: E402
from lorachain.chain.shards import shard_factors, sharded  # noqa: E402
from lorachain.config import ChainConfig, from_dict  # noqa: E402
from lorachain.integrations import ChainCallback  # noqa: E402
from lorachain.training.parallel import end_launch  # noqa: E402

CHAIN = {"links": [{"rank": 4, "alpha": 8, "steps": 3}, {"rank": 4, "alpha": 8}], "dropout": 0.0}


def main(out: str) -> None:
    dist.init_process_group("gloo")
    chain = from_dict(ChainConfig, CHAIN)
    torch.manual_seed(0)
    ref = extend(
        tiny_model("llama"), lora_config(chain.links[0], chain, ["q_proj", "v_proj"], False, "causal_lm")
    )
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lora_layers(ref).values():  # a trained-looking link: B non-zero
            layer.lora_B[ADAPTER].weight.normal_(std=0.5, generator=g)
    model = copy.deepcopy(ref)
    for block in model.base_model.model.model.layers:
        fully_shard(block)
    fully_shard(model)
    assert sharded(model) and not sharded(ref)
    ids = torch.randint(4, 60, (2, 10), generator=g)
    state = SimpleNamespace(global_step=3, is_world_process_zero=dist.get_rank() == 0)
    knots = []
    for m in (ref, model):
        cb = ChainCallback(chain, seed=0)
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=0.01)
        m(input_ids=ids).logits.sum().backward()
        opt.step()  # optimizer state to be dropped by the knot
        opt.zero_grad()
        cb._tie(state, m, opt, None, "test")
        knots.append(cb.knots[0])
        assert not opt.state, "the knot resets the optimizer"
    full = {n: p.full_tensor() if hasattr(p, "full_tensor") else p for n, p in model.named_parameters()}
    diffs = {n: float((full[n] - p).detach().abs().max()) for n, p in ref.named_parameters()}
    with torch.no_grad():
        logits = float((model(input_ids=ids).logits - ref(input_ids=ids).logits).abs().max())
    factors = max(
        float((knots[0].factors[n].B - knots[1].factors[n].B).abs().max()) for n in knots[0].factors
    )
    ends = {n: shard_factors(layer).A.shape for n, layer in lora_layers(model).items()}
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    if dist.get_rank() == 0:
        result = {
            "max_param_diff": max(diffs.values()),
            "max_logit_diff": logits,
            "max_factor_diff": factors,
            "rounding": knots[1].rounding,
            "local_shape": list(q.base_layer.weight.to_local().shape),
            "lora_A_local_shape": list(q.lora_A[ADAPTER].weight.to_local().shape),
            "gathered_A_shapes": sorted({tuple(s) for s in ends.values()}),
        }
        Path(out).write_text(json.dumps(result))
    end_launch(0)  # barrier, destroy, exit without the interpreter teardown (a SIGABRT in CI)


if __name__ == "__main__":
    main(sys.argv[1])
