"""GSM8K (grade-school maths, Cobbe et al. 2021) as a generation task scored by exact match of
the final number. Reads the official JSONL (`question`, `answer` ending in `#### <number>`) and
chat rows (`messages` with the question as the last user turn and the solution as the answer)."""

from __future__ import annotations

import re
from pathlib import Path

from lorachain.data import DataError, read_rows
from lorachain.tasks.registry import TaskExample, need, register

CALC = re.compile(r"<<[^>]*>>")  # the calculator annotations of the official answers


def one_line(solution: str) -> str:
    """The solution on one line (generation stops at a newline), calculator notes removed."""
    return " ".join(line.strip() for line in CALC.sub("", solution).splitlines() if line.strip())


def _from_messages(row: dict, where: str) -> tuple[str, str]:
    messages = need(row, "messages", where, list)
    users = [m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    answers = [m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "assistant"]
    if not users or not answers:
        raise DataError(f"{where}: expected a user and an assistant turn")
    return str(users[-1]), str(answers[-1])


@register("gsm8k", metric="number_em", kind="generation")
def gsm8k(path: str | Path) -> list[TaskExample]:
    out = []
    for i, row in read_rows(path):
        where = f"{path}: line {i}"
        if "messages" in row:
            question, answer = _from_messages(row, where)
        else:
            question, answer = need(row, "question", where, str), need(row, "answer", where, str)
        if "####" not in answer:
            raise DataError(f"{where}: answer has no final '#### <number>' line")
        out.append(TaskExample(f"Question: {question.strip()}\nAnswer:", answers=[f" {one_line(answer)}"]))
    return out
