"""Build the routing lockbox (issue 43): instructions from sources outside the T0 mixture, labelled
by the store's task types, in two sealed halves.

    python scripts/build_lockbox.py [--data ../shared/data] [--out data/lockbox] [--per-type 120]

Covered task types and their sources (none of these data sets is in the T0 mixture; TREC is, so it
is out):
- sentiment: SST-2 validation sentences (Stanford Sentiment Treebank; its sentences come from the
  same Rotten Tomatoes snippets as the mixture's `rotten_tomatoes`, so any sentence found verbatim
  in a mixture instruction is dropped);
- extractive_qa: SQuAD v1.1 (the English XQuAD paragraphs) and DROP questions whose answer is a span;
- multiple_choice_qa: COPA (pick the cause or effect) and BoolQ (a yes/no question over a passage:
  a two-option question about a text, as the mixture's DREAM/QuAIL-style rows are).
Types the store has but no offline source covers: closed_book_qa, paraphrase_identification,
structure_to_text, summarization, topic_classification.
"other" (types the store does not have, where falling back is right): RTE (entailment), WiC (word
sense) and GSM8K (grade-school maths).

Every data set gets four instruction templates written for this lockbox. Rows are drawn with a fixed
seed, balanced per type and source, and split into halves A and B (stratified by source and template).
`lockbox.json` seals them: each half's SHA-256 and counts, and a log of when each half was opened.
Half A is scored when the routing defaults change; half B stays unseen until A has failed once.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
from pathlib import Path

SEED = 43
TEMPLATES = {
    "sst2": [
        "Is the following movie review positive or negative?\n{sentence}",
        'Here is what a critic wrote: "{sentence}" Did the critic like the film?',
        "{sentence}\nHow does the writer of this sentence feel about the movie: good or bad?",
        "Classify the opinion in this snippet as positive or negative: {sentence}",
    ],
    "squad": [
        "Read the text and answer the question with a phrase from it.\n{context}\nQuestion: {question}",
        "{context}\n\nUsing the passage above, {question_lower}",
        "Find the answer in this article about {title}.\nArticle: {context}\nQ: {question}\nA:",
        "Question: {question}\nExtract the answer from this paragraph: {context}",
    ],
    "drop": [
        "Read the passage and answer the question with words from it.\n{passage}\nQuestion: {question}",
        "{passage}\n\nBased on the passage, {question_lower}",
        "Passage: {passage}\nQ: {question}\nGive the answer as it appears in the passage.",
        "Answer from the text below.\nQuestion: {question}\nText: {passage}",
    ],
    "copa": [
        "{premise} What was the {question} of this?\nOption 1: {choice1}\nOption 2: {choice2}",
        'Premise: {premise}\nWhich is the more likely {question}: "{choice1}" or "{choice2}"?',
        "Pick the {question} that fits best.\n{premise}\n- {choice1}\n- {choice2}",
        "{premise}\nChoose the likelier {question}:\nA) {choice1}\nB) {choice2}",
    ],
    "boolq": [
        "{passage}\n\nAfter reading this, answer yes or no: {question}?",
        "Passage: {passage}\nQuestion: {question}?\nOptions: yes, no",
        "Based on the text below, is it true that {question}?\n{passage}",
        "Answer the question about the passage with yes or no.\nQuestion: {question}?\nPassage: {passage}",
    ],
    "rte": [
        '{premise}\nDoes it follow that "{hypothesis}"? Yes or no?',
        "Premise: {premise}\nHypothesis: {hypothesis}\nIs the hypothesis entailed by the premise?",
        "Given that {premise_lower} can we conclude that {hypothesis_lower}",
        "Text: {premise}\nClaim: {hypothesis}\nIs the claim supported by the text?",
    ],
    "wic": [
        'Does the word "{word}" mean the same thing in these two sentences?\n1. {sentence1}\n2. {sentence2}',
        'Sentence A: {sentence1}\nSentence B: {sentence2}\nIs "{word}" used in the same sense in A and B?',
        'Here is a word: {word}. Compare its meaning in "{sentence1}" and in "{sentence2}". Same or '
        "different?",
        "{sentence1}\n{sentence2}\nQuestion: is the sense of '{word}' identical in both sentences?",
    ],
    "gsm8k": [
        "Solve this math word problem step by step.\n{question}",
        "{question}\nWork out the answer and show your reasoning.",
        "Problem: {question}\nSolution:",
        "A student asks: {question} Explain how to get the answer.",
    ],
}
SOURCES = {  # task type -> data sets
    "sentiment": ["sst2"],
    "extractive_qa": ["squad", "drop"],
    "multiple_choice_qa": ["copa", "boolq"],
    "other": ["rte", "wic", "gsm8k"],
}
NOT_COVERED = [
    "closed_book_qa",
    "paraphrase_identification",
    "structure_to_text",
    "summarization",
    "topic_classification",
]
LICENSES = {
    "sst2": ("sst2/LICENSE.forest-snow-alps", "GLUE SST-2 (Socher et al. 2013), via forest-snow/alps"),
    "squad": ("squad/LICENSE.CC-BY-SA4.0.txt", "SQuAD v1.1 dev via XQuAD (CC BY-SA 4.0)"),
    "drop": (None, "DROP (CC BY-SA 4.0), a 300-question sample via dDua/succesive_prompting"),
    "copa": ("superglue/LICENSE.louisbzk-pet", "SuperGLUE COPA validation (BSD-2), via louisbzk/pet"),
    "boolq": (
        "superglue/LICENSE.THUDM-P-tuning",
        "SuperGLUE BoolQ validation (CC BY-SA 3.0), via THUDM/P-tuning",
    ),
    "rte": ("superglue/LICENSE.tonyzhaozh-few-shot-learning", "SuperGLUE RTE validation, via tonyzhaozh"),
    "wic": (
        "superglue/LICENSE.THUDM-P-tuning",
        "SuperGLUE WiC validation (CC BY-NC 4.0), via THUDM/P-tuning",
    ),
    "gsm8k": ("gsm8k/LICENSE.openai-grade-school-math", "GSM8K test (MIT), openai/grade-school-math"),
}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _lower(text: str) -> str:
    text = text.strip().rstrip("?.")
    return text[:1].lower() + text[1:] + "?"


def _sst2(data: Path) -> list:
    return [
        ({"sentence": r["sentence"].strip()}, ["negative", "positive"][r["label"]])
        for r in _jsonl(data / "sst2/val.jsonl")
    ]


def _squad(data: Path) -> list:
    out = []
    for art in json.loads((data / "squad/xquad.en.json").read_text())["data"]:
        for p in art["paragraphs"]:
            for q in p["qas"]:
                fields = {
                    "title": art["title"].replace("_", " "),
                    "context": p["context"],
                    "question": q["question"],
                }
                out.append((fields | {"question_lower": _lower(q["question"])}, q["answers"][0]["text"]))
    return out


def _drop(data: Path) -> list:
    out = []
    for item in json.loads((data / "drop/drop_dataset_train_300_annotations.json").read_text()).values():
        for q in item["qa_pairs"]:
            spans = q["answer"].get("spans") or []
            if len(spans) == 1:  # a span answer: extractive
                fields = {
                    "passage": item["passage"],
                    "question": q["question"],
                    "question_lower": _lower(q["question"]),
                }
                out.append((fields, spans[0]))
    return out


def _rte(data: Path) -> list:
    out = []
    for r in _jsonl(data / "superglue/RTE/val.jsonl"):
        fields = r | {
            "premise_lower": r["premise"][:1].lower() + r["premise"][1:],
            "hypothesis_lower": _lower(r["hypothesis"]),
        }
        out.append((fields, "yes" if r["label"] == "entailment" else "no"))
    return out


ITEMS = {  # data set -> (template fields, reference answer) of every usable row
    "sst2": _sst2,
    "squad": _squad,
    "drop": _drop,
    "copa": lambda d: [
        (r, [r["choice1"], r["choice2"]][r["label"]]) for r in _jsonl(d / "superglue/COPA/val.jsonl")
    ],
    "boolq": lambda d: [
        ({"passage": r["passage"], "question": r["question"]}, "yes" if r["label"] else "no")
        for r in _jsonl(d / "superglue/BoolQ/val.jsonl")
    ],
    "rte": _rte,
    "wic": lambda d: [
        (r, "same" if r["label"] else "different") for r in _jsonl(d / "superglue/WiC/val.jsonl")
    ],
    "gsm8k": lambda d: [({"question": r["question"]}, r["answer"]) for r in _jsonl(d / "gsm8k/test.jsonl")],
}


def in_mixture(text: str, mixture: str) -> bool:
    """Whether `text` (a review sentence of ours) appears verbatim in the mixture's sentiment rows."""
    return len(text) > 20 and text.lower() in mixture


def build(data: Path, per_type: int) -> list[dict]:
    rng = random.Random(SEED)
    rows_t0 = (json.loads(line) for line in (data / "instructions/t0_mixture.jsonl").open())
    mixture = "\n".join(r["instruction"].lower() for r in rows_t0 if r["task"] == "sentiment")
    rows = []
    for task, names in SOURCES.items():
        share = -(-per_type // len(names))  # each source an equal share
        for name in names:
            pool = ITEMS[name](data)
            rng.shuffle(pool)
            picked = [(f, a) for f, a in pool if not in_mixture(f.get("sentence", ""), mixture)][:share]
            for i, (fields, answer) in enumerate(picked):
                k = i % len(TEMPLATES[name])  # templates in turn, so each half sees every one
                instruction = TEMPLATES[name][k].format(**fields)
                rows.append(
                    {
                        "instruction": instruction,
                        "output": answer,
                        "task": task,
                        "dataset": name,
                        "template": f"{name}_{k}",
                    }
                )
    return rows


def split(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """Halves A and B, alternating within each (data set, template) so both are stratified."""
    a, b, seen = [], [], {}
    for r in rows:
        key = r["template"]
        (a if seen.get(key, 0) % 2 == 0 else b).append(r)
        seen[key] = seen.get(key, 0) + 1
    return a, b


def counts(rows: list[dict]) -> dict:
    out: dict[str, dict[str, int]] = {}
    for r in rows:
        out.setdefault(r["task"], {}).setdefault(r["dataset"], 0)
        out[r["task"]][r["dataset"]] += 1
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--out", default="data/lockbox")
    ap.add_argument("--per-type", type=int, default=120)
    args = ap.parse_args()
    data, out = Path(args.data), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    halves = dict(zip("AB", split(build(data, args.per_type)), strict=True))
    seal = {
        "seed": SEED,
        "covered": [t for t in SOURCES if t != "other"],
        "not_covered": NOT_COVERED,
        "halves": {},
        "opened": [],
    }
    old = out / "lockbox.json"
    if old.is_file():
        seal["opened"] = json.loads(old.read_text()).get("opened", [])  # the log survives a rebuild
    for name, rows in halves.items():
        path = out / f"half_{name.lower()}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        seal["halves"][name] = {
            "file": path.name,
            "sha256": digest,
            "rows": len(rows),
            "counts": counts(rows),
        }
    old.write_text(json.dumps(seal, indent=2) + "\n")
    lines = ["# Sources and licences of the lockbox rows\n"]
    for name, (lic, what) in LICENSES.items():
        if lic:
            shutil.copyfile(data / lic, out / Path(lic).name)
        lines.append(
            f"- `{name}`: {what}"
            + (f"; licence file `{Path(lic).name}`" if lic else "; no licence file upstream")
        )
    (out / "LICENSES.md").write_text("\n".join(lines) + "\n")
    for name, h in seal["halves"].items():
        print(f"half {name}: {h['rows']} rows {h['counts']}")


if __name__ == "__main__":
    main()
