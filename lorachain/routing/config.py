"""`lorachain route train` configuration: the labelled instruction file, the selector, the store.

Loaded like a run config (`lorachain.config.load_config`); every field is checked when built.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field

from lorachain import __version__
from lorachain.config import CHAT_CHOICES, ChainConfig, ModelConfig, OptimConfig, TrainConfig, check
from lorachain.routing.balance import BALANCES
from lorachain.routing.confidence import CONFIDENCES
from lorachain.routing.prototypes import PROTOTYPES

TRUNCATIONS = ("head", "head_tail")


@dataclass
class RouteDataConfig:
    """A labelled instruction file and how to split it (per task, seeded)."""

    path: str = ""  # JSONL, JSON, CSV or Parquet
    instruction_field: str = "instruction"
    input_field: str | None = None  # optional context appended to the instruction
    output_field: str = "output"
    task_field: str = "task"
    tasks: list[str] | None = None  # keep only these labels (default: all)
    dataset_field: str = "dataset"  # the source data set of a row (missing: one data set per task)
    # data sets kept out of every split, to score the store on instructions it never saw
    # (`lorachain route eval STORE --unseen`)
    exclude_datasets: list[str] = field(default_factory=list)
    # which rows the adapters and the selector learn from (lorachain.routing.balance): none | task |
    # dataset | task_then_dataset (equal rows per task type, spread evenly over its data sets)
    balance: str = "task_then_dataset"
    max_per_task: int | None = None  # task, task_then_dataset: rows per task (unset: see balance)
    max_per_dataset: int | None = None  # dataset: rows per data set (unset: the median data set's count)
    split: list[float] = field(default_factory=lambda: [0.6, 0.2, 0.2])
    seed: int = 0
    max_length: int = 256
    max_eval_rows: int | None = 64  # validation rows evaluated at each knot
    on_bad_rows: str = "error"  # error | skip (skipped rows are listed in STORE/splits/rejected.txt)
    # chat rows (`messages` or `conversations` plus the task field): adapters train and answer
    # through the chat template with the whole conversation; the selector reads `selector_input`
    format: str = "auto"  # text | chat | auto (chat when rows have a messages field)
    messages_field: str | None = None
    chat_template: str | None = None  # Jinja text or a .jinja file; default: the tokenizer's
    train_on: str = "all_assistant"  # all_assistant | last
    selector_input: str = "system_last_user"  # system_last_user | last_user | all_user

    def __post_init__(self) -> None:
        check(bool(self.path), "data.path: expected a JSONL, JSON, CSV or Parquet file")
        check(self.on_bad_rows in ("error", "skip"), "data.on_bad_rows: expected error or skip")
        for name in ("format", "train_on"):
            allowed, value = CHAT_CHOICES[name], getattr(self, name)
            check(value in allowed, f"data.{name}: expected one of {allowed}, got {value!r}")
        inputs = ("system_last_user", "last_user", "all_user")
        check(self.selector_input in inputs, f"data.selector_input: expected one of {inputs}")
        check(
            len(self.split) == 3 and abs(sum(self.split) - 1) < 1e-6 and min(self.split) >= 0,
            f"data.split: expected three fractions adding up to 1, got {self.split}",
        )
        check(self.max_per_task is None or self.max_per_task >= 5, "data.max_per_task: expected >= 5")
        check(
            self.balance in BALANCES, f"data.balance: expected one of {list(BALANCES)}, got {self.balance!r}"
        )
        check(
            self.max_per_dataset is None or self.max_per_dataset >= 1, "data.max_per_dataset: expected >= 1"
        )
        for name, used in (
            ("max_per_task", ("task", "task_then_dataset")),
            ("max_per_dataset", ("dataset",)),
        ):
            check(
                getattr(self, name) is None or self.balance in used,
                f"data.{name}: has no effect with data.balance={self.balance} (used by {' or '.join(used)})",
            )


@dataclass
class SelectorConfig:
    """How a store picks the task: the kind (see `lorachain.routing.selectors`) and its settings."""

    # encoder (default: the best measured on unseen data sets, and the cheapest to route; README) |
    # lora (the paper) | full | embedding
    kind: str = "encoder"
    encoder: str = "sentence-transformers/all-MiniLM-L6-v2"  # encoder, embedding: hub id or folder
    temperature: float = 0.05  # embedding: softmax temperature over cosine similarities
    max_length: int = 128  # encoder, embedding: tokens read of each instruction
    # encoder, embedding: which tokens of a longer instruction: `head` (the first), `head_tail` (the
    # first and last halves: templates often put the task's wording after a long passage)
    truncation: str = "head_tail"
    lr: float = (
        1.0e-4  # encoder: full fine-tuning learning rate (budget: selector_train, else 4 epochs of 16)
    )
    # embedding: the score that sends unfamiliar instructions to the fallback (routing.confidence:
    # msp | margin | energy | cosine | mahalanobis), its threshold fitted on held-out data sets of the
    # store's rows for `target_precision` of right routes; stored in the manifest
    confidence: str = "msp"
    target_precision: float = 0.9
    # embedding: what an instruction is compared with: `dataset` (one centroid per task and data set
    # of the rows, a task scoring its nearest: the best measured on unseen data sets; rows without a
    # data set give one per task), `task` (one centroid per task) or `row` (every training row: the
    # nearest neighbour); routing.prototypes
    prototypes: str = "dataset"
    # embedding: task -> a short description of it, embedded as one more prototype of the task
    descriptions: dict[str, str] = field(default_factory=dict)
    # another kind (embedding, encoder, full) fitted beside this one: an instruction is routed only
    # when both name the same task and either is sure by its own threshold, fitted on held-out data
    # sets (the encoder and full kinds fit once more for it); else the fallback (routing.eval.agreement)
    second_opinion: str | None = None
    # answer-side evidence (routing.gate): `likelihood` answers with the chosen task adapter only when
    # it finds the instruction likelier than the mixed adapter does, by more than `gate_margin` nats
    # per token (one teacher-forced pass per adapter), else with the mixed adapter; `none`: no gate.
    # The default since issue 43 (results/routing_folds/README.md): at 0.2, the smallest margin at
    # which no type's reference likelihood fell below mixed on 14 unseen data sets, the gate routed
    # none of them and answered in distribution slightly better than mixed, never worse on a type.
    # It costs two teacher-forced passes per routed request. Choose a margin on folds, not a lockbox
    gate: str = "likelihood"
    gate_margin: float = 0.2  # likelihood gate: nats per instruction token the task adapter must win by
    # `validation` (routing.eval.evidence): when the store is built, each task adapter and the mixed
    # adapter score the reference answers of the adapter's own validation rows; the task adapter may
    # answer only where the 95% lower bound of its gain over mixed is above 0, else the mixed adapter
    # answers (no cost per request). `lorachain route train` measures it (`route_train` alone does
    # not: then `lorachain route evidence STORE`). Not the default: on the fold stores one adapter of
    # 24 had evidence, and its routes answered worse in distribution. `none`: no evidence rule
    evidence: str = "none"
    # encoder, embedding (routing.other): K > 0 holds back K data sets of every task type that has more
    # than K; they train no task adapter and the selector learns them (and the file's task types
    # outside data.tasks) as `other`, which the mixed adapter answers. 0: off
    other_datasets: int = 0
    # encoder, embedding (routing.augment): re-templated copies of each selector training row
    # (`swap`: parts reordered, `separator`: other separators, `strip`: template words dropped). 0: off
    augment: int = 0
    # the styles `augment` takes its copies from, one style per copy (routing.augment.STYLES)
    augment_styles: list[str] = field(default_factory=lambda: ["swap", "separator", "strip"])

    def __post_init__(self) -> None:
        from lorachain.routing.augment import STYLES
        from lorachain.routing.gate import EVIDENCE, GATES
        from lorachain.routing.selectors import kind_names

        check(self.gate in GATES, f"selector.gate: expected one of {list(GATES)}, got {self.gate!r}")
        check(
            self.evidence in EVIDENCE,
            f"selector.evidence: expected one of {list(EVIDENCE)}, got {self.evidence!r}",
        )
        check(
            math.isfinite(self.gate_margin),
            f"selector.gate_margin: expected a number, got {self.gate_margin}",
        )

        check(self.kind in kind_names(), f"selector.kind: unknown {self.kind!r}; known: {kind_names()}")
        check(self.temperature > 0, f"selector.temperature: expected > 0, got {self.temperature}")
        check(self.max_length > 0, f"selector.max_length: expected > 0, got {self.max_length}")
        check(
            self.truncation in TRUNCATIONS,
            f"selector.truncation: expected one of {list(TRUNCATIONS)}, got {self.truncation!r}",
        )
        check(self.lr > 0, f"selector.lr: expected > 0, got {self.lr}")
        check(
            self.confidence in CONFIDENCES,
            f"selector.confidence: expected one of {list(CONFIDENCES)}, got {self.confidence!r}",
        )
        check(0 < self.target_precision <= 1, "selector.target_precision: expected in (0, 1]")
        check(
            self.prototypes in PROTOTYPES,
            f"selector.prototypes: expected one of {list(PROTOTYPES)}, got {self.prototypes!r}",
        )
        if self.second_opinion is not None:
            check(
                self.second_opinion in kind_names() and self.second_opinion not in ("lora", self.kind),
                f"selector.second_opinion: expected another kind than {self.kind!r} and not lora, "
                f"got {self.second_opinion!r}",
            )
            check(self.kind != "lora", "selector.second_opinion: the lora kind cannot take one")
        own = ("encoder", "embedding")
        for name in ("other_datasets", "augment"):
            value = getattr(self, name)
            check(
                isinstance(value, int) and not isinstance(value, bool) and value >= 0,
                f"selector.{name}: expected a whole number >= 0 (0: off), got {value!r}",
            )
            check(
                not value or self.kind in own,
                f"selector.{name}: needs selector.kind encoder or embedding, got {self.kind!r}",
            )
            check(
                not value or self.second_opinion is None,
                f"selector.{name}: cannot be combined with selector.second_opinion",
            )
        bad = [x for x in self.augment_styles if x not in STYLES]
        check(
            bool(self.augment_styles) and not bad,
            f"selector.augment_styles: expected some of {list(STYLES)}, got {self.augment_styles!r}",
        )
        for task, text in (self.descriptions or {}).items():
            check(
                isinstance(text, str) and text.strip(),
                f"selector.descriptions.{task}: expected a non-empty text",
            )


@dataclass
class RouteConfig:
    """`lorachain route train`: task adapters, the task-selection adapter and the mixed baseline."""

    model: ModelConfig
    data: RouteDataConfig
    prompt: str = "### Instruction:\n{instruction}\n\n### Response:\n"  # task and mixed adapters
    task_prompt: str = "Which type of task is this instruction?\nInstruction: {instruction}\nTask type:"
    chain: ChainConfig = field(default_factory=ChainConfig)  # task and mixed adapters
    selector_chain: ChainConfig | None = None  # default: same as chain
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)  # each task adapter
    mixed_train: TrainConfig | None = None  # default: train
    selector_train: TrainConfig | None = None  # default: train
    selector: SelectorConfig = field(default_factory=SelectorConfig)
    output_dir: str = "stores/default"

    def __post_init__(self) -> None:
        check(self.model.task == "causal_lm", "model.task: task routing needs a causal LM")
        check("{instruction}" in self.prompt, "prompt: must contain {instruction}")
        check("{instruction}" in self.task_prompt, "task_prompt: must contain {instruction}")

    def to_json(self) -> str:
        return json.dumps(
            {"lorachain_version": __version__, **dataclasses.asdict(self)}, indent=2, sort_keys=True
        )
