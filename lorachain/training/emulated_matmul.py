"""bf16/fp16 matmuls on a CPU without native support, near fp32 speed and with the same numbers.

Without AMX or AVX-512 BF16/FP16, PyTorch's CPU matmuls in those dtypes take a generic path: on an
AVX2-only AMD EPYC a linear layer's bf16 matmuls ran at 3-5 GFLOP/s against 70-83 in fp32 and a
SmolLM2 LoRA step took 21.9x the fp32 one; emulated, 1.32x (`benchmarks/emulated_bf16.py`). A native
low-precision matmul multiplies the low-precision operands, accumulates in fp32 and rounds the
result once to the low dtype. The product of two bf16 (or fp16) numbers is exact in fp32, so the
same result comes from upcasting the operands, an fp32 matmul and one rounding: equal up to the
order of the fp32 accumulation, which native kernels themselves vary with their blocking.
`Fp32Matmuls` does that below autograd and autocast, so the forward, the backward and evaluation all
keep the low-precision semantics.

PyTorch's fused CPU attention (SDPA, which lorachain uses past 256 tokens) is just as slow in bf16
there (fwd+bwd of one 1024-token layer ~5x its fp32 time), so it runs in fp32 too, its output and
gradients rounded once. The native kernel also rounds the attention probabilities to bf16 before
multiplying them with V; the emulation keeps them in fp32, so its result is closer to the exact one.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _get_current_dispatch_mode_stack

aten = torch.ops.aten
MATMULS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default}
SDPA = aten._scaled_dot_product_flash_attention_for_cpu.default  # returns (output, logsumexp)
SDPA_BACKWARD = aten._scaled_dot_product_flash_attention_for_cpu_backward.default  # (dq, dk, dv)


class Fp32Matmuls(TorchDispatchMode):
    """Within it, every mm/addmm/bmm/baddbmm on `dtype` tensors runs in fp32 (or `up`: float64 gives
    the exactly rounded result, a reference) and rounds once."""

    def __init__(self, dtype: torch.dtype, up: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.dtype, self.up = dtype, up

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in MATMULS and "out" not in kwargs and args[0].dtype == self.dtype:
            up = [a.to(self.up) if isinstance(a, torch.Tensor) and a.dtype == self.dtype else a for a in args]
            return func(*up, **kwargs).to(self.dtype)
        if func in (SDPA, SDPA_BACKWARD) and args[0].dtype == self.dtype:
            return self._attention(func, args, kwargs)
        return func(*args, **kwargs)

    def _attention(self, func, args, kwargs):
        def up(a):  # the low-precision operands and mask; the fp32 logsumexp too when `up` is wider
            floating = isinstance(a, torch.Tensor) and a.dtype in (self.dtype, torch.float32)
            return a.to(self.up) if floating else a

        out = func(*map(up, args), **{k: up(v) for k, v in kwargs.items()})
        if func is SDPA:
            return out[0].to(self.dtype), out[1].to(torch.float32)
        return tuple(g.to(self.dtype) for g in out)


def active(dtype: torch.dtype) -> bool:
    """Whether matmuls on `dtype` are being emulated here (an `Fp32Matmuls` for it is entered)."""
    return any(isinstance(m, Fp32Matmuls) and m.dtype == dtype for m in _get_current_dispatch_mode_stack())
