"""One Trainer run with ChainCallback (auto knots) on a tiny Llama, for 1 or N processes:

    torchrun --nproc_per_node 2 tests/ddp_chain.py OUT DATA     (gloo on CPU)
    python tests/ddp_chain.py OUT DATA

The global batch is 8 either way (per-device 8 / world), read in file order."""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from conftest import make_tokenizer, tiny_model  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

from lorachain.chain.knot import extend, lora_config  # noqa: E402
from lorachain.config import ChainConfig, DataConfig, from_dict  # noqa: E402
from lorachain.data import collate, load_examples  # noqa: E402
from lorachain.integrations import ChainCallback  # noqa: E402

CHAIN = {
    "links": [{"rank": 4, "alpha": 8}] * 3,
    "dropout": 0.0,
    "knot": {"policy": "auto", "window": 2, "min_delta": 0.2, "min_link_steps": 2},
}


def main(out: str, data: str) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tok = make_tokenizer()
    words = {"0": "negative", "1": "positive"}
    dcfg = DataConfig(train=data, prompt="Review : {text} Sentiment :", label_words=words)
    examples = load_examples(data, dcfg, tok, False)
    chain = from_dict(ChainConfig, CHAIN)
    torch.manual_seed(0)
    model = extend(
        tiny_model("llama"), lora_config(chain.links[0], chain, ["q_proj", "v_proj"], False, "causal_lm")
    )
    args = TrainingArguments(
        output_dir=out,
        max_steps=12,
        per_device_train_batch_size=8 // world,
        learning_rate=0.01,
        optim="adamw_torch",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        remove_unused_columns=False,
        train_sampling_strategy="sequential",
        seed=0,
    )
    callback = ChainCallback(chain)
    trainer = Trainer(
        model,
        args=args,
        train_dataset=examples,
        data_collator=lambda b: collate(b, tok.pad_token_id, False),
        callbacks=[callback],
    )
    trainer.train()
    steps = [k.step for k in callback.knots]
    Path(out, f"knots.rank{args.process_index}.txt").write_text(f"{steps}\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
