"""The fsdp all-gathers on 2 processes, for tests/test_fsdp_gather.py:

    torchrun --standalone --nproc-per-node 2 tests/fsdp_gather_run.py OUT_PREFIX

Three copies of a tiny Llama are sharded with `shard_base` and scheduled with `fsdp_gather.schedule`:
through the process group (gloo), through shared memory, and through shared memory kept gathered
from forward to backward. Each runs a forward and a backward to its input embeddings (every layer's
weight is gathered for the backward) on the same rows; then, after a forward without backward, a
knot is added into the shards and the model runs again. Writes OUT_PREFIX.rankN.json: the schedule's
notes, the outputs' differences between the gathers and from the whole model, how many gathers
went through the arena, whether a layer was still gathered after the forward, and the arena's map."""

from __future__ import annotations

import copy
import json
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lorachain.chain.knot import Factors, apply_factors
from lorachain.chain.shards import apply_on_shards
from lorachain.training.fsdp_gather import schedule, units
from lorachain.training.parallel import end_launch, init_dist, shard_base


def llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=67,  # rows that do not divide by 2: padded shards
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval().requires_grad_(False)  # a frozen base, as under fsdp


def run(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(logits, d sum(logits²) / d the embeddings' output, whether layer 1's q_proj was still
    gathered after the forward). The embeddings' output requires grad, as PEFT makes it."""
    kept = []

    def hook(module, args, out):
        out.requires_grad_(True).retain_grad()
        kept.append(out)

    handle = model.get_input_embeddings().register_forward_hook(hook)
    logits = model(input_ids=ids).logits
    handle.remove()
    gathered = not hasattr(model.model.layers[1].self_attn.q_proj.weight, "to_local")
    logits.square().sum().backward()
    return logits.detach(), kept[0].grad, gathered


def comm_of(model):
    return units(model)[1]._get_fsdp_state()._fsdp_param_groups[0]._all_gather_comm


if __name__ == "__main__":
    out = sys.argv[1]
    dist = init_dist("fsdp")
    ref = llama()
    ids = torch.randint(0, 67, (2, 9), generator=torch.Generator().manual_seed(1))
    factors = {
        f"model.layers.{i}.self_attn.q_proj": Factors(
            A=torch.randn(3, 32, generator=torch.Generator().manual_seed(i)),
            B=torch.randn(32, 3, generator=torch.Generator().manual_seed(10 + i)),
            scale=0.5,
        )
        for i in range(3)
    }
    ref_logits, ref_grad, _ = run(ref, ids)
    knotted = copy.deepcopy(ref)
    apply_factors(knotted, factors)
    with torch.no_grad():
        ref_after = knotted(input_ids=ids).logits
    result = {"notes": {}, "logit_diff": {}, "grad_diff": {}, "after_knot_diff": {}}
    outputs = {}
    for name, how, keep in (
        ("process_group", "process_group", True),
        ("shared_memory", "shared_memory", True),
        ("kept", "shared_memory", False),
    ):
        model = shard_base(llama())
        result["notes"][name] = schedule(model, dist.world, how, reshard_after_forward=keep)
        logits, grad, gathered = run(model, ids)
        outputs[name] = (logits, grad)
        result["logit_diff"][name] = float((logits - ref_logits).abs().max())
        result["grad_diff"][name] = float((grad - ref_grad).abs().max())
        result[f"gathered_after_forward_{name}"] = gathered
        with torch.no_grad():
            model(input_ids=ids)  # a forward without backward (evaluation) before the knot
            result[f"gathered_before_knot_{name}"] = not hasattr(
                model.model.layers[1].self_attn.q_proj.weight, "to_local"
            )
            apply_on_shards(model, factors)
            after = model(input_ids=ids).logits
        result["after_knot_diff"][name] = float((after - ref_after).abs().max())
        result[f"shared_gathers_{name}"] = getattr(comm_of(model), "shared", None)
    pg, shm = outputs["process_group"], outputs["shared_memory"]
    result["bitwise_equal_gathers"] = all(torch.equal(a, b) for a, b in zip(pg, shm)) and all(
        torch.equal(a, b) for a, b in zip(shm, outputs["kept"])
    )
    maps = [line.split(maxsplit=5)[-1].strip() for line in open("/proc/self/maps")]
    result["arena_maps"] = sorted({m for m in maps if "lorachain-fsdp-" in m})
    with open(f"{out}.rank{dist.rank}.json", "w") as f:
        json.dump(result, f)
    end_launch(0)
