"""Build the small GSM8K chat set shipped in lorachain/demo_data/ from the official GSM8K files.

    python examples/build_gsm8k_chat.py --src ../shared/data/gsm8k --out lorachain/demo_data

Each row is one OpenAI-style conversation: a fixed system prompt, the question as the user turn
and the official solution (calculator notes `<<...>>` removed, final `#### <number>` line kept) as
the assistant turn. Rows are a seeded sample of problems whose question and solution together are
at most 600 characters (short enough for CPU fine-tuning at max_length 320). GSM8K is MIT-licensed
(openai/grade-school-math); the licence file is copied next to the output.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
from pathlib import Path

SYSTEM = (
    "You are a careful maths tutor. Solve the problem step by step, "
    "then give the final answer as '#### <number>'."
)


def convert(row: dict, line: int) -> dict:
    from lorachain.tasks.gsm8k import CALC

    answer = "\n".join(x.rstrip() for x in CALC.sub("", row["answer"]).splitlines())
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": row["question"].strip()},
        {"role": "assistant", "content": answer.strip()},
    ]
    return {"messages": messages, "source_line": line}


def sample(path: Path, n: int, seed: int, max_chars: int) -> list[dict]:
    from lorachain.data import read_rows

    short = [(i, r) for i, r in read_rows(path) if len(r["question"]) + len(r["answer"]) <= max_chars]
    picked = random.Random(seed).sample(short, n)
    return [convert(r, line) for line, r in sorted(picked, key=lambda x: x[0])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", default="../shared/data/gsm8k")
    ap.add_argument("--out", default="lorachain/demo_data")
    ap.add_argument("--train", type=int, default=320)
    ap.add_argument("--test", type=int, default=100)
    ap.add_argument("--max-chars", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    src, out = Path(args.src), Path(args.out)
    for split, n in (("train", args.train), ("test", args.test)):
        rows = sample(src / f"{split}.jsonl", n, args.seed, args.max_chars)
        path = out / f"gsm8k_chat_{split}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        print(f"{path}: {len(rows)} conversations")
    shutil.copyfile(src / "LICENSE.openai-grade-school-math", out / "LICENSE.openai-grade-school-math")


if __name__ == "__main__":
    main()
