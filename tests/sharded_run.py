"""Sharded loading on N processes, for tests/test_sharded.py:

    torchrun --standalone --nproc-per-node 2 tests/sharded_run.py MODEL_DIR DTYPE HOW OUT_PREFIX

Loads MODEL_DIR with `training.sharded.load_sharded` (DTYPE float32 | bfloat16, HOW map | read |
broadcast) and writes OUT_PREFIX.rankN.json: each parameter's local and global row counts, whether
any is left on meta, which shards are pages of the file, RoPE's inv_freq against `from_pretrained`'s,
whether the head stays tied to the embeddings, and the largest logit difference from the whole model
loaded by `from_pretrained`."""

from __future__ import annotations

import json
import sys

import torch
from transformers import AutoModelForCausalLM

from lorachain.config import ModelConfig
from lorachain.training.parallel import end_launch, init_dist
from lorachain.training.sharded import load_sharded

if __name__ == "__main__":
    folder, dtype, how, out = sys.argv[1:5]
    dist = init_dist("fsdp")
    model = load_sharded(ModelConfig(name_or_path=folder, dtype=dtype), dist, how=how)
    rows = {n: [p.to_local().shape[0], p.shape[0]] for n, p in model.named_parameters()}
    meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
    ids = torch.randint(0, ref.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (model(input_ids=ids).logits.float() - ref(input_ids=ids).logits.float()).abs().max()
    model.reshard()  # the root stays gathered after a forward without backward
    ranges = [  # this process's maps of the safetensors file
        [int(x, 16) for x in line.split()[0].split("-")]
        for line in open("/proc/self/maps")
        if line.rstrip().endswith("model.safetensors")
    ]
    file_backed = sorted(
        n for n, p in model.named_parameters() if any(a <= p.to_local().data_ptr() < b for a, b in ranges)
    )
    result = {
        "rows": rows,
        "meta": meta,
        "rope_diff": float((model.model.rotary_emb.inv_freq - ref.model.rotary_emb.inv_freq).abs().max()),
        "tied": model.lm_head.weight is model.model.embed_tokens.weight,
        "ref_tied": ref.lm_head.weight is ref.model.embed_tokens.weight,
        "logit_diff": float(diff),
        "dtypes": sorted({str(p.dtype) for p in model.parameters()}),
        "file_backed": file_backed,  # shards that are pages of the file (how: map), after a forward
    }
    with open(f"{out}.rank{dist.rank}.json", "w") as f:
        json.dump(result, f)
    end_launch(0)
