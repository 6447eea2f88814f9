"""Validated run configuration: one dataclass per concern, loaded from YAML plus dotted overrides.

Every field is checked when the dataclass is built, so a bad config fails with one line that names
the field and what was expected (`ConfigError`), before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lorachain import __version__

OPTIMIZERS = ("adamw", "sgd", "adagrad")
SCHEDULES = ("linear", "cosine", "constant")
BIASES = ("none", "lora_only")
INITS = ("gaussian", "kaiming")
TASKS = ("causal_lm", "classification")
TRUNCATIONS = ("head", "head_tail")
CHAT_CHOICES = {
    "format": ("auto", "text", "chat"),
    "train_on": ("all_assistant", "last"),
    "on_too_long": ("truncate", "skip"),
    "on_bad_rows": ("error", "skip"),
}


class ConfigError(ValueError):
    """A configuration value is missing or invalid; the message names the field."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass
class ModelConfig:
    """Which model to fine-tune and how to load it."""

    name_or_path: str = ""  # hub id or local folder
    task: str = "causal_lm"  # causal_lm | classification (sequence classifier with a new head)
    gguf_file: str | None = None  # GGUF file inside name_or_path; converted once and cached
    dtype: str = "float32"  # float32 | bfloat16 | float16
    num_labels: int | None = None  # classification only; default: len(data.label_words)
    # attention kernel for training: auto (the precision policy's choice) | eager | sdpa | any name
    # transformers accepts
    attn_implementation: str = "auto"

    def __post_init__(self) -> None:
        _check(bool(self.name_or_path), "model.name_or_path: expected a hub id or a local path")
        _check(self.task in TASKS, f"model.task: expected one of {TASKS}, got {self.task!r}")
        _check(
            self.dtype in ("float32", "bfloat16", "float16"),
            f"model.dtype: expected float32, bfloat16 or float16, got {self.dtype!r}",
        )


@dataclass
class DataConfig:
    """Where the examples are and how a row becomes a prompt and a target.

    `prompt` and `target` are `str.format` templates over the row's fields. With `label_words`, the
    value of `label_field` is first mapped to its verbalizer (causal LM) or class index (classifier),
    and evaluation reports accuracy by scoring every candidate.
    """

    train: str = ""  # JSONL, JSON, CSV or Parquet
    eval: str | None = None
    # text (prompt/target templates) | chat (OpenAI messages or ShareGPT conversations, rendered
    # with the chat template, loss on assistant turns) | auto (chat when rows have such a field)
    format: str = "auto"
    messages_field: str | None = None  # chat: default `messages`, else `conversations`
    chat_template: str | None = None  # chat: Jinja text or a .jinja file; default: the tokenizer's
    train_on: str = "all_assistant"  # chat: all_assistant | last (only the final assistant turn)
    on_too_long: str = "truncate"  # chat: truncate (context cut from the left) | skip
    on_bad_rows: str = "error"  # error | skip (skipped rows are listed on stderr)
    prompt: str = "{text}"
    target: str | None = " {label}"  # completion trained with the LM loss; None: LM loss on prompt
    label_field: str | None = "label"
    label_words: dict[str, str] | None = None  # label value -> verbalizer text
    max_length: int = 256
    eos: bool = True  # append EOS to free-text targets (not to label_words), so generation stops
    max_train_rows: int | None = None
    max_eval_rows: int | None = None

    def __post_init__(self) -> None:
        _check(bool(self.train), "data.train: expected a path to a JSONL, JSON or CSV file")
        _check(self.max_length > 0, f"data.max_length: expected > 0, got {self.max_length}")
        for name, allowed in CHAT_CHOICES.items():
            value = getattr(self, name)
            _check(value in allowed, f"data.{name}: expected one of {allowed}, got {value!r}")
        if self.label_words is not None:
            _check(len(self.label_words) >= 2, "data.label_words: expected at least two labels")
            _check(self.label_field is not None, "data.label_field: required with label_words")
            self.label_words = {str(k): str(v) for k, v in self.label_words.items()}


@dataclass
class LinkConfig:
    """One link of the chain: its LoRA rank/alpha and its share of the training budget.

    Give at most one of `steps`, `epochs`, `fraction`; with none, the link takes an equal part of
    what the other links leave.
    """

    rank: int = 8
    alpha: float = 16.0
    steps: int | None = None
    epochs: float | None = None
    fraction: float | None = None

    def __post_init__(self) -> None:
        _check(self.rank > 0, f"chain.links: rank must be > 0, got {self.rank}")
        _check(self.alpha > 0, f"chain.links: alpha must be > 0, got {self.alpha}")
        shares = [s for s in (self.steps, self.epochs, self.fraction) if s is not None]
        _check(len(shares) <= 1, "chain.links: give at most one of steps, epochs, fraction")
        _check(all(s > 0 for s in shares), f"chain.links: a link's share must be > 0, got {shares}")


@dataclass
class KnotConfig:
    """Where knots are tied: `fixed` at the links' shares (the paper), `auto` on a loss plateau."""

    policy: str = "fixed"
    window: int = 20  # auto: steps without improvement of the smoothed loss before a knot
    min_delta: float = 0.01  # auto: relative improvement that counts
    smoothing: float = 0.9  # auto: EMA factor of the training loss
    min_link_steps: int = 10  # auto: no knot before a link has run this many steps

    def __post_init__(self) -> None:
        _check(self.window > 0, f"chain.knot.window: expected > 0, got {self.window}")
        _check(0 <= self.smoothing < 1, f"chain.knot.smoothing: expected [0, 1), got {self.smoothing}")
        _check(self.min_link_steps >= 1, "chain.knot.min_link_steps: expected >= 1")


@dataclass
class ChainConfig:
    """The chain of LoRA links and what they share. One link is plain LoRA."""

    links: list[LinkConfig] = field(default_factory=lambda: [LinkConfig()])
    target_modules: list[str] | None = None  # None: PEFT's default for the architecture
    dropout: float = 0.05
    bias: str = "none"  # none | lora_only (a bias on each LoRA, merged into the layer's bias)
    init: str = "gaussian"  # init of A: gaussian (the paper, after Hu et al.) | kaiming (PEFT)
    knot: KnotConfig = field(default_factory=KnotConfig)
    method: str = "lora"  # lora (a chain of LoRA) | full (full fine-tuning baseline, one link)

    def __post_init__(self) -> None:
        _check(len(self.links) >= 1, "chain.links: expected at least one link")
        _check(self.method in ("lora", "full"), f"chain.method: expected lora or full, got {self.method!r}")
        _check(self.method == "lora" or len(self.links) == 1, "chain.links: full fine-tuning takes one link")
        _check(0 <= self.dropout < 1, f"chain.dropout: expected [0, 1), got {self.dropout}")
        _check(self.bias in BIASES, f"chain.bias: expected one of {BIASES}, got {self.bias!r}")
        _check(self.init in INITS, f"chain.init: expected one of {INITS}, got {self.init!r}")


@dataclass
class OptimConfig:
    """The base optimizer, rebuilt empty at every link, and the learning-rate schedule."""

    name: str = "adamw"
    lr: float = 5e-4
    weight_decay: float = 0.0
    momentum: float = 0.0  # sgd only
    schedule: str = "linear"  # over the whole budget
    warmup_steps: int = 0
    restart_per_link: bool = False  # warm restart of the schedule at each link
    max_grad_norm: float | None = 1.0

    def __post_init__(self) -> None:
        _check(self.name in OPTIMIZERS, f"optim.name: expected one of {OPTIMIZERS}, got {self.name!r}")
        _check(self.lr > 0, f"optim.lr: expected > 0, got {self.lr}")
        _check(self.schedule in SCHEDULES, f"optim.schedule: expected one of {SCHEDULES}")
        _check(self.warmup_steps >= 0, "optim.warmup_steps: expected >= 0")


@dataclass
class TrainConfig:
    """The fixed training budget and the run's bookkeeping."""

    epochs: float | None = 1.0
    max_steps: int | None = None  # overrides epochs when set
    batch_size: int = 8
    grad_accum: int = 1
    seed: int = 0
    eval_every: int = 0  # 0: evaluate at every knot and at the end
    save_every: int = 50  # checkpoint period in optimizer steps
    log_every: int = 1
    eval_batch_size: int = 16
    # fp32 | bf16 | fp16 (autocast; LoRA weights, gradients, optimizer state in fp32) | auto (bf16
    # where the device runs it fast: CUDA with bf16, a CPU with AMX or AVX-512 BF16; else fp32)
    precision: str = "fp32"

    def __post_init__(self) -> None:
        _check(
            self.precision in ("fp32", "bf16", "fp16", "auto"),
            f"train.precision: expected fp32, bf16, fp16 or auto, got {self.precision!r}",
        )
        _check(self.batch_size > 0, f"train.batch_size: expected > 0, got {self.batch_size}")
        _check(self.grad_accum > 0, f"train.grad_accum: expected > 0, got {self.grad_accum}")
        _check(
            self.max_steps is not None or (self.epochs is not None and self.epochs > 0),
            "train: expected epochs > 0 or max_steps",
        )
        _check(self.max_steps is None or self.max_steps > 0, "train.max_steps: expected > 0")
        _check(self.save_every > 0, "train.save_every: expected > 0")


@dataclass
class RunConfig:
    """Everything one `lorachain train` run needs."""

    model: ModelConfig
    data: DataConfig
    chain: ChainConfig = field(default_factory=ChainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output_dir: str = "runs/default"
    export_merged: bool = False

    def __post_init__(self) -> None:
        if self.model.task == "classification":
            _check(
                self.data.label_words is not None or self.model.num_labels is not None,
                "data.label_words: a classification model needs the label set",
            )

    def to_dict(self) -> dict[str, Any]:
        return {"lorachain_version": __version__, **dataclasses.asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


@dataclass
class RouteDataConfig:
    """A labelled instruction file and how to split it (per task, seeded)."""

    path: str = ""  # JSONL, JSON, CSV or Parquet
    instruction_field: str = "instruction"
    input_field: str | None = None  # optional context appended to the instruction
    output_field: str = "output"
    task_field: str = "task"
    tasks: list[str] | None = None  # keep only these labels (default: all)
    max_per_task: int | None = None  # subsample each task first (CPU budgets)
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
        _check(bool(self.path), "data.path: expected a JSONL, JSON, CSV or Parquet file")
        _check(self.on_bad_rows in ("error", "skip"), "data.on_bad_rows: expected error or skip")
        for name in ("format", "train_on"):
            allowed, value = CHAT_CHOICES[name], getattr(self, name)
            _check(value in allowed, f"data.{name}: expected one of {allowed}, got {value!r}")
        inputs = ("system_last_user", "last_user", "all_user")
        _check(self.selector_input in inputs, f"data.selector_input: expected one of {inputs}")
        _check(
            len(self.split) == 3 and abs(sum(self.split) - 1) < 1e-6 and min(self.split) >= 0,
            f"data.split: expected three fractions adding up to 1, got {self.split}",
        )
        _check(self.max_per_task is None or self.max_per_task >= 5, "data.max_per_task: expected >= 5")


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

    def __post_init__(self) -> None:
        from lorachain.routing.selectors import kind_names

        _check(self.kind in kind_names(), f"selector.kind: unknown {self.kind!r}; known: {kind_names()}")
        _check(self.temperature > 0, f"selector.temperature: expected > 0, got {self.temperature}")
        _check(self.max_length > 0, f"selector.max_length: expected > 0, got {self.max_length}")
        _check(
            self.truncation in TRUNCATIONS,
            f"selector.truncation: expected one of {list(TRUNCATIONS)}, got {self.truncation!r}",
        )
        _check(self.lr > 0, f"selector.lr: expected > 0, got {self.lr}")


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
        _check(self.model.task == "causal_lm", "model.task: task routing needs a causal LM")
        _check("{instruction}" in self.prompt, "prompt: must contain {instruction}")
        _check("{instruction}" in self.task_prompt, "task_prompt: must contain {instruction}")

    def to_json(self) -> str:
        return json.dumps(
            {"lorachain_version": __version__, **dataclasses.asdict(self)}, indent=2, sort_keys=True
        )


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
    output_dir: str = "runs/experiment"

    def __post_init__(self) -> None:
        _check(bool(self.tasks), "tasks: expected at least one task")
        _check(bool(self.methods), "methods: expected at least one method")
        _check(bool(self.seeds), "seeds: expected at least one seed")
        _check(bool(self.lrs) and min(self.lrs) > 0, f"lrs: expected positive numbers, got {self.lrs}")
        for name in ("n_train", "n_val", "n_test", "max_length", "eval_batch_size", "icl_k"):
            _check(getattr(self, name) > 0, f"{name}: expected > 0, got {getattr(self, name)}")
        for name, m in self.methods.items():
            _check(isinstance(m, dict), f"methods.{name}: expected a mapping, got {m!r}")
            b = m.get("baseline")
            _check(
                not (b and self.model.task == "classification"),
                f"methods.{name}.baseline: a classifier's new head is untrained; {b} needs a causal LM",
            )
            _check(
                b in (None, "zero_shot", "icl"),
                f"methods.{name}.baseline: expected zero_shot or icl, got {b!r}",
            )

    def to_json(self) -> str:
        return json.dumps(
            {"lorachain_version": __version__, **dataclasses.asdict(self)}, indent=2, sort_keys=False
        )


def _convert(tp: Any, value: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`, building nested dataclasses."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if dataclasses.is_dataclass(tp):
        _check(isinstance(value, dict), f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin is list:
        _check(isinstance(value, list), f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _check(isinstance(value, dict), f"{where}: expected a mapping, got {value!r}")
        _, vt = typing.get_args(tp)
        return {str(k): v if vt is Any else _convert(vt, v, f"{where}.{k}") for k, v in value.items()}
    if tp is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        _check(ok, f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        _check(ok, f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        _check(isinstance(value, bool), f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        ok = isinstance(value, str | int | float) and not isinstance(value, bool)
        _check(ok, f"{where}: expected text, got {value!r}")
        return str(value)
    raise ConfigError(f"{where}: unsupported type {tp}")


def as_current(cls, raw: dict) -> dict:
    """`raw` (a config as an older lorachain wrote it) read as `cls` and dumped again, so fields
    added since take their defaults; `raw` itself if it no longer reads."""
    try:
        return json.loads(from_dict(cls, raw).to_json())
    except (ConfigError, TypeError, ValueError):
        return raw


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass `cls` from a plain mapping; unknown keys and bad types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    data = {k: v for k, v in data.items() if k != "lorachain_version"}
    unknown = sorted(set(data) - names)
    prefix = f"{where}." if where else ""
    _check(
        not unknown, f"{prefix}{unknown[0] if unknown else ''}: unknown key; expected one of {sorted(names)}"
    )
    kwargs = {k: _convert(hints[k], v, f"{prefix}{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in kwargs]
        raise ConfigError(f"{prefix}{missing[0] if missing else ''}: required ({e})") from None


def set_dotted(data: dict[str, Any], override: str) -> None:
    """Apply one `a.b.c=value` override (value parsed as YAML) to a nested mapping."""
    key, sep, raw = override.partition("=")
    _check(bool(sep) and bool(key), f"override {override!r}: expected key.path=value")
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        if isinstance(node, list):
            _check(part.isdigit() and int(part) < len(node), f"override {key}: no list item {part}")
            node = node[int(part)]
            continue
        node = node.setdefault(part, {})
        _check(isinstance(node, dict | list), f"override {key}: {part} is not a mapping")
    last = parts[-1]
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, dict) and not raw.lstrip().startswith("{"):
        value = raw  # "a: {b}" is text, not a mapping
    if isinstance(node, list):
        _check(last.isdigit() and int(last) < len(node), f"override {key}: no list item {last}")
        node[int(last)] = value
    else:
        node[last] = value


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    base: dict[str, Any] | None = None,
    cls: type = RunConfig,
) -> Any:
    """Load a RunConfig (or `cls`) from a YAML file (or a mapping) plus dotted overrides."""
    data: dict[str, Any] = dict(base or {})
    if path is not None:
        p = Path(path)
        _check(p.is_file(), f"{p}: config file not found")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
        _check(isinstance(loaded, dict), f"{p}: expected a mapping at the top level")
        data.update(loaded)
    for ov in overrides or []:
        set_dotted(data, ov)
    return from_dict(cls, data)
