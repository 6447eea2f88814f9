"""Fine-tune SmolLM2-135M-Instruct with TRL's SFTTrainer and a COLA chain (ChainCallback).

    python examples/sft_chain_smollm2.py [--rows 64 --steps 16 --eval-rows 10 --out runs/sft_chain_smollm2]

The data is the embedded GSM8K chat set (OpenAI messages). lorachain renders each conversation
with SmolLM2's chat template and marks the assistant tokens (`lorachain.data.chat`). SFTTrainer trains
on those tokens alone (TRL masks the labels by the `assistant_masks` column). The chain is rank 8 then rank 4
on the attention projections, with the knot halfway. Greedy answers to held-out questions are
scored by their final number before and after. The whole chain is written as one PEFT adapter,
`OUT/chain/adapter`, which loads on the original model without lorachain.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lorachain.config import DataConfig
from lorachain.data import load_examples, read_rows
from lorachain.data.chat import chat_template, generation_ids, parse_messages
from lorachain.integrations import ChainCallback
from lorachain.metrics import number_match

DATA = Path(__file__).resolve().parents[1] / "lorachain" / "demo_data"


@torch.no_grad()
def exact_match(model, tok, rows: list[dict], max_new_tokens: int) -> tuple[float, str]:
    """Share of questions whose greedy answer ends in the reference's final number (one
    left-padded batch), and the first answer."""
    template = chat_template(tok, None)
    conversations = [parse_messages(row) for row in rows]
    prompts = [generation_ids(tok, m[:-1], template, 512) for m in conversations]
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), tok.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = torch.tensor(p), 1
    model.eval()
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
    )
    answers = tok.batch_decode(out[:, width:], skip_special_tokens=True)
    hits = [number_match(a, m[-1]["content"]) for a, m in zip(answers, conversations, strict=True)]
    return sum(hits) / len(hits), answers[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=64, help="training conversations")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--eval-rows", type=int, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--out", default="runs/sft_chain_smollm2")
    args = ap.parse_args()

    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from lorachain.config import ModelConfig
    from lorachain.models import load_tokenizer, resolve_path

    path = resolve_path(ModelConfig(name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct"))  # offline copy
    tok = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    train_file = str(DATA / "gsm8k_chat_train.jsonl")
    examples = load_examples(train_file, DataConfig(train=train_file, max_length=256), tok, False, args.rows)
    dataset = Dataset.from_list(
        [{"input_ids": e.input_ids, "assistant_masks": [int(y != -100) for y in e.labels]} for e in examples]
    )
    test = [row for _, row in read_rows(DATA / "gsm8k_chat_test.jsonl")][: args.eval_rows]
    t0 = time.perf_counter()
    em_before, _ = exact_match(model, tok, test, args.max_new_tokens)
    eval_seconds = time.perf_counter() - t0

    chain = ChainCallback(
        {
            "links": [{"rank": 8, "alpha": 16}, {"rank": 4, "alpha": 8}],
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
            "dropout": 0.0,
        }
    )
    config = SFTConfig(
        output_dir=args.out,
        max_steps=args.steps,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        lr_scheduler_type="linear",
        max_length=None,  # rows are already cut to 256 tokens by lorachain
        bf16=False,
        gradient_checkpointing=False,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        dataset_num_proc=None,
    )
    trainer = SFTTrainer(
        model,
        args=config,
        train_dataset=dataset,
        processing_class=tok,
        peft_config=chain.lora_config(model),
        callbacks=[chain],
    )
    t0 = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - t0
    em_after, answer = exact_match(trainer.model, tok, test, args.max_new_tokens)
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    result = {
        "command": "python examples/sft_chain_smollm2.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "train_rows": len(examples),
        "steps": args.steps,
        "knots": [{"step": k.step, "rank": k.rank, "reason": k.reason} for k in chain.knots],
        "loss_first_last": [losses[0], losses[-1]],
        "test_exact_match_before_after": [em_before, em_after],
        "eval_rows": len(test),
        "train_seconds": train_seconds,
        "eval_seconds_before": eval_seconds,
        "adapter": str(Path(args.out) / "chain" / "adapter"),
        "first_answer_after": answer,
    }
    print(json.dumps(result, indent=2))
    (Path(args.out) / "result.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
