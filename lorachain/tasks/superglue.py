"""SST-2 and the SuperGLUE tasks in their official JSONL formats, with MeZO-style templates."""

from __future__ import annotations

from pathlib import Path

from lorachain.data import DataError, read_rows
from lorachain.tasks.registry import TaskExample, need, register

YES_NO = ["No", "Yes"]


def _rows(path: str | Path):
    return [(f"{path}: line {i}", row) for i, row in read_rows(path)]


def _bool(row: dict, where: str, name: str = "label", true: tuple = (True, 1, "1", "true", "True")) -> int:
    value = need(row, name, where)
    if value in true:
        return 1
    if value in (False, 0, "0", "false", "False"):
        return 0
    raise DataError(f"{where}: field {name!r} is {value!r}; expected true/false or 0/1")


@register("sst2")
def sst2(path: str | Path) -> list[TaskExample]:
    return [
        TaskExample(f"{need(r, 'sentence', w, str).strip()} It was", [" terrible", " great"], _bool(r, w))
        for w, r in _rows(path)
    ]


def _entail(path: str | Path, labels: dict[str, int], candidates: list[str]) -> list[TaskExample]:
    out = []
    for w, r in _rows(path):
        label = need(r, "label", w, str)
        if label not in labels:
            raise DataError(f"{w}: field 'label' is {label!r}; expected one of {sorted(labels)}")
        prompt = (
            f'{need(r, "premise", w, str)}\nDoes this mean that "{need(r, "hypothesis", w, str)}" '
            f"is true? Yes or No?\n"
        )
        out.append(TaskExample(prompt, candidates, labels[label]))
    return out


@register("rte")
def rte(path: str | Path) -> list[TaskExample]:
    return _entail(path, {"not_entailment": 0, "entailment": 1}, YES_NO)


@register("cb")
def cb(path: str | Path) -> list[TaskExample]:
    return _entail(path, {"contradiction": 0, "entailment": 1, "neutral": 2}, ["No", "Yes", "Maybe"])


@register("boolq")
def boolq(path: str | Path) -> list[TaskExample]:
    return [
        TaskExample(f"{need(r, 'passage', w, str)} {need(r, 'question', w, str)}?", YES_NO, _bool(r, w))
        for w, r in _rows(path)
    ]


@register("wic")
def wic(path: str | Path) -> list[TaskExample]:
    return [
        TaskExample(
            f'Does the word "{need(r, "word", w, str)}" have the same meaning in these two '
            f"sentences? Yes, No?\n{need(r, 'sentence1', w, str)}\n{need(r, 'sentence2', w, str)}\n",
            YES_NO,
            _bool(r, w),
        )
        for w, r in _rows(path)
    ]


@register("wsc")
def wsc(path: str | Path) -> list[TaskExample]:
    out = []
    for w, r in _rows(path):
        target = need(r, "target", w, dict)
        prompt = (
            f"{need(r, 'text', w, str)}\nIn the previous sentence, does the pronoun "
            f'"{need(target, "span2_text", w + " (target)", str)}" refer to '
            f"{need(target, 'span1_text', w + ' (target)', str)}? Yes or No?\n"
        )
        out.append(TaskExample(prompt, YES_NO, _bool(r, w)))
    return out


@register("copa", kind="multiple_choice")
def copa(path: str | Path) -> list[TaskExample]:
    out = []
    for w, r in _rows(path):
        question = need(r, "question", w, str)
        if question not in ("cause", "effect"):
            raise DataError(f"{w}: field 'question' is {question!r}; expected cause or effect")
        joiner = " because" if question == "cause" else " so"
        premise = need(r, "premise", w, str).rstrip(".")
        choices = [need(r, c, w, str) for c in ("choice1", "choice2")]
        candidates = [f" {c[0].lower()}{c[1:]}" if c else c for c in choices]
        out.append(TaskExample(premise + joiner, candidates, need(r, "label", w, int)))
    return out


@register("multirc", metric="f1")
def multirc(path: str | Path) -> list[TaskExample]:
    out = []
    for w, r in _rows(path):
        passage = need(r, "passage", w, dict)
        text = need(passage, "text", w + " (passage)", str)
        for qi, q in enumerate(need(passage, "questions", w + " (passage)", list)):
            qw = f"{w} (question {qi})"
            for a in need(q, "answers", qw, list):
                prompt = (
                    f"{text}\nQuestion: {need(q, 'question', qw, str)}\nI found this answer "
                    f'"{need(a, "text", qw, str)}". Is that correct? Yes or No?\n'
                )
                out.append(TaskExample(prompt, YES_NO, _bool(a, qw), group=f"{w}#{qi}"))
    return out


@register("record", metric="em_f1", kind="multiple_choice")
def record(path: str | Path) -> list[TaskExample]:
    out = []
    for w, r in _rows(path):
        passage = need(r, "passage", w, dict)
        text = need(passage, "text", w + " (passage)", str).replace("@highlight\n", "- ")
        raw = need(passage, "text", w + " (passage)", str)
        entities = sorted({raw[e["start"] : e["end"] + 1] for e in need(passage, "entities", w, list)})
        for qi, q in enumerate(need(r, "qas", w, list)):
            qw = f"{w} (query {qi})"
            query = need(q, "query", qw, str)
            answers = sorted({a["text"] for a in q.get("answers", [])})
            if not entities or "@placeholder" not in query:
                raise DataError(f"{qw}: expected entities and a query with @placeholder")
            prefix, _, suffix = query.partition("@placeholder")
            gold = next((i for i, e in enumerate(entities) if e in answers), None)
            out.append(
                TaskExample(
                    f"{text}\n{prefix}".rstrip(),
                    [f" {e}{suffix}" for e in entities],
                    gold,
                    answers=answers,
                    group=f"{w}#{qi}",
                )
            )
    return out
