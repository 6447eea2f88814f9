"""One TRL DPOTrainer run with ChainCallback (knots after steps 2 and 4) on a tiny Llama, PEFT and
no ref_model, for 1 or N processes:

    torchrun --nproc_per_node 2 tests/ddp_dpo.py OUT     (gloo on CPU)
    python tests/ddp_dpo.py OUT

The global batch is 4 pairs either way (per-device 4 / world), read in file order. Each rank writes
rank{R}.json: its knot steps, the adapter-off model's largest logit distance to the starting model
after every step, and the logged rewards margins."""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from conftest import make_tokenizer, tiny_model  # noqa: E402
from datasets import Dataset  # noqa: E402
from test_reference import Probe, pairs, prompts  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from lorachain.integrations import ChainCallback  # noqa: E402

LINKS = [{"rank": 4, "alpha": 8, "steps": 2}, {"rank": 4, "alpha": 8, "steps": 2}, {"rank": 4, "alpha": 8}]


def main(out: str) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tok, model = make_tokenizer(), tiny_model("llama")
    start = copy.deepcopy(model)
    chain = ChainCallback({"links": LINKS, "target_modules": ["q_proj", "v_proj"], "dropout": 0.0})
    probe = Probe(start, torch.tensor([tok(prompts(1)[0] + " positive good")["input_ids"]]))
    args = DPOConfig(
        output_dir=out,
        max_steps=6,
        per_device_train_batch_size=4 // world,
        learning_rate=0.05,
        optim="adamw_torch",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        bf16=False,
        train_sampling_strategy="sequential",
        seed=0,
    )
    trainer = DPOTrainer(
        model,
        args=args,
        train_dataset=Dataset.from_list(pairs(24)),
        processing_class=tok,
        peft_config=chain.lora_config(model),
        callbacks=[chain, probe],
    )
    trainer.train()
    margins = {h["step"]: h["rewards/margins"] for h in trainer.state.log_history if "rewards/margins" in h}
    result = {
        "knots": [k.step for k in chain.knots],
        "ref_logit_gap": max(probe.ref_logit_gap.values()),
        "margins": margins,
        "world": world,
    }
    Path(out, f"rank{args.process_index}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
