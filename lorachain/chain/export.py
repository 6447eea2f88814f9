"""Save a finished chain, and export it as one standard PEFT adapter or as a merged model.

The sum of the links' scaled BᵢAᵢ is exactly one LoRA of rank Σrᵢ with stacked factors
(B = [s₁B₁ | s₂B₂ | …], A = [A₁; A₂; …], scale 1), so the whole chain ships as a single adapter
that PEFT, vLLM and LoRAX load on the original base model, with no lorachain import.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file
from torch import nn

from lorachain.chain.knot import PEFT_PREFIX, Factors, Knot, apply_factors, total_delta
from lorachain.io import atomic_dir, atomic_write

CHAIN_FILE = "chain.safetensors"
HEAD = "head."


def head_state(model: nn.Module, modules_to_save: list[str] | None) -> dict[str, torch.Tensor]:
    """Parameters of the fully trained modules (a classifier's new head), by base-model name."""
    names = set(modules_to_save or [])
    return {
        f"{mod_name}.{p_name}": p.detach().float().cpu().clone()
        for mod_name, module in model.named_modules()
        if mod_name.split(".")[-1] in names
        for p_name, p in module.named_parameters(recurse=False)
    }


def save_chain(path: str | Path, knots: list[Knot], head: dict[str, torch.Tensor], meta: dict) -> Path:
    """All knots' factors and the head in one safetensors file; `meta` goes in its header."""
    tensors: dict[str, torch.Tensor] = {f"{HEAD}{k}": v.contiguous() for k, v in head.items()}
    knot_meta = []
    for knot in knots:
        for name, f in knot.factors.items():
            tensors[f"link{knot.link}/{name}/A"] = f.A.contiguous()
            tensors[f"link{knot.link}/{name}/B"] = f.B.contiguous()
            if f.bias is not None:
                tensors[f"link{knot.link}/{name}/bias"] = f.bias.contiguous()
            if f.magnitude is not None:
                tensors[f"link{knot.link}/{name}/magnitude"] = f.magnitude.contiguous()
        any_f = next(iter(knot.factors.values()))
        knot_meta.append(
            {
                "link": knot.link,
                "step": knot.step,
                "rank": knot.rank,
                "alpha": knot.alpha,
                "reason": knot.reason,
                "scale": any_f.scale,
                "fan_in_fan_out": any_f.fan_in_fan_out,
                "layers": sorted(knot.factors),
            }
        )
    header = {"knots": json.dumps(knot_meta), "meta": json.dumps(meta, sort_keys=True)}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))


def load_chain(path: str | Path) -> tuple[list[Knot], dict[str, torch.Tensor], dict]:
    """Inverse of `save_chain`: (knots, head, meta)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no chain file (is this a finished lorachain run folder?)")
    with safe_open(str(path), "pt") as f:
        header = f.metadata() or {}
    tensors = load_file(str(path))
    knots = []
    for k in json.loads(header["knots"]):
        pre = f"link{k['link']}/"
        factors = {
            name: Factors(
                A=tensors[f"{pre}{name}/A"],
                B=tensors[f"{pre}{name}/B"],
                scale=k["scale"],
                bias=tensors.get(f"{pre}{name}/bias"),
                fan_in_fan_out=k["fan_in_fan_out"],
                magnitude=tensors.get(f"{pre}{name}/magnitude"),
            )
            for name in k["layers"]
        }
        knots.append(Knot(k["link"], k["step"], k["rank"], k["alpha"], k["reason"], factors))
    head = {k.removeprefix(HEAD): v for k, v in tensors.items() if k.startswith(HEAD)}
    return knots, head, json.loads(header["meta"])


def write_adapter(out_dir: str | Path, knots: list[Knot], head: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write the chain as one standard PEFT LoRA adapter folder (adapter_config + safetensors)."""
    stacked = total_delta(knots)
    rank = sum(k.rank for k in knots)
    tensors = {}
    for name, f in stacked.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = f.A.contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = f.B.contiguous()
        if f.bias is not None:
            tensors[f"{PEFT_PREFIX}{name}.lora_B.bias"] = f.bias.contiguous()
    for name, value in head.items():
        tensors[f"{PEFT_PREFIX}{name}"] = value.contiguous()
    any_f = next(iter(stacked.values()))
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,  # scale 1: the links' scales are folded into B
        target_modules=meta["target_modules"],
        lora_dropout=0.0,
        lora_bias=any_f.bias is not None,
        fan_in_fan_out=any_f.fan_in_fan_out,
        task_type="SEQ_CLS" if meta["task"] == "classification" else "CAUSAL_LM",
        modules_to_save=sorted({n.split(".")[-2] for n in head}) or None,
        base_model_name_or_path=meta["base_model"],
    )

    def fill(tmp: Path) -> None:
        config.save_pretrained(str(tmp))
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "lorachain_chain.json").write_text(
            json.dumps(
                {
                    "links": [
                        {"rank": k.rank, "alpha": k.alpha, "step": k.step, "reason": k.reason} for k in knots
                    ]
                },
                indent=2,
            )
        )

    return atomic_dir(out_dir, fill)


def merge_into(base: nn.Module, knots: list[Knot], head: dict[str, torch.Tensor]) -> nn.Module:
    """Apply every knot, in order, to the original base, and load the trained head."""
    for knot in knots:
        apply_factors(base, knot.factors)
    if head:
        with torch.no_grad():
            for name, value in head.items():
                base.get_parameter(name).copy_(value.to(base.get_parameter(name).device))
    return base


def write_merged(
    out_dir: str | Path, base: nn.Module, knots: list[Knot], head: dict[str, torch.Tensor], tokenizer=None
) -> Path:
    """Save the merged model, loadable by plain `transformers` `from_pretrained`."""
    model = merge_into(base, knots, head)

    def fill(tmp: Path) -> None:
        model.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))

    return atomic_dir(out_dir, fill)


def is_dora(knots: list[Knot]) -> bool:
    """Whether the chain has DoRA links (then it exports merged, never as one adapter)."""
    return any(f.magnitude is not None for k in knots for f in k.factors.values())
