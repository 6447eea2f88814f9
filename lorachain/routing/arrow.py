"""A training-free router from the task adapters' own weights (Arrow; PEFT's `arrow` is the anchor).

For each LoRA module of each task adapter, its prototype is the top right singular vector of
ΔW = B·A (the input direction the adapter changes most). An instruction's answer prompt runs once
through the base (adapters off); at every LoRA module, each token's input x scores each adapter by
|⟨v, x⟩|, softmaxed over the adapters; the scores are averaged over the prompt's tokens and the
modules. The per-input version of Arrow: one adapter per instruction, no training and no data.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

ADAPTER_WEIGHTS = "adapter_model.safetensors"  # a PEFT adapter folder's weights


@torch.no_grad()
def prototypes(folder: str | Path) -> dict[str, torch.Tensor]:
    """module name -> the top right singular vector (d_in,) of the module's B·A in a PEFT adapter."""
    w = load_file(str(Path(folder) / ADAPTER_WEIGHTS))
    out = {}
    for key in sorted(k for k in w if k.endswith(".lora_A.weight")):
        mod = key[: -len(".lora_A.weight")]
        a, b = w[key].float(), w[f"{mod}.lora_B.weight"].float()  # (r, d_in), (d_out, r)
        _, r = torch.linalg.qr(b)  # B = QR: B·A and R·A share their right singular vectors
        _, _, vh = torch.linalg.svd(r @ a, full_matrices=False)  # (r, d_in)
        out[mod] = vh[0]
    return out


@torch.no_grad()
def arrow_scores(
    model, prompts: list[list[int]], protos: dict[str, dict[str, torch.Tensor]], pad_id: int
) -> torch.Tensor:
    """(N, K) Arrow scores of N prompts over the K adapters of `protos` (adapter -> module ->
    vector), under whatever the model runs now (the caller disables the adapters)."""
    names = list(protos)
    modules = sorted(set.intersection(*(set(p) for p in protos.values())))
    if not modules:
        raise ValueError("arrow: the adapters share no LoRA module")
    device = next(model.parameters()).device
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, : len(p)], mask[i, : len(p)] = torch.tensor(p), 1
    total = torch.zeros(len(prompts), len(names))
    keep = mask.bool()  # (N, T)

    def hook(name: str):
        v = torch.stack([protos[a][name] for a in names])  # (K, d_in)

        def run(_module, args, _out):
            x = args[0].float().cpu()  # (N, T, d_in)
            p = torch.softmax((x @ v.T).abs(), dim=-1)  # (N, T, K)
            total.add_((p * keep[..., None]).sum(1) / keep.sum(1, keepdim=True))

        return run

    handles = [model.get_submodule(m).register_forward_hook(hook(m)) for m in modules]
    try:
        model(input_ids=ids.to(device), attention_mask=mask.to(device))
    finally:
        for h in handles:
            h.remove()
    return total / len(modules)
