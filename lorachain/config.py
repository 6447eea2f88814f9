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
QUANTIZATIONS = ("none", "nf4", "fp4", "int8")
PARALLEL = ("auto", "none", "ddp", "fsdp")
CHAT_CHOICES = {
    "format": ("auto", "text", "chat"),
    "train_on": ("all_assistant", "last"),
    "on_too_long": ("truncate", "skip"),
    "on_bad_rows": ("error", "skip"),
}


class ConfigError(ValueError):
    """A configuration value is missing or invalid; the message names the field."""


def check(cond: bool, msg: str) -> None:
    """Raise ConfigError(msg) unless cond."""
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
    # frozen base held quantized by bitsandbytes (QLoRA): none | nf4 | fp4 (4-bit) | int8 (LLM.int8())
    quantization: str = "none"
    compute_dtype: str = "float32"  # 4-bit: the dtype its matmuls run in (float32 | bfloat16 | float16)
    double_quant: bool = True  # 4-bit: quantize the quantization constants too (~0.4 bit/param less)
    # a knot on a quantized base: side (finished links kept as a fixed low-rank side path; exact)
    # | requantize (dequantize, add, quantize again; drifts, measured as knot_rounding)
    quantized_knot: str = "side"

    def __post_init__(self) -> None:
        check(bool(self.name_or_path), "model.name_or_path: expected a hub id or a local path")
        check(
            self.quantization in QUANTIZATIONS,
            f"model.quantization: expected one of {QUANTIZATIONS} (the bitsandbytes types), "
            f"got {self.quantization!r}",
        )
        check(
            self.compute_dtype in ("float32", "bfloat16", "float16"),
            f"model.compute_dtype: expected float32, bfloat16 or float16, got {self.compute_dtype!r}",
        )
        check(
            self.quantized_knot in ("side", "requantize"),
            f"model.quantized_knot: expected side or requantize, got {self.quantized_knot!r}",
        )
        check(self.task in TASKS, f"model.task: expected one of {TASKS}, got {self.task!r}")
        check(
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
    # causal LM: several rows per training sequence up to max_length, none attending to another
    packing: bool = False

    def __post_init__(self) -> None:
        check(bool(self.train), "data.train: expected a path to a JSONL, JSON or CSV file")
        check(self.max_length > 0, f"data.max_length: expected > 0, got {self.max_length}")
        for name, allowed in CHAT_CHOICES.items():
            value = getattr(self, name)
            check(value in allowed, f"data.{name}: expected one of {allowed}, got {value!r}")
        if self.label_words is not None:
            check(len(self.label_words) >= 2, "data.label_words: expected at least two labels")
            check(self.label_field is not None, "data.label_field: required with label_words")
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
        check(self.rank > 0, f"chain.links: rank must be > 0, got {self.rank}")
        check(self.alpha > 0, f"chain.links: alpha must be > 0, got {self.alpha}")
        shares = [s for s in (self.steps, self.epochs, self.fraction) if s is not None]
        check(len(shares) <= 1, "chain.links: give at most one of steps, epochs, fraction")
        check(all(s > 0 for s in shares), f"chain.links: a link's share must be > 0, got {shares}")


@dataclass
class KnotConfig:
    """Where knots are tied: `fixed` at the links' shares (the paper), `auto` on a loss plateau."""

    policy: str = "fixed"
    window: int = 20  # auto: steps without improvement of the smoothed loss before a knot
    min_delta: float = 0.01  # auto: relative improvement that counts
    smoothing: float = 0.9  # auto: EMA factor of the training loss
    min_link_steps: int = 10  # auto: no knot before a link has run this many steps

    def __post_init__(self) -> None:
        check(self.window > 0, f"chain.knot.window: expected > 0, got {self.window}")
        check(0 <= self.smoothing < 1, f"chain.knot.smoothing: expected [0, 1), got {self.smoothing}")
        check(self.min_link_steps >= 1, "chain.knot.min_link_steps: expected >= 1")


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
        check(len(self.links) >= 1, "chain.links: expected at least one link")
        check(self.method in ("lora", "full"), f"chain.method: expected lora or full, got {self.method!r}")
        check(self.method == "lora" or len(self.links) == 1, "chain.links: full fine-tuning takes one link")
        check(0 <= self.dropout < 1, f"chain.dropout: expected [0, 1), got {self.dropout}")
        check(self.bias in BIASES, f"chain.bias: expected one of {BIASES}, got {self.bias!r}")
        check(self.init in INITS, f"chain.init: expected one of {INITS}, got {self.init!r}")


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
        check(self.name in OPTIMIZERS, f"optim.name: expected one of {OPTIMIZERS}, got {self.name!r}")
        check(self.lr > 0, f"optim.lr: expected > 0, got {self.lr}")
        check(self.schedule in SCHEDULES, f"optim.schedule: expected one of {SCHEDULES}")
        check(self.warmup_steps >= 0, "optim.warmup_steps: expected >= 0")


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
    # where the device runs it fast: CUDA with bf16, a CPU with AMX or AVX-512 BF16; else fp32).
    # bf16/fp16 on a CPU without native matmuls: emulated in fp32: the same numbers, ~1.2x fp32 time
    precision: str = "fp32"
    # recompute each decoder layer's activations in the backward (non-reentrant): less memory
    gradient_checkpointing: bool = False
    check_memory: bool = True  # refuse, before loading, a model whose estimated peak memory cannot fit
    # several processes (torchrun / accelerate launch): ddp (whole model per rank) | fsdp (frozen base
    # sharded per decoder layer, FSDP2) | none | auto (ddp when launched on several processes)
    parallel: str = "auto"
    fsdp_offload: bool = False  # fsdp: keep the base shards in CPU memory between uses (CPUOffloadPolicy)

    def __post_init__(self) -> None:
        check(
            self.parallel in PARALLEL,
            f"train.parallel: expected one of {PARALLEL}, got {self.parallel!r}",
        )
        check(
            self.precision in ("fp32", "bf16", "fp16", "auto"),
            f"train.precision: expected fp32, bf16, fp16 or auto, got {self.precision!r}",
        )
        check(self.batch_size > 0, f"train.batch_size: expected > 0, got {self.batch_size}")
        check(self.grad_accum > 0, f"train.grad_accum: expected > 0, got {self.grad_accum}")
        check(
            self.max_steps is not None or (self.epochs is not None and self.epochs > 0),
            "train: expected epochs > 0 or max_steps",
        )
        check(self.max_steps is None or self.max_steps > 0, "train.max_steps: expected > 0")
        check(self.save_every > 0, "train.save_every: expected > 0")


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
            check(
                self.data.label_words is not None or self.model.num_labels is not None,
                "data.label_words: a classification model needs the label set",
            )
            check(not self.data.packing, "data.packing: a classifier scores whole sequences; set it to false")
        if self.model.quantization != "none":
            check(
                not self.export_merged,
                "export_merged: a quantized base cannot be saved merged; merge the exported adapter "
                "into the full-precision base instead",
            )
            check(self.chain.method == "lora", "chain.method: full fine-tuning cannot train a quantized base")

    def to_dict(self) -> dict[str, Any]:
        return {"lorachain_version": __version__, **dataclasses.asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


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
        check(isinstance(value, dict), f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin is list:
        check(isinstance(value, list), f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        check(isinstance(value, dict), f"{where}: expected a mapping, got {value!r}")
        _, vt = typing.get_args(tp)
        return {str(k): v if vt is Any else _convert(vt, v, f"{where}.{k}") for k, v in value.items()}
    if tp is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        check(ok, f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        check(ok, f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        check(isinstance(value, bool), f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        ok = isinstance(value, str | int | float) and not isinstance(value, bool)
        check(ok, f"{where}: expected text, got {value!r}")
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
    check(
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
    check(bool(sep) and bool(key), f"override {override!r}: expected key.path=value")
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        if isinstance(node, list):
            check(part.isdigit() and int(part) < len(node), f"override {key}: no list item {part}")
            node = node[int(part)]
            continue
        node = node.setdefault(part, {})
        check(isinstance(node, dict | list), f"override {key}: {part} is not a mapping")
    last = parts[-1]
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, dict) and not raw.lstrip().startswith("{"):
        value = raw  # "a: {b}" is text, not a mapping
    if isinstance(node, list):
        check(last.isdigit() and int(last) < len(node), f"override {key}: no list item {last}")
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
        check(p.is_file(), f"{p}: config file not found")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
        check(isinstance(loaded, dict), f"{p}: expected a mapping at the top level")
        data.update(loaded)
    for ov in overrides or []:
        set_dotted(data, ov)
    return from_dict(cls, data)
