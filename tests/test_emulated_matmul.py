"""bf16/fp16 matmuls emulated in fp32 on a CPU without native ones: the numbers of the native kernels."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from conftest import run_config, tiny_model

from lorachain.config import RunConfig, from_dict
from lorachain.training.emulated_matmul import Fp32Matmuls
from lorachain.training.loop import train
from lorachain.training.precision import Precision, resolve

DTYPES = [torch.bfloat16, torch.float16]


def operands(dtype):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 40, 72, generator=g), torch.randn(3, 72, 56, generator=g)
    bias = torch.randn(56, generator=g)
    return a.to(dtype), b.to(dtype), bias.to(dtype)


CALLS = {
    "mm": lambda a, b, bias: a[0] @ b[0],
    "addmm": lambda a, b, bias: torch.addmm(bias, a[0], b[0]),
    "bmm": lambda a, b, bias: torch.bmm(a, b),
    "baddbmm": lambda a, b, bias: torch.baddbmm(bias.expand(3, 40, 56), a, b, alpha=0.5, beta=2.0),
    "linear_3d": lambda a, b, bias: torch.nn.functional.linear(a, b[0].T.contiguous(), bias),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", CALLS)
def test_emulated_matmul_rounds_the_fp32_result_once_like_a_native_kernel(dtype, op):
    a, b, bias = operands(dtype)
    native = CALLS[op](a, b, bias)
    with Fp32Matmuls(dtype):
        emulated = CALLS[op](a, b, bias)
    exact = CALLS[op](a.double(), b.double(), bias.double()).to(dtype)  # products and sums exact
    assert emulated.dtype == native.dtype == dtype and emulated.shape == native.shape
    assert (emulated == exact).float().mean() > 0.99  # only accumulation order may move a rounding
    ulp = torch.finfo(dtype).eps
    torch.testing.assert_close(emulated, native, rtol=ulp, atol=ulp)


def test_other_dtypes_and_ops_pass_through_unchanged():
    a, b, _ = operands(torch.float32)
    with Fp32Matmuls(torch.bfloat16):
        out = a[0] @ b[0]
        assert out.dtype == torch.float32 and torch.equal(out, a[0] @ b[0])
        assert torch.equal(torch.exp(a.bfloat16()), torch.exp(a.bfloat16()))


def test_resolve_emulates_only_where_the_cpu_has_no_native_kernel(monkeypatch):
    import lorachain.training.precision as p

    monkeypatch.setattr(p, "cpu_flags", lambda: {"avx2", "avx512f"})
    assert resolve("bf16", torch.device("cpu")).emulate and resolve("fp16", torch.device("cpu")).emulate
    assert not resolve("fp32", torch.device("cpu")).emulate
    assert resolve("auto", torch.device("cpu")) == Precision("fp32")
    monkeypatch.setattr(p, "cpu_flags", lambda: {"avx2", "avx512_bf16"})
    assert not resolve("bf16", torch.device("cpu")).emulate
    assert resolve("fp16", torch.device("cpu")).emulate


def test_a_backward_under_matmuls_is_emulated_too():
    """Autocast ends before the backward; `Precision.matmuls` covers it, with the native gradients."""
    seen = []

    class Counting(Fp32Matmuls):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func.__name__)
            return super().__torch_dispatch__(func, types, args, kwargs)

    lin = torch.nn.Linear(72, 56)
    x = torch.randn(4, 16, 72, generator=torch.Generator().manual_seed(1), requires_grad=True)

    def grads(mode):
        lin.zero_grad()
        x.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16), mode:
            loss = lin(x).float().square().mean()
        with mode:
            loss.backward()
        return x.grad.clone(), lin.weight.grad.clone()

    native = grads(contextlib.nullcontext())
    with_mode = grads(Counting(torch.bfloat16))
    assert seen.count("mm.default") >= 2 and seen.count("addmm.default") == 1  # 2 in the backward
    for n, e in zip(native, with_mode, strict=True):  # up to accumulation order: native bf16 kernels
        # (AMX, AVX-512 BF16) may round a rare output to the neighbouring bf16 value (one ulp, 2^-8)
        off = ~torch.isclose(e, n, rtol=1e-5, atol=1e-7)
        assert off.float().mean() <= 1e-3, f"{int(off.sum())} of {n.numel()} gradients differ"
        torch.testing.assert_close(e, n, rtol=2**-8, atol=2**-8 * float(n.abs().max()))


def test_training_in_emulated_bf16_matches_the_native_kernels(tmp_path, toy_data, tokenizer, monkeypatch):
    import lorachain.training.precision as p

    in_backward = []

    class Seeing(Fp32Matmuls):  # notes whether each emulated matmul runs inside a backward
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            in_backward.append(torch._C._current_graph_task_id() != -1)
            return super().__torch_dispatch__(func, types, args, kwargs)

    monkeypatch.setattr(p, "Fp32Matmuls", Seeing)

    def run(name, flags):
        monkeypatch.setattr(p, "cpu_flags", lambda: flags)
        raw = run_config(tmp_path, toy_data, "llama", output_dir=str(tmp_path / name))
        raw["train"].update(precision="bf16", max_steps=6)
        return train(from_dict(RunConfig, raw), tiny_model("llama"), tokenizer, progress=False)

    native, emulated = run("native", {"avx512_bf16"}), run("emulated", {"avx2"})
    assert (native.summary["matmul"], emulated.summary["matmul"]) == ("native", "emulated")
    assert emulated.summary["precision"] == "bf16"
    assert any(in_backward) and not all(in_backward)  # the forward's matmuls and the backward's
    losses = [
        [json.loads(line)["loss"] for line in (tmp_path / n / "metrics.jsonl").open() if '"loss"' in line]
        for n in ("native", "emulated")
    ]
    assert len(losses[0]) == 6 and losses[1] == pytest.approx(losses[0], rel=1e-3)
    pairs = zip(native.model.named_parameters(), emulated.model.named_parameters(), strict=True)
    for (n, a), (_, b) in pairs:
        torch.testing.assert_close(b, a, rtol=1e-2, atol=1e-4, msg=n)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_attention_runs_in_fp32_rounded_once(dtype):
    """SDPA's fused CPU kernel (forward and backward) is emulated too: the output and dV are the fp32
    kernel's, rounded once (dQ and dK also depend on the rounded output autograd saved, as natively),
    and nothing is further from the exact result than the native kernel's."""
    g = torch.Generator().manual_seed(0)
    q, k, v, grad = (torch.randn(1, 3, 300, 32, generator=g) for _ in range(4))
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def run(dt, ctx=None):
        leaves = [t.to(dt).requires_grad_() for t in (q, k, v)]
        with ctx or contextlib.nullcontext():
            out = sdpa(*leaves, is_causal=True)
            out.backward(grad.to(dt))
        return [out.detach()] + [t.grad for t in leaves]

    emulated = run(dtype, Fp32Matmuls(dtype))
    rounded = [t.to(dtype) for t in run_rounded(q, k, v, grad, dtype, sdpa)]
    native = run(dtype)
    exact = run_rounded(q, k, v, grad, dtype, sdpa, torch.float64)
    assert torch.equal(emulated[0], rounded[0]) and torch.equal(emulated[3], rounded[3])  # out, dV
    for e, n, x in zip(emulated, native, exact, strict=True):
        assert e.dtype == dtype and e.shape == x.shape
        scale = x.abs().max()
        assert (e.double() - x).abs().max() <= (n.double() - x).abs().max() + 1e-6 * scale


def run_rounded(q, k, v, grad, dtype, sdpa, up=torch.float32):
    """SDPA in `up` on operands first rounded to `dtype`: output and input gradients."""
    leaves = [t.to(dtype).to(up).requires_grad_() for t in (q, k, v)]
    out = sdpa(*leaves, is_causal=True)
    out.backward(grad.to(dtype).to(up))
    return [out.detach()] + [t.grad for t in leaves]
