"""Helpfulness judged 1–6 by any OpenAI-compatible chat endpoint, and human-evaluation sheets."""

from __future__ import annotations

import csv
import json
import os
import re
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

from lorachain.data import DataError
from lorachain.io import atomic_write

JUDGE_PROMPT = """You rate how helpful an AI assistant's answer is to a user's instruction.
Scale: 1 = useless or wrong; 2 = mostly wrong; 3 = partly helpful with clear errors;
4 = helpful with minor errors or omissions; 5 = helpful and correct; 6 = excellent, correct,
complete and well written. Judge only the answer below. Reply with the number alone.

Instruction:
{instruction}

Reference answer (may be one of several good answers):
{reference}

Assistant's answer:
{answer}

Rating (1-6):"""

RATINGS = ("excellent", "pass", "fail")


class JudgeError(RuntimeError):
    """The judge endpoint failed or answered without a rating."""


def judge_score(
    url: str, model: str, instruction: str, reference: str, answer: str, timeout: float = 60.0
) -> int:
    """Ask `url` (an OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1) for a 1–6 rating."""
    body = {
        "model": model,
        "temperature": 0,
        "max_tokens": 8,
        "messages": [
            {
                "role": "user",
                "content": JUDGE_PROMPT.format(instruction=instruction, reference=reference, answer=answer),
            }
        ],
    }
    headers = {"Content-Type": "application/json"}
    if key := os.environ.get("LORACHAIN_JUDGE_API_KEY"):
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url.rstrip("/") + "/chat/completions", json.dumps(body).encode(), headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            reply = json.loads(resp.read())
        text = reply["choices"][0]["message"]["content"]
    except (urllib.error.URLError, KeyError, IndexError, json.JSONDecodeError, TimeoutError) as e:
        raise JudgeError(f"judge {url}: no usable reply ({e})") from None
    match = re.search(r"[1-6]", text)
    if not match:
        raise JudgeError(f"judge {url}: reply {text!r} holds no rating 1-6")
    return int(match.group())


def write_human_sheet(path: str | Path, rows: list[dict]) -> Path:
    """A CSV for annotators: instruction, task, adapter, answer, and a blank rating column."""

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["instruction", "task", "adapter", "answer", "rating"])
            w.writeheader()
            for r in rows:
                w.writerow(
                    {k: r.get(k, "") for k in ("instruction", "task", "adapter", "answer")} | {"rating": ""}
                )

    return atomic_write(path, write)


def human_rates(path: str | Path) -> dict:
    """Pass/excellent/fail rates overall and per task from a filled sheet (blank = not rated)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: sheet not found")
    per_task: dict[str, Counter] = {}
    with p.open(newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "rating" not in reader.fieldnames:
            raise DataError(f"{p}: expected a 'rating' column (made by `lorachain route eval`)")
        for line, row in enumerate(reader, 2):
            rating = (row.get("rating") or "").strip().lower()
            if not rating:
                continue
            if rating not in RATINGS:
                raise DataError(f"{p}: line {line}: rating {rating!r}; expected one of {RATINGS} or blank")
            per_task.setdefault(row.get("task", ""), Counter())[rating] += 1
    total = sum(per_task.values(), Counter())

    def rates(c: Counter) -> dict:
        n = sum(c.values())
        return {"rated": n, **{r: c[r] / n if n else 0.0 for r in RATINGS}}

    return {"overall": rates(total), "per_task": {t: rates(c) for t, c in sorted(per_task.items())}}
