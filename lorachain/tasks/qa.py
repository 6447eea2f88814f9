"""SQuAD (v1.1 JSON) and DROP (official JSON) as generation tasks scored by F1 / EM."""

from __future__ import annotations

import json
from pathlib import Path

from lorachain.data import DataError
from lorachain.tasks.registry import TaskExample, need, register


def _json(path: str | Path):
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: data file not found")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{p}: not valid JSON ({e})") from None


@register("squad", metric="em_f1", kind="generation")
def squad(path: str | Path) -> list[TaskExample]:
    data = _json(path)
    out = []
    for ai, article in enumerate(need(data, "data", str(path), list)):
        where = f"{path}: data[{ai}]"
        title = article.get("title", "")
        for pi, para in enumerate(need(article, "paragraphs", where, list)):
            pw = f"{where}.paragraphs[{pi}]"
            context = need(para, "context", pw, str)
            for q in need(para, "qas", pw, list):
                qw = f"{pw} (question {q.get('id', '?')})"
                answers = [need(a, "text", qw, str) for a in need(q, "answers", qw, list)]
                if not answers:
                    raise DataError(f"{qw}: no answers")
                prompt = (
                    f"Title: {title}\nContext: {context}\nQuestion: {need(q, 'question', qw, str)}\nAnswer:"
                )
                out.append(TaskExample(prompt, answers=[f" {a}" for a in answers]))
    return out


def drop_answer(answer: dict, where: str) -> str:
    """DROP's answer as text: the number, the spans joined, or the date."""
    if answer.get("number"):
        return str(answer["number"])
    if answer.get("spans"):
        return ", ".join(answer["spans"])
    date = answer.get("date") or {}
    text = " ".join(str(date[k]) for k in ("day", "month", "year") if date.get(k))
    if not text:
        raise DataError(f"{where}: answer has no number, spans or date")
    return text


@register("drop", metric="em_f1", kind="generation")
def drop(path: str | Path) -> list[TaskExample]:
    data = _json(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected an object of passages")
    out = []
    for pid, item in data.items():
        where = f"{path}: {pid}"
        passage = need(item, "passage", where, str)
        for q in need(item, "qa_pairs", where, list):
            qw = f"{where} (query {q.get('query_id', '?')})"
            answer = drop_answer(need(q, "answer", qw, dict), qw)
            prompt = f"Passage: {passage}\nQuestion: {need(q, 'question', qw, str)}\nAnswer:"
            out.append(TaskExample(prompt, answers=[f" {answer}"]))
    return out
