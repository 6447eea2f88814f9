"""Task loaders on a few hand-written rows in each official format: prompts, label mapping,
candidate sets, and malformed rows failing with file, line and field."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lorachain.data import DataError
from lorachain.tasks import TaskExample, get_task, register


def jsonl(tmp_path, name, rows):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def load(name, path):
    return get_task(name).load(path)


def test_sst2_rte_cb_boolq_label_mapping(tmp_path):
    s = load(
        "sst2",
        jsonl(
            tmp_path, "s.jsonl", [{"sentence": "a fine film ", "label": 1}, {"sentence": "dull", "label": 0}]
        ),
    )
    assert [(e.prompt, e.candidates, e.gold) for e in s] == [
        ("a fine film It was", [" terrible", " great"], 1),
        ("dull It was", [" terrible", " great"], 0),
    ]
    row = {"premise": "P.", "hypothesis": "H", "idx": 0}
    rte = load(
        "rte",
        jsonl(tmp_path, "r.jsonl", [{**row, "label": "entailment"}, {**row, "label": "not_entailment"}]),
    )
    assert [e.gold for e in rte] == [1, 0] and rte[0].candidates == ["No", "Yes"]
    assert rte[0].prompt == 'P.\nDoes this mean that "H" is true? Yes or No?\n'
    cb = load(
        "cb",
        jsonl(tmp_path, "c.jsonl", [{**row, "label": x} for x in ("contradiction", "entailment", "neutral")]),
    )
    assert [e.target for e in cb] == ["No", "Yes", "Maybe"]
    b = load("boolq", jsonl(tmp_path, "b.jsonl", [{"passage": "Ps", "question": "is it", "label": False}]))
    assert b[0].prompt == "Ps is it?" and b[0].target == "No"


def test_wic_wsc_copa(tmp_path):
    wic = load(
        "wic",
        jsonl(tmp_path, "w.jsonl", [{"word": "class", "sentence1": "A.", "sentence2": "B.", "label": True}]),
    )
    assert wic[0].prompt.startswith('Does the word "class" have the same meaning') and wic[0].target == "Yes"
    wsc = load(
        "wsc",
        jsonl(
            tmp_path,
            "s.jsonl",
            [{"text": "Mark lied. He", "label": False, "target": {"span1_text": "Mark", "span2_text": "He"}}],
        ),
    )
    assert 'pronoun "He" refer to Mark?' in wsc[0].prompt and wsc[0].gold == 0
    copa = load(
        "copa",
        jsonl(
            tmp_path,
            "c.jsonl",
            [
                {
                    "premise": "The sun rose.",
                    "choice1": "It got light.",
                    "choice2": "It rained.",
                    "question": "effect",
                    "label": 0,
                },
                {
                    "premise": "I slept.",
                    "choice1": "I was tired.",
                    "choice2": "I ran.",
                    "question": "cause",
                    "label": 0,
                },
            ],
        ),
    )
    assert copa[0].prompt == "The sun rose so" and copa[0].candidates == [" it got light.", " it rained."]
    assert copa[1].prompt == "I slept because" and copa[1].target == " i was tired."


def test_multirc_record_groups_and_candidates(tmp_path):
    m = load(
        "multirc",
        jsonl(
            tmp_path,
            "m.jsonl",
            [
                {
                    "passage": {
                        "text": "T",
                        "questions": [
                            {
                                "question": "Q1",
                                "answers": [{"text": "a", "label": 1}, {"text": "b", "label": 0}],
                            },
                            {"question": "Q2", "answers": [{"text": "c", "label": 0}]},
                        ],
                    }
                }
            ],
        ),
    )
    assert [(e.group.split("#")[1], e.gold) for e in m] == [("0", 1), ("0", 0), ("1", 0)]
    text = "Ann met Bob in Rome."
    rec = load(
        "record",
        jsonl(
            tmp_path,
            "r.jsonl",
            [
                {
                    "passage": {
                        "text": text,
                        "entities": [
                            {"start": 0, "end": 2},
                            {"start": 8, "end": 10},
                            {"start": 15, "end": 18},
                        ],
                    },
                    "qas": [
                        {
                            "query": "@placeholder lives in Rome.",
                            "answers": [{"start": 8, "end": 10, "text": "Bob"}],
                        }
                    ],
                }
            ],
        ),
    )
    e = rec[0]
    assert e.candidates == [" Ann lives in Rome.", " Bob lives in Rome.", " Rome lives in Rome."]
    assert e.gold == 1 and e.answers == ["Bob"]


def test_squad_and_drop(tmp_path):
    squad = tmp_path / "squad.json"
    squad.write_text(
        json.dumps(
            {
                "data": [
                    {
                        "title": "T",
                        "paragraphs": [
                            {
                                "context": "C",
                                "qas": [
                                    {
                                        "id": "q1",
                                        "question": "Q?",
                                        "answers": [
                                            {"text": "x", "answer_start": 0},
                                            {"text": "y", "answer_start": 1},
                                        ],
                                    }
                                ],
                            }
                        ],
                    }
                ]
            }
        )
    )
    (e,) = load("squad", squad)
    assert e.prompt == "Title: T\nContext: C\nQuestion: Q?\nAnswer:" and e.answers == [" x", " y"]
    drop = tmp_path / "drop.json"
    drop.write_text(
        json.dumps(
            {
                "p1": {
                    "passage": "P",
                    "qa_pairs": [
                        {"question": "How many?", "answer": {"number": "3", "spans": [], "date": {}}},
                        {"question": "Who?", "answer": {"number": "", "spans": ["A", "B"], "date": {}}},
                        {
                            "question": "When?",
                            "answer": {
                                "number": "",
                                "spans": [],
                                "date": {"day": "1", "month": "May", "year": "1990"},
                            },
                        },
                    ],
                }
            }
        )
    )
    assert [e.answers[0] for e in load("drop", drop)] == [" 3", " A, B", " 1 May 1990"]


@pytest.mark.parametrize(
    ("task", "rows", "message"),
    [
        ("rte", [{"premise": "P", "hypothesis": "H", "label": "maybe"}], "line 1: field 'label' is 'maybe'"),
        ("boolq", [{"passage": "P", "label": True}], "line 1: missing field 'question'"),
        (
            "copa",
            [{"premise": "P", "choice1": "a", "choice2": "b", "question": "why", "label": 0}],
            "field 'question' is 'why'",
        ),
        ("wsc", [{"text": "t", "label": True, "target": "x"}], "field 'target' should be dict"),
        (
            "sst2",
            [{"sentence": "ok", "label": 1}, {"sentence": 5, "label": 1}],
            "line 2: field 'sentence' should be str",
        ),
    ],
)
def test_malformed_rows_name_file_line_field(tmp_path, task, rows, message):
    path = jsonl(tmp_path, "bad.jsonl", rows)
    with pytest.raises(DataError, match=message) as err:
        load(task, path)
    assert str(path) in str(err.value)


def test_registry_accepts_a_user_task_and_refuses_duplicates(tmp_path):
    @register("my_yes_no_test")
    def mine(path):
        return [TaskExample("Q?", ["no", "yes"], 1)]

    assert get_task("my_yes_no_test").load(tmp_path)[0].target == "yes"
    with pytest.raises(ValueError, match="already registered"):
        register("sst2")(mine)
    with pytest.raises(DataError, match="not registered"):
        get_task("nope")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_choice_scores_pick_the_most_likely_candidate(family):
    """Batched candidate scoring agrees with scoring every full sequence on its own."""
    from conftest import make_tokenizer, tiny_model

    from lorachain.data import Example
    from lorachain.training.evaluate import choice_scores, sequence_logprobs

    tok, model = make_tokenizer(), tiny_model(family)
    prompts = ["Review : good film Sentiment :", "Review : dull plot Sentiment :", "the movie was"]
    cands = [[" positive", " negative"], [" negative", " positive", " fine"], [" good great", " bad"]]
    scores = choice_scores(model, tok, [TaskExample(p, c, 0) for p, c in zip(prompts, cands, strict=True)], 2)
    preds = [max(range(len(s)), key=s.__getitem__) for s in scores]
    for prompt, options, pred in zip(prompts, cands, preds, strict=True):
        p_ids = tok(prompt)["input_ids"]
        seqs = [
            Example(
                p_ids + tok(c, add_special_tokens=False)["input_ids"],
                [-100] * len(p_ids) + tok(c, add_special_tokens=False)["input_ids"],
                None,
                len(p_ids),
            )
            for c in options
        ]
        scores = [s for s, _ in sequence_logprobs(model, seqs, 0, 8)]
        assert pred == max(range(len(options)), key=scores.__getitem__)


def test_protocol_sampling_counts_and_disjointness():
    from lorachain.tasks.protocol import sample_splits

    train = [TaskExample(f"t{i}", ["a", "b"], 0) for i in range(2000)]
    val = [TaskExample(f"v{i}", ["a", "b"], 0) for i in range(1500)]
    s = sample_splits(train, val, seed=1)
    assert s.counts == {"train": 1000, "val": 500, "test": 1000, "borrowed_from_validation": 0}
    assert all(e.prompt.startswith("v") for e in s.test) and all(
        e.prompt.startswith("t") for e in s.train + s.val
    )
    assert (
        sample_splits(train, val, seed=1).train == s.train
        and sample_splits(train, val, seed=2).train != s.train
    )
    # a tiny train split (BoolQ here has 32 rows): the rest comes from validation rows not in test
    small = sample_splits(train[:32], val, seed=0)  # 32 train rows + the 500 validation rows left
    assert small.counts == {"train": 355, "val": 177, "test": 1000, "borrowed_from_validation": 500}
    assert not {e.prompt for e in small.test} & {e.prompt for e in small.train + small.val}


class Prefers(torch.nn.Module):
    """A fake causal LM whose next-token distribution always favours `favourite`, then `second`."""

    def __init__(self, favourite: int, second: int, vocab: int = 64) -> None:
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(vocab))
        with torch.no_grad():
            self.bias[favourite], self.bias[second] = 5.0, 2.0

    def forward(self, input_ids, attention_mask=None, logits_to_keep=None, **kw):
        from types import SimpleNamespace

        logits = self.bias.expand(*input_ids.shape, -1)
        if logits_to_keep is not None:
            logits = logits[logits_to_keep]
        return SimpleNamespace(logits=logits)


def test_candidate_scoring_picks_what_the_model_prefers():
    from conftest import make_tokenizer

    from lorachain.tasks import Task
    from lorachain.training.evaluate import choice_scores, score_task

    tok = make_tokenizer()
    pos, neg = tok.convert_tokens_to_ids(["positive", "negative"])
    task = Task("t", lambda p: [], "accuracy", "classification")
    exs = [
        TaskExample("Review : good", [" negative", " positive"], 1),
        TaskExample("dull", [" negative", " positive"], 0),
    ]
    assert score_task(Prefers(pos, neg), tok, task, exs) == {"accuracy": 0.5, "score": 0.5, "n": 2}
    assert score_task(Prefers(neg, pos), tok, task, exs)["accuracy"] == 0.5
    (s,) = choice_scores(Prefers(pos, neg), tok, exs[:1])
    norm = math.log(math.exp(5.0) + math.exp(2.0) + 62)  # log-softmax of the fake model's bias
    assert s == pytest.approx([2.0 - norm, 5.0 - norm], abs=1e-5)
    # multi-token candidates with mean log-prob: two favourite tokens beat one favourite + one other
    mc = Task("m", lambda p: [], "accuracy", "multiple_choice")
    two = [TaskExample("the", [" positive negative", " positive positive"], 1)]
    assert score_task(Prefers(pos, neg), tok, mc, two)["accuracy"] == 1.0
    # MultiRC's F1a over answer options: predicts "Yes" everywhere -> tp=2, fp=1 -> F1 = 0.8
    yes = tok.convert_tokens_to_ids("great")
    f1 = Task("f", lambda p: [], "f1", "classification")
    opts = [TaskExample("q", [" bad", " great"], g, group="q") for g in (1, 1, 0)]
    assert score_task(Prefers(yes, pos), tok, f1, opts)["f1"] == pytest.approx(0.8)


def test_record_scores_the_chosen_entity_by_em_and_f1():
    from conftest import make_tokenizer

    from lorachain.tasks import Task
    from lorachain.training.evaluate import score_task

    tok = make_tokenizer()
    fav = tok.convert_tokens_to_ids("film")
    task = Task("r", lambda p: [], "em_f1", "multiple_choice")
    ex = TaskExample("plot", [" film was", " movie was"], 0, answers=["film"])
    assert score_task(Prefers(fav, 4), tok, task, [ex]) == {"em": 1.0, "f1": 1.0, "score": 1.0, "n": 1}
    wrong = TaskExample("plot", [" film was", " movie was"], 1, answers=["the movie"])
    assert score_task(Prefers(fav, 4), tok, task, [wrong])["em"] == 0.0


def test_greedy_generation_matches_one_prompt_at_a_time():
    """Left-padded batches decode exactly what each prompt decodes alone; EM/F1 score the text."""
    from conftest import make_tokenizer, tiny_model

    from lorachain.tasks import Task
    from lorachain.training.evaluate import generate_greedy, score_task

    tok, model = make_tokenizer(), tiny_model("llama")
    prompts = ["Review : good film", "the", "the movie was very dull and the plot"]
    batched = generate_greedy(model, tok, prompts, max_new_tokens=4, batch_size=3, max_length=32)
    alone = [
        generate_greedy(model, tok, [p], max_new_tokens=4, batch_size=1, max_length=32)[0] for p in prompts
    ]
    assert batched == alone and all(isinstance(t, str) for t in batched)
    task = Task("g", lambda p: [], "em_f1", "generation")
    exs = [TaskExample(p, answers=[f" {t}", " nothing"]) for p, t in zip(prompts, batched, strict=True)]
    assert score_task(model, tok, task, exs, max_length=32, max_new_tokens=4)["em"] == 1.0


def test_encoder_classifier_scores_by_its_head():
    from conftest import make_tokenizer, tiny_model

    from lorachain.tasks import Task
    from lorachain.training.evaluate import classifier_scores, score_task

    tok, model = make_tokenizer(), tiny_model("bert")
    exs = [TaskExample("good film", [" no", " yes"], 1), TaskExample("dull plot", [" no", " yes"], 0)]
    logits = classifier_scores(model, tok, exs, batch_size=2, max_length=16)
    want = [max(range(2), key=row.__getitem__) for row in logits]
    acc = score_task(model, tok, Task("c", lambda p: [], "accuracy", "classification"), exs, classifier=True)
    assert acc["accuracy"] == sum(w == e.gold for w, e in zip(want, exs, strict=True)) / 2
    assert len(logits) == 2 and len(logits[0]) == 2


REAL = Path(__file__).parent / "data" / "real"  # the first rows of each official file in ../shared/data


def _raw(name: str) -> list[dict]:
    return [json.loads(line) for line in (REAL / f"{name}.jsonl").read_text().splitlines()]


def test_loaders_on_real_rows():
    """Label mapping and candidate sets on rows copied from the official files."""
    sst2 = get_task("sst2").load(REAL / "sst2.jsonl")
    assert [e.gold for e in sst2] == [r["label"] for r in _raw("sst2")] == [1, 0, 1]
    rte = get_task("rte").load(REAL / "rte.jsonl")
    assert [e.gold for e in rte] == [int(r["label"] == "entailment") for r in _raw("rte")]
    order = {"contradiction": 0, "entailment": 1, "neutral": 2}
    cb = get_task("cb").load(REAL / "cb.jsonl")
    assert [e.gold for e in cb] == [order[r["label"]] for r in _raw("cb")] and len(cb[0].candidates) == 3
    for name in ("wsc", "wic", "boolq"):
        ex = get_task(name).load(REAL / f"{name}.jsonl")
        assert [e.gold for e in ex] == [int(r["label"]) for r in _raw(name)] and ex[0].candidates == [
            "No",
            "Yes",
        ]
    copa = get_task("copa").load(REAL / "copa.jsonl")
    for e, r in zip(copa, _raw("copa"), strict=True):
        assert (
            e.gold == r["label"]
            and e.candidates[e.gold].strip().lower() == r[f"choice{r['label'] + 1}"].lower()
        )
        assert e.prompt.endswith(" so" if r["question"] == "effect" else " because")
    multirc = get_task("multirc").load(REAL / "multirc.jsonl")
    options = [a for q in _raw("multirc")[0]["passage"]["questions"] for a in q["answers"]]
    assert [e.gold for e in multirc] == [a["label"] for a in options] and len({e.group for e in multirc}) > 1
    (record,) = get_task("record").load(REAL / "record.jsonl")
    assert record.candidates[record.gold].strip().startswith(record.answers[0]) and len(record.candidates) > 5
    squad = get_task("squad").load(REAL / "squad.json")
    assert [e.answers for e in squad] == [[" 308"], [" 136"], [" 118"]]
    (drop,) = get_task("drop").load(REAL / "drop.json")
    assert drop.answers == [" transit"] and drop.prompt.endswith("Answer:")
