"""Reading rows and turning them into examples: formats, templates, labels, errors."""

from __future__ import annotations

import json

import pytest

from lorachain.config import DataConfig
from lorachain.data import DataError, batch_order, encode_row, load_examples, micro_batches, read_rows

CFG = DataConfig(
    train="x",
    prompt="Review : {text} Sentiment :",
    target=" {label}",
    label_words={"0": "negative", "1": "positive"},
    max_length=16,
)


def test_read_jsonl_json_csv(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "a", "label": 1}\n\n{"text": "b", "label": 0}\n')
    (tmp_path / "a.json").write_text(json.dumps([{"text": "a", "label": 1}]))
    (tmp_path / "a.csv").write_text("text,label\na,1\nb,0\n")
    assert [i for i, _ in read_rows(tmp_path / "a.jsonl")] == [1, 3]
    assert read_rows(tmp_path / "a.json") == [(1, {"text": "a", "label": 1})]
    assert read_rows(tmp_path / "a.csv") == [
        (2, {"text": "a", "label": "1"}),
        (3, {"text": "b", "label": "0"}),
    ]


def test_unicode_line_separators_inside_strings(tmp_path):
    (tmp_path / "u.jsonl").write_text('{"text": "a\u2028b\x85c", "label": 1}\r\n{"text": "d", "label": 0}\n')
    rows = read_rows(tmp_path / "u.jsonl")
    assert [i for i, _ in rows] == [1, 2] and rows[0][1]["text"] == "a\u2028b\x85c"


def test_bad_json_names_line(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(DataError, match=r"a.jsonl: line 2: not valid JSON"):
        read_rows(tmp_path / "a.jsonl")
    (tmp_path / "b.jsonl").write_text('["not", "an", "object"]\n')
    with pytest.raises(DataError, match="line 1: expected an object"):
        read_rows(tmp_path / "b.jsonl")


def test_encode_causal_row_masks_prompt(tokenizer):
    e = encode_row(CFG, tokenizer, {"text": "good film", "label": 1}, "f: line 1", classifier=False)
    words = tokenizer.convert_ids_to_tokens(e.input_ids)
    assert words == ["Review", ":", "good", "film", "Sentiment", ":", "positive"]
    assert e.labels == [-100] * 6 + [tokenizer.convert_tokens_to_ids("positive")]
    assert e.label == 1 and e.prompt_len == 6


def test_truncation_keeps_target(tokenizer):
    cfg = DataConfig(
        train="x", prompt="{text}", target=" {label}", label_words={"0": "bad", "1": "good"}, max_length=4
    )
    e = encode_row(cfg, tokenizer, {"text": "the film was very dull", "label": 0}, "w", classifier=False)
    assert len(e.input_ids) == 4 and e.labels[-1] == tokenizer.convert_tokens_to_ids("bad")


def test_bool_labels_and_classifier_rows(tokenizer):
    cfg = DataConfig(train="x", prompt="{text}", label_words={"false": "no", "true": "yes"})
    e = encode_row(cfg, tokenizer, {"text": "good", "label": True}, "w", classifier=True)
    assert e.labels == [1] and e.label == 1


def test_missing_field_names_file_line_field(tmp_path, tokenizer):
    (tmp_path / "t.jsonl").write_text('{"text": "good", "label": 1}\n{"txt": "bad", "label": 0}\n')
    with pytest.raises(DataError, match=r"t.jsonl: line 2: missing field 'text'"):
        load_examples(str(tmp_path / "t.jsonl"), CFG, tokenizer, classifier=False)


def test_batch_order_is_reproducible_and_covers_epoch():
    assert batch_order(10, 0, 0) == batch_order(10, 0, 0)
    assert batch_order(10, 0, 0) != batch_order(10, 0, 1)
    examples = list(range(10))
    seen = [x for step in range(3) for mb in micro_batches(examples, step, 2, 2, 0) for x in mb]
    assert sorted(seen) == examples and len(seen) == 10  # 3 steps of 4 cover one epoch of 10
