"""Task routing on chat rows: a chat store trains its adapters through the chat template, records
its prompt format, routes on the system prompt plus the last user turn, and its adapters answer
(in the server too) from the whole conversation."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from chatkit import chat_model, chat_tokenizer
from conftest import write_jsonl

from lorachain.config import RunConfig, from_dict
from lorachain.data import DataError, load_examples
from lorachain.data.chat import chat_template, generation_ids, selector_text
from lorachain.routing.config import RouteConfig
from lorachain.routing.data import read_chat_rows
from lorachain.routing.eval.store import route_eval
from lorachain.routing.train import route_train
from lorachain.serve.api import create_app
from lorachain.serve.engine import Engine
from lorachain.serve.router import Router
from lorachain.store import CHAT_FORMAT, read_manifest

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}


def name_chat(name: str, question: str = "What is my name?") -> list[dict]:
    return [
        SYSTEM,
        {"role": "user", "content": f"My name is {name}."},
        {"role": "assistant", "content": "Nice to meet you."},
        {"role": "user", "content": question},
    ]


def route_chat_rows(n: int, seed: int = 0) -> list[dict]:
    """Two tasks: `names` (the answer repeats a name given in the first turn), `colours`."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        name = rng.choice(["Ada", "Bob", "Eve"])
        rows.append({"messages": [*name_chat(name), {"role": "assistant", "content": name}], "task": "names"})
        thing, colour = rng.choice([("sky", "blue"), ("grass", "green")])
        convo = [
            {"role": "user", "content": f"What colour is the {thing}?"},
            {"role": "assistant", "content": colour},
        ]
        rows.append({"messages": convo, "task": "colours"})
    return rows


@pytest.fixture(scope="module")
def chat_store(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("chatroute")
    data = write_jsonl(tmp / "rows.jsonl", route_chat_rows(10))
    cfg = from_dict(
        RouteConfig,
        {
            "model": {"name_or_path": "tiny-chat"},
            "data": {"path": str(data), "max_length": 96},  # format auto: chat rows detected
            "prompt": "{instruction} =>",
            "task_prompt": "{instruction} task:",
            "chain": {"links": [{"rank": 4, "alpha": 8}], "dropout": 0.0},
            "optim": {"lr": 0.02},
            "train": {"epochs": 2, "batch_size": 4},
            "selector": {"kind": "lora"},
            "output_dir": str(tmp / "store"),
        },
    )
    tok = chat_tokenizer("chatml")
    assert route_train(cfg, chat_model(tok), tok, progress=False) is not None
    return tmp / "store"


def test_chat_store_records_its_format_and_trains_on_assistant_turns(chat_store):
    manifest = read_manifest(chat_store)
    assert manifest.format == CHAT_FORMAT
    assert manifest.templates["chat"] is True and manifest.templates["selector_input"] == "system_last_user"
    rows = [json.loads(x) for x in (chat_store / "splits" / "train.jsonl").read_text().splitlines()]
    names = next(r for r in rows if r["task"] == "names")
    assert names["instruction"] == "You are a helpful assistant.\nWhat is my name?"  # what the selector reads
    assert names["messages"][1]["content"].startswith("My name is")
    run = from_dict(RunConfig, json.loads((chat_store / "runs" / "names" / "config.json").read_text()))
    assert run.data.format == "chat" and run.data.messages_field == "messages"
    tok = chat_tokenizer("chatml")
    e = load_examples(run.data.train, run.data, tok, False)[0]
    trained = tok.decode([y for y in e.labels if y != -100])
    assert trained == f"Nice to meet you.<|im_end|>{names['output']}<|im_end|>"  # both assistant turns


def test_server_passes_every_turn_to_a_chat_store_adapter(chat_store):
    tok = chat_tokenizer("chatml")
    router = Router.from_store(chat_store, model=chat_model(tok), tokenizer=tok)
    engine = Engine(router)
    try:
        server = create_app(engine).state.server
        for model in ("names", "mixed", "auto"):
            body = {"model": model, "messages": name_chat("Zed"), "max_tokens": 4}
            job = server.prepare("chat", json.dumps(body).encode())
            ids = job.gen[0].prompt_ids
            # every turn reaches the model, rendered as the adapters were trained
            assert ids == generation_ids(tok, name_chat("Zed"), chat_template(tok, None), 10_000)
            assert "My name is Zed." in tok.decode(ids) and "helpful assistant" in tok.decode(ids)
            assert job.gen[0].instruction == selector_text(name_chat("Zed"))
        # so the answer depends on the first turn: another name there, other next-token scores
        router.activate("names")
        with torch.no_grad():
            a, b = (
                router.model(input_ids=torch.tensor([router.answer_prompt(name_chat(n))])).logits[0, -1]
                for n in ("Zed", "Ada")
            )
        assert not torch.allclose(a, b)
        answers = router.ask([name_chat("Zed"), "What colour is the sky?"], max_new_tokens=3)
        assert [x.instruction for x in answers] == [
            selector_text(name_chat("Zed")),
            "What colour is the sky?",
        ]
        result = route_eval(router, chat_store, None, max_per_task=2, modes=("score",), max_new_tokens=3)
        ppl = result["perplexity"]  # the final assistant turn of each test conversation
        assert set(ppl["oracle"]) == {"colours", "names"} and all(v > 1 for v in ppl["oracle"].values())
    finally:
        engine.close()


def test_bad_chat_rows_with_task_labels_are_reported_by_line(tmp_path):
    rows = route_chat_rows(1)
    rows.append({"messages": rows[0]["messages"]})  # no task
    rows.append(
        {"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q"}], "task": "x"}
    )
    path = write_jsonl(tmp_path / "r.jsonl", rows)
    with pytest.raises(DataError, match=r"r.jsonl: line 3: missing or empty field 'task' \(and 1 more\)"):
        read_chat_rows(path)
    rejected: list[str] = []
    assert len(read_chat_rows(path, rejected=rejected)) == 2
    assert rejected[1].endswith("line 4: turn 1: two 'user' turns in a row (alternation broken)")
