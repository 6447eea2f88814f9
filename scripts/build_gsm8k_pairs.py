"""Build GSM8K preference pairs: the reference solution as chosen, the model's own wrong sample as rejected.

    OMP_NUM_THREADS=1 python scripts/build_gsm8k_pairs.py   # 180 + 44 pairs, about 8 min on one core

For seeded samples of GSM8K questions (train split for the training pairs, test split for the
held-out ones), SmolLM2-135M-Instruct writes one solution through its chat template (sampling,
temperature 0.8). A question gives a pair only when that solution ends in a number that differs from
the official answer (`lorachain.metrics.final_number`): the rejected response is the starting model's
genuine mistake, never a perturbed copy of the reference. The chosen response is the official
solution (calculator notes `<<...>>` removed, `#### <number>` kept). A sample is kept up to the end
of its first `####` line, or whole when it has none (most are still going at max_new_tokens; their
final number is the last one they wrote; `rejected_cut` in the row). Rows are chat preference rows:
`prompt` is the system and user turns, `chosen`/`rejected` one assistant turn each. GSM8K is MIT
licensed (openai/grade-school-math); the licence file is copied beside the output.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import time
from pathlib import Path

import torch

SYSTEM = (
    "You are a careful maths tutor. Solve the problem step by step, "
    "then give the final answer as '#### <number>'."
)
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def reference_solution(answer: str) -> str:
    from lorachain.tasks.gsm8k import CALC

    return "\n".join(x.rstrip() for x in CALC.sub("", answer).splitlines()).strip()


def questions(path: Path, seed: int, max_chars: int) -> list[tuple[int, dict]]:
    """Every short enough (question + answer ≤ max_chars) row of `path`, in a seeded order."""
    from lorachain.data import read_rows

    rows = [(i, r) for i, r in read_rows(path) if len(r["question"]) + len(r["answer"]) <= max_chars]
    random.Random(seed).shuffle(rows)
    return rows


ANSWER_LINE = re.compile(r"^(.*?####[^\n]*)", re.S)


def up_to_answer(text: str) -> tuple[str, bool]:
    """(the sample up to the end of its first `#### ...` line, True), or (the whole sample, False)
    when it has none: cut off by max_new_tokens, or ended without the marker."""
    if m := ANSWER_LINE.match(text):
        return m.group(1).rstrip(), True
    return text, False


def prompt_of(row: dict) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": row["question"].strip()}]


@torch.no_grad()
def sample(model, tok, rows: list[dict], args: argparse.Namespace) -> list[tuple[str, bool]]:
    """One sampled solution per row: (text, finished before max_new_tokens)."""
    texts = [tok.apply_chat_template(prompt_of(r), tokenize=False, add_generation_prompt=True) for r in rows]
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = model.generate(
        **batch,
        do_sample=True,
        temperature=args.temperature,
        top_p=1.0,
        max_new_tokens=args.max_new_tokens,
        pad_token_id=tok.pad_token_id,
    )
    new = out[:, batch["input_ids"].shape[1] :]  # (B, new tokens)
    finished = (new == tok.eos_token_id).any(dim=1).tolist()
    return [(tok.decode(n, skip_special_tokens=True).strip(), f) for n, f in zip(new, finished)]


def build_split(model, tok, src: Path, want: int, args: argparse.Namespace) -> tuple[list[dict], dict]:
    from lorachain.metrics import final_number

    pairs: list[dict] = []
    seen = right = no_number = unfinished = 0
    pool = questions(src, args.seed, args.max_chars)
    t0 = time.time()
    for start in range(0, len(pool), args.batch):
        if len(pairs) >= want:
            break
        chunk = pool[start : start + args.batch]
        for (line, row), (text, done) in zip(chunk, sample(model, tok, [r for _, r in chunk], args)):
            seen += 1
            text, marked = up_to_answer(text)
            gold, got = final_number(row["answer"]), final_number(text)
            unfinished += not (marked or done)
            if got is None:
                no_number += 1
            elif got == gold:
                right += 1
            elif len(pairs) < want:
                chosen = reference_solution(row["answer"])
                pairs.append(
                    {
                        "prompt": prompt_of(row),
                        "chosen": [{"role": "assistant", "content": chosen}],
                        "rejected": [{"role": "assistant", "content": text}],
                        "answer": gold,
                        "rejected_answer": got,
                        "rejected_marked": marked,
                        "rejected_cut": not (marked or done),
                        "source_line": line,
                    }
                )
        print(
            f"{src.name}: {seen} sampled, {len(pairs)}/{want} pairs, {right} right, {no_number} without a "
            f"number, {unfinished} cut off before a #### line ({time.time() - t0:.0f} s)",
            flush=True,
        )
    stats = {"sampled": seen, "pairs": len(pairs), "right": right, "no_number": no_number}
    stats["unfinished"] = unfinished
    stats["rejected_marked"] = sum(p["rejected_marked"] for p in pairs)  # ended in a `####` line
    stats["rejected_cut"] = sum(p["rejected_cut"] for p in pairs)  # cut off at max_new_tokens
    return sorted(pairs, key=lambda p: p["source_line"]), stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", default="/work/shared/data/gsm8k")
    ap.add_argument("--out", default="lorachain/demo_data")
    ap.add_argument("--train", type=int, default=180)
    ap.add_argument("--eval", type=int, default=44)
    ap.add_argument("--max-chars", type=int, default=600)
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--batch", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stats", default="benchmarks/results/gsm8k_pairs_build.json")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    from lorachain.config import ModelConfig
    from lorachain.models import load_tokenizer, resolve_path

    path = resolve_path(ModelConfig(name_or_path=MODEL))
    tok = load_tokenizer(path)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    torch.manual_seed(args.seed)
    src, out = Path(args.src), Path(args.out)
    meta = {"command": "OMP_NUM_THREADS=1 python scripts/build_gsm8k_pairs.py", "args": vars(args)}
    for split, file, n in (("train", "train.jsonl", args.train), ("eval", "test.jsonl", args.eval)):
        t0 = time.time()
        pairs, stats = build_split(model, tok, src / file, n, args)
        target = out / f"gsm8k_pairs_{split}.jsonl"
        target.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
        meta[split] = {"source": f"gsm8k/{file}", **stats, "sampling_seconds": round(time.time() - t0)}
        print(f"{target}: {len(pairs)} pairs", flush=True)
    Path(args.stats).write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta))
    shutil.copyfile(src / "LICENSE.openai-grade-school-math", out / "LICENSE.openai-grade-school-math")


if __name__ == "__main__":
    main()
