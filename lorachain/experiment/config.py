"""`lorachain experiment` configuration: tasks x methods x seeds x learning rates."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from lorachain import __version__
from lorachain.config import ModelConfig, check


@dataclass
class ExperimentConfig:
    """`lorachain experiment`: tasks x methods x seeds x learning rates, as in the COLA paper.

    A method is a mapping of RunConfig sections (chain, optim, train) laid over `base`, plus
    optional `n_train` (low-resource runs), `lrs` (its own grid), `seeds` and `baseline` (zero_shot
    or icl: no training). The learning rate is picked on validation; test is reported.
    """

    model: ModelConfig
    tasks: list[str] = field(default_factory=lambda: ["sst2"])
    methods: dict[str, Any] = field(default_factory=lambda: {"lora": {}})
    base: dict[str, Any] = field(default_factory=dict)  # RunConfig sections shared by every method
    data_dir: str = "../shared/data"  # folder laid out as shared/data (see tasks.protocol.PATHS)
    paths: dict[str, Any] = field(default_factory=dict)  # task -> {train: path, test: path}
    seeds: list[int] = field(default_factory=lambda: [0])
    lrs: list[float] = field(default_factory=lambda: [1e-4])
    n_train: int = 1000
    n_val: int = 500
    n_test: int = 1000
    max_length: int = 256
    eval_batch_size: int = 16
    max_new_tokens: int = 32  # generation tasks
    icl_k: int = 4  # demonstrations of the in-context baseline
    keep_models: bool = False  # keep merged/ of full fine-tuning cells (large)
    # what each trained cell forgot, against the base (experiment/forgetting.py): `general` (a JSONL
    # of instruction/output/task rows), `general_tasks` (its task types the grid does not train on),
    # `n_general` (rows, default 200), `task` (an unrelated task scored before and after), `n_task`
    forgetting: dict[str, Any] = field(default_factory=dict)
    # the order cells run in, within a task: `methods` (each method's seeds and lrs together) or
    # `seeds` (the first seed of every method, then the next: a grid cut short compares every method)
    order: str = "methods"
    output_dir: str = "runs/experiment"

    def __post_init__(self) -> None:
        check(bool(self.tasks), "tasks: expected at least one task")
        check(bool(self.methods), "methods: expected at least one method")
        check(bool(self.seeds), "seeds: expected at least one seed")
        check(self.order in ("methods", "seeds"), f"order: expected methods or seeds, got {self.order!r}")
        check(bool(self.lrs) and min(self.lrs) > 0, f"lrs: expected positive numbers, got {self.lrs}")
        for name in ("n_train", "n_val", "n_test", "max_length", "eval_batch_size", "icl_k"):
            check(getattr(self, name) > 0, f"{name}: expected > 0, got {getattr(self, name)}")
        for name, m in self.methods.items():
            check(isinstance(m, dict), f"methods.{name}: expected a mapping, got {m!r}")
            b = m.get("baseline")
            check(
                not (b and self.model.task == "classification"),
                f"methods.{name}.baseline: a classifier's new head is untrained; {b} needs a causal LM",
            )
            check(
                b in (None, "zero_shot", "icl"),
                f"methods.{name}.baseline: expected zero_shot or icl, got {b!r}",
            )

        known = {"general", "general_tasks", "n_general", "task", "n_task"}
        check(
            not set(self.forgetting) - known,
            f"forgetting: unknown keys {sorted(set(self.forgetting) - known)}",
        )
        check(
            not self.forgetting.get("general") or bool(self.forgetting.get("general_tasks")),
            "forgetting.general_tasks: expected the task types of forgetting.general to score",
        )

    def to_json(self) -> str:
        return json.dumps(
            {"lorachain_version": __version__, **dataclasses.asdict(self)}, indent=2, sort_keys=False
        )
