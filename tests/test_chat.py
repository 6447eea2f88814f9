"""Chat rows: OpenAI/ShareGPT parsing, assistant-only labels on three template families,
truncation, bad rows by file and line, and `lorachain train` on a messages file."""

from __future__ import annotations

import json

import pytest
from chatkit import CONVERSATION, FAMILIES, chat_model, chat_rows, chat_tokenizer
from conftest import write_jsonl

from lorachain.config import DataConfig, load_config
from lorachain.data import DataError, load_examples
from lorachain.data.chat import BadRow, chat_template, encode_chat, generation_ids, parse_messages
from lorachain.training.loop import train

SHAREGPT = {"user": "human", "assistant": "gpt"}


def labelled_runs(tok, e) -> list[str]:
    """The text of each run of consecutive labelled tokens."""
    runs, cur = [], []
    for i, y in zip(e.input_ids, e.labels, strict=True):
        if y != -100:
            assert y == i
            cur.append(i)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    return runs + ([tok.decode(cur)] if cur else [])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_labels_only_on_assistant_turns(family):
    tok = chat_tokenizer(family)
    eot = FAMILIES[family][2]
    tpl = chat_template(tok, None)
    e = encode_chat(tok, CONVERSATION, tpl, 512)
    assert labelled_runs(tok, e) == [f"Nice to meet you.{eot}", f"Your name is Ada.{eot}"]
    last = encode_chat(tok, CONVERSATION, tpl, 512, train_on="last")
    assert labelled_runs(tok, last) == [f"Your name is Ada.{eot}"]
    assert last.input_ids == e.input_ids
    # the prompt the model answers from is the conversation up to the final turn's generation prompt
    prompt = generation_ids(tok, CONVERSATION[:-1], tpl, 512)
    assert e.input_ids[: e.prompt_len] == prompt
    # no system or user token is labelled: every labelled position lies after a generation prompt
    text = tok.decode([i for i, y in zip(e.input_ids, e.labels, strict=True) if y != -100])
    assert "Ada." in text and "My name" not in text and "helpful" not in text


def test_sharegpt_parts_and_tool_turns():
    share = {
        "conversations": [
            {"from": "human", "value": "hi"},
            {"from": "gpt", "value": "hello"},
        ]
    }
    assert parse_messages(share) == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
    ]
    parts = {
        "messages": [
            {"role": "developer", "content": [{"type": "text", "text": "be brief"}]},
            {"role": "user", "content": [{"type": "text", "text": "weather?"}]},
            {"role": "assistant", "content": None, "tool_calls": [{"name": "weather"}]},
            {"role": "tool", "content": "sunny"},
            {"role": "assistant", "content": "It is sunny."},
        ]
    }
    got = parse_messages(parts)
    assert [m["role"] for m in got] == ["system", "user", "assistant", "tool", "assistant"]
    assert got[2]["content"] == '[{"name": "weather"}]'
    tok = chat_tokenizer("chatml")
    e = encode_chat(tok, got, chat_template(tok, None), 512)
    assert labelled_runs(tok, e) == ['[{"name": "weather"}]<|im_end|>', "It is sunny.<|im_end|>"]
    assert "<|im_start|>tool\nsunny<|im_end|>" in tok.decode(e.input_ids)


@pytest.mark.parametrize(
    ("messages", "reason"),
    [
        ([{"role": "robot", "content": "x"}], "turn 0: unknown role 'robot'"),
        ([{"role": "user", "content": " "}, {"role": "assistant", "content": "a"}], "turn 0: empty content"),
        ([{"role": "user", "content": "q"}], "no assistant turn"),
        ([{"role": "assistant", "content": "a"}], "turn 0: conversation starts with 'assistant'"),
        (
            [{"role": "user", "content": "q"}, {"role": "user", "content": "q"}],
            "turn 1: two 'user' turns in a row",
        ),
        (
            [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "a"},
                {"role": "system", "content": "s"},
            ],
            "turn 2: system message after the first turn",
        ),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": 3}], "turn 1: content should"),
    ],
)
def test_bad_rows_give_reasons(messages, reason):
    with pytest.raises(BadRow, match=reason.replace("(", r"\(")):
        parse_messages({"messages": messages})


def test_bad_rows_by_file_and_line_or_skipped(tmp_path, capsys):
    tok = chat_tokenizer("chatml")
    good = chat_rows(3)
    bad = {"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "again"}]}
    path = write_jsonl(tmp_path / "c.jsonl", [good[0], bad, good[1], {"messages": []}, good[2]])
    cfg = DataConfig(train=str(path), format="chat", max_length=128)
    with pytest.raises(DataError, match=r"c.jsonl: line 2: turn 1: two 'user' turns in a row"):
        load_examples(str(path), cfg, tok, classifier=False)
    rejected: list[str] = []
    skip = DataConfig(train=str(path), format="chat", max_length=128, on_bad_rows="skip")
    examples = load_examples(str(path), skip, tok, classifier=False, rejected=rejected)
    assert len(examples) == 3  # nothing else is lost
    assert [r.split(": ")[1] for r in rejected] == ["line 2", "line 4"]
    err = capsys.readouterr().err
    assert "c.jsonl: line 4: field 'messages' should be a non-empty list" in err
    assert "skipped 2 of 5 rows" in err


def test_formats_detected_and_equal(tmp_path):
    pytest.importorskip("pyarrow")
    import pyarrow as pa
    import pyarrow.parquet as pq

    tok = chat_tokenizer("llama3")
    rows = chat_rows(4, seed=1)
    share = [
        {
            "conversations": [
                {
                    "from": {"user": "human", "assistant": "gpt"}.get(m["role"], m["role"]),
                    "value": m["content"],
                }
                for m in r["messages"]
            ]
        }
        for r in rows
    ]
    write_jsonl(tmp_path / "a.jsonl", rows)
    (tmp_path / "a.json").write_text(json.dumps(share))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    cfg = DataConfig(train="x", max_length=128)  # format: auto
    got = [
        [(e.input_ids, e.labels) for e in load_examples(str(tmp_path / f"a.{ext}"), cfg, tok, False)]
        for ext in ("jsonl", "json", "parquet")
    ]
    assert got[0] == got[1] == got[2] and len(got[0]) == 4


def test_no_template_and_override(tmp_path):
    tok = chat_tokenizer("chatml", template=False)
    path = write_jsonl(tmp_path / "c.jsonl", chat_rows(2))
    with pytest.raises(DataError, match="data.chat_template: the tokenizer .* has no chat template"):
        load_examples(str(path), DataConfig(train=str(path)), tok, False)
    (tmp_path / "t.jinja").write_text(FAMILIES["llama3"][0])
    cfg = DataConfig(train=str(path), chat_template=str(tmp_path / "t.jinja"))
    e = load_examples(str(path), cfg, chat_tokenizer("llama3", template=False), False)[0]
    assert e.input_ids[:2] == chat_tokenizer("llama3").convert_tokens_to_ids(
        ["<|begin_of_text|>", "<|start_header_id|>"]
    )


def test_long_rows_cut_from_the_left_never_the_final_turn():
    tok = chat_tokenizer("chatml")
    tpl = chat_template(tok, None)
    full = encode_chat(tok, CONVERSATION, tpl, 512)
    n = len(full.input_ids)
    e = encode_chat(tok, CONVERSATION, tpl, n - 5)
    # the trailing newline (no loss) goes first, then context from the left
    assert len(e.input_ids) == n - 5 and e.input_ids == full.input_ids[4:-1]
    assert labelled_runs(tok, e)[-1] == "Your name is Ada.<|im_end|>"
    final = len(tok("Your name is Ada.<|im_end|>", add_special_tokens=False)["input_ids"])
    with pytest.raises(BadRow, match="final assistant turn alone needs"):
        encode_chat(tok, CONVERSATION, tpl, final)
    assert encode_chat(tok, CONVERSATION, tpl, final + 1).labels[1:] == full.labels[-final - 1 : -1]
    with pytest.raises(BadRow, match=f"too long: {n} tokens > data.max_length {n - 1}"):
        encode_chat(tok, CONVERSATION, tpl, n - 1, on_too_long="skip")


def test_prefix_unstable_template_is_refused():
    tok = chat_tokenizer("chatml")
    unstable = "{% for m in messages %}{{ m['content'] }}{% if loop.last %}<|im_end|>{% endif %}{% endfor %}"
    with pytest.raises(BadRow, match="turn 1: the chat template renders this turn differently"):
        encode_chat(tok, CONVERSATION[1:], unstable, 512)


def test_text_rows_unchanged_by_auto(tmp_path, tokenizer, toy_data):
    from lorachain.data import is_chat, read_rows

    cfg = DataConfig(
        train=toy_data[0], prompt="Review : {text} Sentiment :", label_words={"0": "a", "1": "b"}
    )
    assert not is_chat(cfg, read_rows(toy_data[0]))
    chat_file = str(write_jsonl(tmp_path / "c.jsonl", chat_rows(1)))
    with pytest.raises(DataError, match="missing field 'text'"):
        load_examples(chat_file, DataConfig(train="x", format="text"), tokenizer, False)


def test_lorachain_train_on_messages_file(tmp_path):
    """`lorachain train` on an OpenAI-messages file: only assistant tokens carry loss, and the
    chain trains (loss falls) and exports."""
    tok = chat_tokenizer("chatml")
    train_path = write_jsonl(tmp_path / "train.jsonl", chat_rows(24, seed=0))
    eval_path = write_jsonl(tmp_path / "eval.jsonl", chat_rows(8, seed=1))
    cfg = load_config(
        None,
        [
            f"data.train={train_path}",
            f"data.eval={eval_path}",
            f"output_dir={tmp_path / 'run'}",
        ],
        base={
            "model": {"name_or_path": "tiny-chat"},
            "data": {"max_length": 96, "train_on": "all_assistant"},
            "chain": {"links": [{"rank": 4, "alpha": 8}, {"rank": 2, "alpha": 4}], "dropout": 0.0},
            "optim": {"lr": 0.02},
            "train": {"epochs": 3, "batch_size": 8, "save_every": 100},
        },
    )
    examples = load_examples(str(train_path), cfg.data, tok, False)
    for e, row in zip(examples, chat_rows(24, seed=0), strict=True):
        answers = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        assert labelled_runs(tok, e) == [f"{a}<|im_end|>" for a in answers]
    result = train(cfg, chat_model(tok), tok, progress=False)
    links = result.summary["links"]
    assert result.summary["status"] == "finished" and len(links) == 2
    assert links[-1]["eval"]["eval_loss"] < links[0]["eval"]["eval_loss"]
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
