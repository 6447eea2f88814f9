"""The RunConfig of every adapter of a store (task adapters, mixed, selector), from a RouteConfig.

Shared by `route train`, the `full` selector kind and the held-out folds; imports no routing module,
so the selector kinds and the route config can use it without a circle.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from lorachain.config import DataConfig, RunConfig
from lorachain.data.chat import chat_template
from lorachain.store import MIXED, SELECTOR, safe_name


def chat_templates(cfg) -> dict:
    """What a chat store's manifest records: the chat template (the override's text, or True for
    the base model's own), what the selector reads, and how the adapters were trained."""
    d = cfg.data
    template = chat_template(None, d.chat_template) if d.chat_template else True
    return {"format": "chat", "chat": template, "selector_input": d.selector_input, "train_on": d.train_on}


def adapter_runs(cfg, root: Path, labels: list[str], chat: bool = False) -> dict[str, tuple[str, RunConfig]]:
    """name -> (kind, RunConfig) for every adapter of the store, in training order."""
    d = cfg.data
    splits = root / "splits"

    def run(name: str, train_file: Path, eval_file: Path, data: DataConfig, chain, budget) -> RunConfig:
        return RunConfig(
            model=cfg.model,
            data=replace(data, train=str(train_file), eval=str(eval_file)),
            chain=chain,
            optim=cfg.optim,
            train=budget,
            output_dir=str(root / "runs" / name),
        )

    answer = DataConfig(
        train="-",
        prompt=cfg.prompt,
        target="{output}",
        label_field=None,
        max_length=d.max_length,
        max_eval_rows=d.max_eval_rows,
    )
    if chat:  # task and mixed adapters: the whole conversation through the chat template
        answer = replace(
            answer,
            format="chat",
            messages_field="messages",
            chat_template=d.chat_template,
            train_on=d.train_on,
        )
    select = DataConfig(
        train="-",
        prompt=cfg.task_prompt,
        target=" {label}",
        label_field="task",
        label_words={t: t for t in labels},
        max_length=d.max_length,
        max_eval_rows=d.max_eval_rows,
    )
    runs: dict[str, tuple[str, RunConfig]] = {}
    for label in labels:
        name = safe_name(label)
        runs[name] = (
            "task",
            run(
                name,
                splits / "by_task" / f"{name}.train.jsonl",
                splits / "by_task" / f"{name}.val.jsonl",
                answer,
                cfg.chain,
                cfg.train,
            ),
        )
    runs[MIXED] = (
        "mixed",
        run(
            MIXED,
            splits / "train.jsonl",
            splits / "val.jsonl",
            answer,
            cfg.chain,
            cfg.mixed_train or cfg.train,
        ),
    )
    runs[SELECTOR] = (
        "selector",
        run(
            SELECTOR,
            splits / "train.jsonl",
            splits / "val.jsonl",
            select,
            cfg.selector_chain or cfg.chain,
            cfg.selector_train or cfg.train,
        ),
    )
    return runs
