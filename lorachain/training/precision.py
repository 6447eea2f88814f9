"""Precision policy of the training loop: fp32, bf16 or fp16 mixed precision, or `auto`.

Mixed precision is done the way users trust: forward and backward under `torch.autocast`, the LoRA
factors, their gradients and optimizer state in fp32, loss scaling for fp16. Autocast casts every
frozen weight to the low dtype again at every matmul (it caches casts of trainable leaves only), so
`compute_copies` holds the frozen Linear weights in that dtype once instead, keeping their fp32
values aside as *masters*: each matmul sees exactly the tensor autocast would have made, knots merge
into the fp32 masters, and `restore_masters` puts the fp32 weights back at the end.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lorachain.training.emulated_matmul import Fp32Matmuls, active

PRECISIONS = ("fp32", "bf16", "fp16", "auto")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HEADS = ("classifier", "score")  # classification heads: trained in full, kept in fp32


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    lines = [line for line in text.splitlines() if line.startswith("flags")]
    return {f for line in lines for f in line.split(":", 1)[1].split()}


def fast_bf16(device: torch.device) -> bool:
    """Whether `device` runs bf16 matmuls natively: CUDA with bf16, a CPU with AMX or AVX-512 BF16."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(cpu_flags() & NATIVE["bf16"])


@dataclass(frozen=True)
class Precision:
    """A resolved precision (`fp32`, `bf16` or `fp16`) on one device type."""

    name: str
    device_type: str = "cpu"
    emulate: bool = False  # low-precision matmuls as fp32 ones rounded once (emulated_matmul)

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.name]

    @property
    def mixed(self) -> bool:
        return self.name != "fp32"

    @contextlib.contextmanager
    def autocast(self):
        if not self.mixed:
            yield
            return
        with torch.autocast(self.device_type, dtype=self.dtype), self.matmuls():
            yield

    def matmuls(self) -> contextlib.AbstractContextManager:
        """Around a backward: the emulated matmuls where the device has no native ones."""
        return Fp32Matmuls(self.dtype) if self.emulate else contextlib.nullcontext()

    def scaler(self) -> torch.amp.GradScaler | None:
        """A loss scaler for fp16 (its gradients underflow without one); None otherwise."""
        return torch.amp.GradScaler(self.device_type) if self.name == "fp16" else None


FP32 = Precision("fp32")
NATIVE = {"bf16": {"amx_bf16", "avx512_bf16"}, "fp16": {"amx_fp16", "avx512_fp16"}}  # CPU flags


def resolve(name: str, device: torch.device) -> Precision:
    """`auto` is bf16 where the device runs it fast, else fp32. bf16 or fp16 asked for on a CPU
    without their native matmuls is emulated: the same numbers near fp32 speed (emulated_matmul)."""
    if name == "auto":
        name = "bf16" if fast_bf16(device) else "fp32"
    emulate = device.type == "cpu" and name in NATIVE and not cpu_flags() & NATIVE[name]
    return Precision(name, device.type, emulate)


def slow_kernel_warning(name: str, device: torch.device) -> str | None:
    """For a loop lorachain does not drive (`transformers.Trainer` with bf16/fp16 on a CPU without
    their native matmuls, outside an emulation): one line saying so and what to do; else None."""
    prec = resolve(name, device)
    if not prec.emulate or active(prec.dtype):
        return None
    return (
        f"{name} on a CPU without native {name} matmuls: PyTorch's kernels are many times slower than "
        f"fp32 there (a bf16 LoRA step: 21.9x, benchmarks/emulated_bf16.py); run trainer.train() inside "
        f"lorachain.training.precision.resolve({name!r}, torch.device('cpu')).matmuls() for the same "
        f"numbers near fp32 speed, or train in fp32"
    )


EAGER_MAX_LENGTH = 256  # bf16 on CPU: eager attention beats SDPA's kernels up to about this length


def attention(requested: str, prec: Precision, max_length: int) -> str | None:
    """The attention implementation to train with; None keeps the model's own.

    `auto` picks `eager` for bf16/fp16 on CPU with sequences up to `EAGER_MAX_LENGTH` tokens: there
    PyTorch's fused CPU attention backward runs at a fraction of the matmul speed (measured on
    SmolLM2, 8 x 64 tokens, one thread: a bf16 LoRA step 0.86 s with SDPA, 0.62 s eager; at 320
    tokens SDPA is ahead again). Where bf16 is emulated, the two cost the same within 2% from 64 to
    512 tokens (`benchmarks/emulated_bf16.py --attention-choice`). Everything else keeps the model's
    default."""
    if requested != "auto":
        return requested
    if prec.mixed and prec.device_type == "cpu" and max_length <= EAGER_MAX_LENGTH:
        return "eager"
    return None


def _frozen_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Linear layers whose weight autocast would cast: fp32, not tied to an embedding, not a head."""
    embeddings = {m.weight.data_ptr() for m in model.modules() if isinstance(m, nn.Embedding)}
    return {
        name: m
        for name, m in model.named_modules()
        if type(m) is nn.Linear
        and m.weight.dtype == torch.float32
        and m.weight.data_ptr() not in embeddings
        and name.split(".")[-1] not in HEADS
    }


def compute_copies(model: nn.Module, prec: Precision) -> dict[str, torch.Tensor]:
    """Hold the frozen Linear weights in the autocast dtype; return their fp32 masters by name.

    Call before wrapping the model with LoRA. Nothing is copied for fp32."""
    if not prec.mixed:
        return {}
    masters = {}
    for name, m in _frozen_linears(model).items():
        masters[name] = m.weight.data
        m.weight.data = m.weight.data.to(prec.dtype)
    return masters


def restore_masters(model: nn.Module, masters: dict[str, torch.Tensor]) -> None:
    """Put the fp32 masters back as the weights (the exact fp32 model)."""
    for name, w in masters.items():
        module = model.get_submodule(name)
        getattr(module, "base_layer", module).weight.data = w
