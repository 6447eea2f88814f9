"""lm-evaluation-harness as a real client of `lorachain serve`: local-completions (loglikelihood and
generation) and local-chat-completions agree with lm-eval's own hf+peft backend (issue 16)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_tokenizer, route_rows, toy_rows, write_jsonl
from transformers import LlamaConfig, LlamaForCausalLM

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install lm-eval)")

from lorachain.serve.api import create_app  # noqa: E402
from lorachain.serve.background import BackgroundServer  # noqa: E402
from lorachain.serve.engine import Engine  # noqa: E402
from lorachain.serve.router import Router  # noqa: E402
from lorachain.store import random_store  # noqa: E402

TEMPLATES = {"prompt": "{instruction} =>", "task_prompt": "{instruction} task:", "max_length": 32}
TASKS = """
task: tiny_sst2
dataset_path: json
dataset_kwargs: {{data_files: {{validation: {sst}}}}}
validation_split: validation
output_type: multiple_choice
doc_to_text: "Review : {{{{text}}}} Sentiment :"
doc_to_choice: ["negative", "positive"]
doc_to_target: label
metric_list: [{{metric: acc}}]
---
task: tiny_gen
dataset_path: json
dataset_kwargs: {{data_files: {{validation: {gen}}}}}
validation_split: validation
output_type: generate_until
doc_to_text: "{{{{instruction}}}} =>"
doc_to_target: "{{{{output}}}}"
generation_kwargs: {{until: ["three"], do_sample: false, max_gen_toks: 8}}
metric_list: [{{metric: exact_match}}]
---
task: tiny_gen_chat
dataset_path: json
dataset_kwargs: {{data_files: {{validation: {gen}}}}}
validation_split: validation
output_type: generate_until
doc_to_text: "{{{{instruction}}}}"
doc_to_target: "{{{{output}}}}"
generation_kwargs: {{until: ["three"], do_sample: false, max_gen_toks: 8}}
metric_list: [{{metric: exact_match}}]
"""


def tiny_model(_family: str = "llama") -> LlamaForCausalLM:
    """conftest's tiny Llama with as many embeddings as the tokenizer has tokens: lm-eval's hf
    backend resizes the embeddings to len(tokenizer) before loading a PEFT adapter."""
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        vocab_size=len(make_tokenizer()),
        pad_token_id=0,
        eos_token_id=3,
        bos_token_id=2,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lm_eval")
    model_dir = tmp / "tiny"
    tiny_model("llama").save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    labels = ["alpha", "beta"]
    random_store(tmp / "store", tiny_model("llama"), labels, TEMPLATES, rank=4, base_name=str(model_dir))
    sst = write_jsonl(tmp / "sst.jsonl", toy_rows(12, 5))
    gen = write_jsonl(tmp / "gen.jsonl", route_rows(4, 3))
    tasks = tmp / "tasks"
    tasks.mkdir()
    for text in TASKS.format(sst=sst, gen=gen).split("---"):
        name = next(x.split(": ")[1] for x in text.splitlines() if x.startswith("task:"))
        (tasks / f"{name}.yaml").write_text(text)
    # no selection is ever confident enough: `auto` falls back to the mixed adapter on every request,
    # so through lm-eval it must score exactly as `_mixed` does
    router = Router.from_store(
        tmp / "store", model=tiny_model("llama"), tokenizer=make_tokenizer(), min_confidence=1.01
    )
    engine = Engine(router, max_batch=8, window_ms=5)
    server = BackgroundServer(create_app(engine, max_tokens_limit=16))
    yield {"tmp": tmp, "model": model_dir, "tasks": tasks, "url": server.url}
    server.stop()
    engine.close()


def evaluate(setup, model: str, model_args: str, tasks: list[str], **kw) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=tasks,
        task_manager=TaskManager(include_path=str(setup["tasks"])),
        limit=12,
        log_samples=True,
        **kw,
    )
    return {t: sorted(out["samples"][t], key=lambda s: s["doc_id"]) for t in tasks} | {
        "_results": out["results"]
    }


def responses(samples: list[dict]) -> list:
    return [s["resps"] for s in samples]


@pytest.mark.parametrize(("served", "adapter"), [("alpha", "alpha"), ("auto", "_mixed")])
def test_local_completions_equal_hf_with_peft(setup, served, adapter):
    peft = setup["tmp"] / "store" / "adapters" / adapter
    hf = evaluate(
        setup,
        "hf",
        f"pretrained={setup['model']},peft={peft},dtype=float32,device=cpu",
        ["tiny_sst2", "tiny_gen"],
        batch_size=4,
    )
    api = evaluate(
        setup,
        "local-completions",
        f"model={served},base_url={setup['url']}/v1/completions,tokenizer={setup['model']},max_length=64",
        ["tiny_sst2", "tiny_gen"],
    )
    ours = [float(r[0][0]) for resp in responses(api["tiny_sst2"]) for r in resp]
    theirs = [float(r[0][0]) for resp in responses(hf["tiny_sst2"]) for r in resp]
    assert len(ours) == 24 and ours == pytest.approx(theirs, abs=1e-4)  # 12 reviews x 2 choices
    assert responses(api["tiny_gen"]) == responses(hf["tiny_gen"])  # generation: exactly equal
    assert len(api["tiny_gen"]) == 12 and any(r[0][0].strip() for r in responses(api["tiny_gen"]))
    for task in ("tiny_sst2", "tiny_gen"):
        assert json.dumps(api["_results"][task], default=str) == json.dumps(hf["_results"][task], default=str)


def test_local_chat_completions_render_the_store_template(setup):
    chat = evaluate(
        setup,
        "local-chat-completions",
        f"model=alpha,base_url={setup['url']}/v1/chat/completions",
        ["tiny_gen_chat"],
        apply_chat_template=True,
    )
    plain = evaluate(
        setup,
        "local-completions",
        f"model=alpha,base_url={setup['url']}/v1/completions,tokenizer={setup['model']},max_length=64",
        ["tiny_gen"],
    )
    assert responses(chat["tiny_gen_chat"]) == responses(plain["tiny_gen"])  # "{instruction} =>" both ways


def test_task_files_are_found(setup):
    assert sorted(p.name for p in Path(setup["tasks"]).iterdir()) == [
        "tiny_gen.yaml",
        "tiny_gen_chat.yaml",
        "tiny_sst2.yaml",
    ]
