"""Bad input gives one line and a non-zero exit, never a traceback; nothing trains on zero targets;
an interrupted store says it is incomplete (issue 16)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import SMALL, make_tokenizer, route_rows, run_config, tiny_model, write_jsonl
from transformers import LlamaConfig, LlamaForCausalLM

from lorachain.cli import main
from lorachain.config import RunConfig, from_dict
from lorachain.data import DataError
from lorachain.routing import train as routing_train
from lorachain.routing.config import RouteConfig
from lorachain.serve.router import Router
from lorachain.store import StoreError, file_hashes, random_store, read_manifest, write_manifest
from lorachain.training.loop import train

TEMPLATES = {"prompt": "{instruction} =>", "task_prompt": "{instruction} task:", "max_length": 32}


def one_line_error(capsys, argv: list[str], needle: str) -> str:
    capsys.readouterr()  # what the test's own set-up printed
    assert main(argv) == 2
    full = capsys.readouterr().err
    err = full.replace("\r", "\n").strip().splitlines()[-1]  # the last line, after any progress bar
    assert err.startswith("lorachain: error: ") and "Traceback" not in full, full
    assert needle in err, err
    return err


def write_cfg(tmp_path: Path, toy_data, name_or_path: str, **over) -> Path:
    tmp_path.mkdir(exist_ok=True)
    cfg = run_config(tmp_path, toy_data, "llama", **over)
    cfg["model"]["name_or_path"] = name_or_path
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_train_with_a_missing_model_folder(tmp_path, toy_data, capsys):
    cfg = write_cfg(tmp_path, toy_data, str(tmp_path / "no-such-model"))
    one_line_error(capsys, ["train", str(cfg)], "no-such-model is not a model folder")
    cfg = write_cfg(tmp_path / "hub", toy_data, "nobody/no-such-model-xyz")
    one_line_error(capsys, ["train", str(cfg)], "'nobody/no-such-model-xyz' is not a local folder")


def test_train_with_a_model_folder_without_tokenizer(tmp_path, toy_data, capsys):
    folder = tmp_path / "weights-only"
    tiny_model("llama").save_pretrained(folder)
    cfg = write_cfg(tmp_path, toy_data, str(folder))
    one_line_error(capsys, ["train", str(cfg)], "has no loadable tokenizer")


def test_output_dir_that_is_a_file(tmp_path, toy_data, tiny_dir, capsys):
    (tmp_path / "run").write_text("not a folder")
    cfg = write_cfg(tmp_path, toy_data, str(tiny_dir))
    one_line_error(capsys, ["train", str(cfg)], "output_dir: ")
    assert (tmp_path / "run").read_text() == "not a folder"


def test_label_word_without_tokens_is_refused_before_training(tmp_path, toy_data):
    cfg = run_config(
        tmp_path, toy_data, data__label_words={"0": " ", "1": "positive"}, data__target="{label}"
    )
    with pytest.raises(
        DataError, match=r"data.label_words\['0'\]: ' ' tokenises to no tokens with tokenizer"
    ):
        train(from_dict(RunConfig, cfg), tiny_model("llama"), make_tokenizer(), progress=False)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    cfg = run_config(tmp_path / "b", toy_data, data__label_words=None, data__target=" ", data__eos=False)
    with pytest.raises(DataError, match="no row yields a target token"):
        train(from_dict(RunConfig, cfg), tiny_model("llama"), make_tokenizer(), progress=False)


def test_batch_without_targets_is_counted_not_a_zero_loss(tmp_path):
    rows = [{"text": "good film", "out": "good" if i % 2 else " "} for i in range(8)]
    data = str(write_jsonl(tmp_path / "rows.jsonl", rows))
    cfg = run_config(
        tmp_path,
        (data, data),
        data__target=" {out}",
        data__label_words=None,
        data__eos=False,
        train={"max_steps": 8, "batch_size": 1, "seed": 0, "save_every": 100},
        chain={"links": [{"rank": 2, "alpha": 4}], "dropout": 0.0},
    )
    summary = train(from_dict(RunConfig, cfg), tiny_model("llama"), make_tokenizer(), progress=False).summary
    assert summary["links"][0]["empty_batches"] == 4 and summary["links"][0]["final_loss"] > 0
    logged = [json.loads(x)["loss"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(logged) == 4 and all(loss > 0 for loss in logged)  # no step reports a loss of 0


def _tiny_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


def test_ask_with_a_selector_from_another_base(tmp_path, capsys):
    folder = _tiny_folder(tmp_path)
    store = tmp_path / "store"
    random_store(store, tiny_model("llama"), ["alpha"], TEMPLATES, rank=4, base_name=str(folder))
    other = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            **SMALL,
        )
    )
    random_store(tmp_path / "other", other, ["alpha"], TEMPLATES, rank=4)
    shutil.rmtree(store / "adapters" / "_selector")
    shutil.copytree(tmp_path / "other" / "adapters" / "_selector", store / "adapters" / "_selector")
    m = read_manifest(store)
    m.adapters["_selector"]["files"] = file_hashes(store / "adapters" / "_selector", store)
    write_manifest(store, m)
    one_line_error(capsys, ["ask", str(store), "red sky"], "_selector: does not fit the base model")


def test_interrupted_route_train_leaves_an_incomplete_store_that_resumes(tmp_path, monkeypatch, capsys):
    folder = _tiny_folder(tmp_path)
    data = write_jsonl(tmp_path / "rows.jsonl", route_rows(8))
    cfg = from_dict(
        RouteConfig,
        {
            "model": {"name_or_path": str(folder)},
            "data": {"path": str(data), "max_length": 16},
            "prompt": "{instruction} =>",
            "task_prompt": "{instruction} task:",
            "chain": {"links": [{"rank": 2, "alpha": 4}], "dropout": 0.0},
            "train": {"max_steps": 2, "batch_size": 4},
            "selector": {"kind": "lora"},
            "output_dir": str(tmp_path / "store"),
        },
    )
    real, calls = routing_train.train, []

    def interrupted_second(run_cfg, model, tok, progress=True):
        calls.append(run_cfg.output_dir)
        return real(run_cfg, model, tok, progress=progress, stop_after=1 if len(calls) == 2 else None)

    monkeypatch.setattr(routing_train, "train", interrupted_second)
    assert routing_train.route_train(cfg, tiny_model("llama"), make_tokenizer(), progress=False) is None
    m = read_manifest(tmp_path / "store")
    assert m.complete is False and list(m.adapters) == ["alpha"]
    one_line_error(capsys, ["ask", str(tmp_path / "store"), "red sky"], "the store is incomplete (1 adapters")
    with pytest.raises(StoreError, match="incomplete"):
        Router.from_store(tmp_path / "store", model=tiny_model("llama"), tokenizer=make_tokenizer())
    monkeypatch.undo()
    manifest = routing_train.route_train(cfg, tiny_model("llama"), make_tokenizer(), progress=False)
    assert manifest.complete and len(read_manifest(tmp_path / "store").adapters) == 5
    summary = json.loads((tmp_path / "store" / "runs" / "beta" / "summary.json").read_text())
    assert summary["total_steps"] == 2  # the interrupted adapter was resumed and finished
    assert Router.from_store(tmp_path / "store", model=tiny_model("llama"), tokenizer=make_tokenizer())
