"""`model:` which model to fine-tune and how to load it."""

from __future__ import annotations

from dataclasses import dataclass

from lorachain.config.base import check

TASKS = ("causal_lm", "classification")
QUANTIZATIONS = ("none", "nf4", "fp4", "int8")
QUANT_BACKENDS = ("bitsandbytes", "torchao")


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
    # frozen base held quantized (QLoRA; quant_backend picks the library): none | nf4 | fp4 (4-bit) | int8
    quantization: str = "none"
    compute_dtype: str = "float32"  # 4-bit: the dtype its matmuls run in (float32 | bfloat16 | float16)
    double_quant: bool = True  # 4-bit: quantize the quantization constants too (~0.4 bit/param less)
    # which library holds the quantized base: bitsandbytes (all types) | torchao (nf4 only; the one
    # train.parallel: fsdp shards; pip install torchao==0.18.0)
    quant_backend: str = "bitsandbytes"
    # a knot on a quantized base: side (finished links kept as a fixed low-rank side path; exact)
    # | requantize (dequantize, add, quantize again; drifts, measured as knot_rounding)
    quantized_knot: str = "side"
    # a PEFT adapter folder (e.g. an SFT run's `adapter/`) merged into the base in fp32 as it loads:
    # the run starts from (and a DPO run's reference is) base + adapter
    adapter: str | None = None

    def __post_init__(self) -> None:
        check(bool(self.name_or_path), "model.name_or_path: expected a hub id or a local path")
        check(
            self.quantization in QUANTIZATIONS,
            f"model.quantization: expected one of {QUANTIZATIONS} (the bitsandbytes types), "
            f"got {self.quantization!r}",
        )
        check(
            self.quant_backend in QUANT_BACKENDS,
            f"model.quant_backend: expected one of {QUANT_BACKENDS}, got {self.quant_backend!r}",
        )
        check(
            self.quant_backend != "torchao" or self.quantization == "nf4",
            f"model.quant_backend: torchao holds an nf4 base only, got model.quantization "
            f"{self.quantization!r} (use nf4, or bitsandbytes for fp4/int8)",
        )
        check(
            self.quant_backend != "torchao" or self.double_quant,
            "model.double_quant: torchao's NF4 always quantizes its scalers; set it to true "
            "(or use bitsandbytes)",
        )
        check(
            self.compute_dtype in ("float32", "bfloat16", "float16"),
            f"model.compute_dtype: expected float32, bfloat16 or float16, got {self.compute_dtype!r}",
        )
        check(
            self.quantized_knot in ("side", "requantize"),
            f"model.quantized_knot: expected side or requantize, got {self.quantized_knot!r}",
        )
        check(
            self.adapter is None or self.quantization == "none",
            "model.adapter: merging an adapter into a quantized base would round it; merge it into the "
            "full-precision base first (lorachain export --merged) and quantize that",
        )
        check(self.task in TASKS, f"model.task: expected one of {TASKS}, got {self.task!r}")
        check(
            self.dtype in ("float32", "bfloat16", "float16"),
            f"model.dtype: expected float32, bfloat16 or float16, got {self.dtype!r}",
        )
