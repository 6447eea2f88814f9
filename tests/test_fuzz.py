"""Hypothesis fuzzing of every loader and config parser: malformed input gives our own one-line
error (ConfigError, DataError, StoreError) or a correct result, never a dependency's traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_tokenizer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorachain.config import (
    ConfigError,
    DataConfig,
    RunConfig,
    from_dict,
    load_config,
    set_dotted,
)
from lorachain.data import DataError, encode_row, read_rows
from lorachain.routing.config import RouteConfig
from lorachain.routing.data import read_instruction_rows
from lorachain.routing.eval.judge import human_rates
from lorachain.store import StoreError, read_manifest

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
text = st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=40)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-(10**12), 10**12), st.floats(allow_nan=True), text)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(text, inner, max_size=4)),
    max_leaves=12,
)
VALID = {"model": {"name_or_path": "m"}, "data": {"train": "t.jsonl"}}
KEYS = [
    "model",
    "data",
    "chain",
    "optim",
    "train",
    "output_dir",
    "export_merged",
    "model.task",
    "model.dtype",
    "data.prompt",
    "data.label_words",
    "data.max_length",
    "chain.links",
    "chain.links.0",
    "chain.links.0.rank",
    "chain.dropout",
    "chain.knot.policy",
    "chain.knot.window",
    "optim.lr",
    "optim.name",
    "train.epochs",
    "train.max_steps",
    "train.batch_size",
    "chain.target_modules",
    "chain.method",
]


def _put(data: dict, dotted: str, value) -> None:
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        if isinstance(node, list):
            if not node:
                return
            node = node[0]
            continue
        if not isinstance(node.get(part), dict | list):
            node[part] = {}
        node = node[part]
    if isinstance(node, dict):
        node[parts[-1]] = value


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(KEYS), values), max_size=4))
def test_run_config_fuzz(edits):
    data = json.loads(json.dumps(VALID))
    for key, value in edits:
        _put(data, key, value)
    try:
        cfg = from_dict(RunConfig, data)
    except ConfigError as e:
        assert "\n" not in str(e) or len(str(e)) < 2000
        return
    assert cfg.model.name_or_path and cfg.chain.links and all(link.rank > 0 for link in cfg.chain.links)


@FUZZ
@given(values)
def test_route_config_fuzz(value):
    data = {"model": {"name_or_path": "m"}, "data": {"path": "x.jsonl", "split": value}}
    try:
        cfg = from_dict(RouteConfig, data)
    except ConfigError:
        return
    assert abs(sum(cfg.data.split) - 1) < 1e-6


@FUZZ
@given(text)
def test_overrides_fuzz(override):
    data = json.loads(json.dumps(VALID))
    try:
        set_dotted(data, override)
    except ConfigError:
        return
    assert isinstance(data, dict)


@FUZZ
@given(st.text(max_size=300))
def test_yaml_config_fuzz(tmp_path_factory, body):
    path = tmp_path_factory.mktemp("y") / "c.yaml"
    path.write_text(body, encoding="utf-8")
    with pytest.raises(ConfigError):
        load_config(path)  # no random text is a complete valid config


@FUZZ
@given(st.sampled_from([".jsonl", ".json", ".csv"]), st.binary(max_size=300))
def test_read_rows_fuzz(tmp_path_factory, suffix, raw):
    path = tmp_path_factory.mktemp("r") / f"rows{suffix}"
    path.write_bytes(raw)
    try:
        rows = read_rows(path)
    except DataError as e:
        assert str(path) in str(e)
        return
    assert all(isinstance(i, int) and isinstance(r, dict) for i, r in rows)


@FUZZ
@given(
    st.lists(
        st.dictionaries(st.sampled_from(["instruction", "output", "task", "x"]), values, max_size=4),
        max_size=6,
    )
)
def test_instruction_rows_fuzz(tmp_path_factory, rows):
    path = tmp_path_factory.mktemp("i") / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    try:
        got = read_instruction_rows(path)
    except DataError as e:
        assert str(path) in str(e)
        return
    assert all(r.instruction and r.output and r.task for r in got)


TOKENIZER = make_tokenizer()


@FUZZ
@given(
    st.dictionaries(st.sampled_from(["text", "label", "other"]), values, max_size=3),
    st.sampled_from(["{text}", "Review : {text} {other}", "{label}", "{text!r}", "{text[0]}"]),
)
def test_encode_row_fuzz(row, prompt):
    cfg = DataConfig(
        train="x", prompt=prompt, target=" {label}", label_words={"0": "bad", "1": "good"}, max_length=8
    )
    try:
        e = encode_row(cfg, TOKENIZER, row, "f: line 1", classifier=False)
    except DataError as err:
        assert str(err).startswith("f: line 1")
        return
    assert 0 < len(e.input_ids) <= 8 and len(e.labels) == len(e.input_ids) and e.label in (0, 1)


@FUZZ
@given(values)
def test_manifest_fuzz(tmp_path_factory, value):
    root = tmp_path_factory.mktemp("m")
    (root / "manifest.json").write_text(json.dumps(value))
    try:
        m = read_manifest(root)
    except StoreError as e:
        assert "manifest.json" in str(e)
        return
    assert isinstance(m.adapters, dict)


@FUZZ
@given(st.text(max_size=200))
def test_human_sheet_fuzz(tmp_path_factory, body):
    path = Path(tmp_path_factory.mktemp("h")) / "s.csv"
    path.write_text("instruction,task,adapter,answer,rating\n" + body, encoding="utf-8")
    try:
        rates = human_rates(path)
    except DataError as e:
        assert str(path) in str(e)
        return
    assert 0 <= rates["overall"]["pass"] <= 1
