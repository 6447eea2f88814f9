"""How a new link starts (`chain.init`, or a link's own `init`), with the chain kept exact.

- `gaussian` / `kaiming`: A random, B = 0 (the paper's and PEFT's default): the link starts at zero
  and the base is untouched.
- `pissa` (Meng et al. 2024): s·B₀·A₀ is the top-r SVD part of the weight.
- `olora` (Büyükakyüz 2024): s·B₀·A₀ is the first r columns of the weight's QR decomposition.
- `gradient` (LoRA-GA, Wang et al. 2024, as PEFT builds it: direction `ArB2r`, scale `stable`):
  from the SVD G = U·S·Vᵀ of the loss gradient w.r.t. the weight, A₀ = Vᵀ[:r] and B₀ = U[:, r:2r]·S[r:2r]
  · out^¼ / √γ, so that the first step moves the product along the top singular directions of −G:
  the Frank–Wolfe step COLA names, at every link.

For the last three the base is moved by −s·B₀·A₀ (in fp32, on the fp32 masters), so the model's function
is unchanged when the link starts, and what the link learns is s·(B·A − B₀·A₀): its knot records those
factors of rank 2r (`learned`), so the trained model stays the base plus the sum of what each link learned.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lorachain.chain.knot import ADAPTER, Factors, lora_layers
from lorachain.config.chain import MOVING_INITS
from lorachain.io import atomic_write

STABLE_GAMMA = 16  # LoRA-GA's stable scale (PEFT's LoraGAConfig default)


def init_factors(
    kind: str, weight: torch.Tensor, r: int, scale: float, grad: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A₀ (r, in), B₀ (out, r)) of a link of kind `kind` on a layer of fp32 `weight` (out, in)."""
    if kind == "pissa":
        U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
        root = torch.sqrt(S[:r] / scale)
        return root[:, None] * Vh[:r], U[:, :r] * root[None, :]
    if kind == "olora":
        Q, R = torch.linalg.qr(weight)
        return R[:r].clone(), Q[:, :r].clone()
    if kind == "gradient":
        if grad is None:
            raise ValueError("gradient init needs the layer's loss gradient")
        U, S, Vh = torch.linalg.svd(grad.float(), full_matrices=False)
        k = min(r, max(0, len(S) - r))  # a layer narrower than 2r takes what there is
        B = torch.zeros(weight.shape[0], r)
        B[:, :k] = U[:, r : r + k] * S[r : r + k] * (weight.shape[0] ** 0.25 / STABLE_GAMMA**0.5)
        return Vh[:r].clone(), B
    raise ValueError(f"unknown link init {kind!r}")


def start_link(
    peft, kind: str, masters: dict, merge, grads: dict | None = None, start: dict | None = None
) -> dict[str, Factors]:
    """Set the new link's factors per `kind` (or to `start`, saved when the link first started) and
    move the base by −s·B₀·A₀ with `merge`, the knot's own (fp32 masters and all); return the start
    factors by layer ({} for PEFT's own inits, which start at zero)."""
    if kind not in MOVING_INITS:
        return {}
    if start is None:
        start = compute_start(peft, kind, masters, grads)
    set_start(peft, start)
    base = peft.base_model.model
    merge(base, {n: Factors(f.A, -f.B, f.scale, None, f.fan_in_fan_out) for n, f in start.items()}, masters)
    return start


def compute_start(peft, kind: str, masters: dict, grads: dict | None) -> dict[str, Factors]:
    """The start factors of every LoRA layer of `peft` for a link of kind `kind`."""
    start = {}
    base = peft.base_model.model
    for name, layer in lora_layers(peft).items():
        module = base.get_submodule(name)
        module = getattr(module, "base_layer", module)
        weight = masters.get(name, module.weight).detach().float()
        if layer.fan_in_fan_out:
            weight = weight.T  # Conv1D stores (in, out)
        scale = float(layer.scaling[ADAPTER])
        grad = (grads or {}).get(name)
        if grad is not None and layer.fan_in_fan_out:
            grad = grad.T
        A0, B0 = init_factors(kind, weight, layer.r[ADAPTER], scale, grad)
        start[name] = Factors(A0, B0, scale, None, bool(layer.fan_in_fan_out))
    return start


def set_start(peft, start: dict[str, Factors]) -> None:
    """Write the start factors into the link's LoRA weights (in their dtype)."""
    with torch.no_grad():
        for name, layer in lora_layers(peft).items():
            f = start[name]
            a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
            a.copy_(f.A.to(a.device, a.dtype))
            b.copy_(f.B.to(b.device, b.dtype))


def learned(trained: dict[str, Factors], start: dict[str, Factors]) -> dict[str, Factors]:
    """What a link learned, s·(B·A − B₀·A₀), as factors of rank 2r: [B, −B₀] · [A; A₀] (exact in
    fp32). Links that started at zero (`start` empty) learned their trained factors."""
    if not start:
        return trained
    out = {}
    for name, f in trained.items():
        s = start[name]
        out[name] = Factors(
            A=torch.cat([f.A, s.A], dim=0),  # (2r, in)
            B=torch.cat([f.B, -s.B], dim=1),  # (out, 2r)
            scale=f.scale,
            bias=f.bias,
            fan_in_fan_out=f.fan_in_fan_out,
        )
    return out


def save_start(path: Path, start: dict[str, Factors]) -> None:
    """Keep a link's start factors (atomically), so that a resumed link starts where it first did."""
    state = {n: vars(f) for n, f in start.items()}
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_start(path: Path) -> dict[str, Factors] | None:
    """The start factors `save_start` kept, or None."""
    if not path.is_file():
        return None
    return {n: Factors(**f) for n, f in torch.load(path, weights_only=True).items()}
