"""COLA inside Hugging Face's loops: `ChainCallback` for `transformers.Trainer` and `trl.SFTTrainer`.

    chain = ChainCallback({"links": [{"rank": 8, "alpha": 16}, {"rank": 4, "alpha": 8}]})
    trainer = SFTTrainer(model, args=args, train_dataset=ds, peft_config=chain.lora_config(model),
                         callbacks=[chain])
    trainer.train()          # -> args.output_dir/chain/adapter: the whole chain as one PEFT adapter

At each knot (the links' shares, or the `auto` plateau policy) the current LoRA is merged into the
base weights (`lorachain.chain.tie_knot`), a fresh link is started in place and the Trainer's
optimizer forgets its state; the Trainer's LR schedule runs over the whole budget, or restarts per
link. Every checkpoint the Trainer saves gets `lorachain_chain.safetensors` (the knots so far and
the chain's position), so `trainer.train(resume_from_checkpoint=...)` continues mid-link; after a
rank step-down, call `chain.prepare_resume(trainer, checkpoint)` first so the LoRA has the shapes the
checkpoint holds. Under DDP every rank ties at the same step (the auto policy reads the Trainer's
gathered loss) and draws the same new link; only the main process writes files. Under FSDP2 each
rank adds a knot into the rows it holds (`chain/shards.py`: the small LoRA factors are gathered, a
base weight never); DeepSpeed is refused.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from lorachain.chain.export import load_chain, save_chain, write_adapter
from lorachain.chain.knot import (
    ADAPTER,
    PEFT_PREFIX,
    Knot,
    lora_layers,
    tie_knot,
)
from lorachain.chain.policy import KnotPolicy, make_policy
from lorachain.chain.reference import keep_links
from lorachain.chain.shards import apply_on_shards, shard_factors, sharded, tie_on_shards
from lorachain.chain.sidepath import merge_quantized
from lorachain.config import ChainConfig, ConfigError, from_dict
from lorachain.integrations.link import check_kinds, check_peft_kind, peft_rank, restart_schedule, start_link
from lorachain.store import fingerprint
from lorachain.training.precision import slow_kernel_warning

STATE_FILE = "lorachain_chain.safetensors"


def uses_reference(args) -> bool:
    """Whether the Trainer's `args` describe a trainer with a reference model: TRL's DPO and KTO
    configs (and others with a KL weight `beta`), GRPO's only when beta > 0."""
    return float(getattr(args, "beta", 0.0) or 0.0) != 0.0


class ChainCallback(TrainerCallback):
    """Ties COLA knots inside a Trainer. `chain` is a lorachain ChainConfig or the mapping of a
    config's `chain:` section (links with rank/alpha and steps/epochs/fraction, knot policy,
    init); link 0's rank and alpha must be the PEFT model's."""

    def __init__(
        self,
        chain: ChainConfig | dict,
        output_dir: str | None = None,
        restart_schedule: bool = False,
        seed: int | None = None,
        link_init: Callable[[int, Any], None] | None = None,
        keep_reference: bool | None = None,
    ) -> None:
        self.chain = chain if isinstance(chain, ChainConfig) else from_dict(ChainConfig, dict(chain), "chain")
        if self.chain.method != "lora":
            raise ConfigError("chain.method: ChainCallback chains LoRA links (method: lora)")
        check_kinds(self.chain)  # gaussian/kaiming links, rsLoRA; no moving starts, no DoRA
        self.output_dir, self.restart = output_dir, restart_schedule
        self.seed, self.link_init = seed, link_init
        self.keep_reference = keep_reference  # None: when the Trainer's args have a beta (DPO, KTO, GRPO)
        self.knots: list[Knot] = []
        self.link, self.link_start = 0, 0
        self.policy: KnotPolicy | None = None
        self.base_fingerprint: str | None = None
        self._resume_from: str | None = None  # checkpoint already restored by prepare_resume
        self._total = self._step = 0
        self._policy_state: dict = {}

    # -- set-up ------------------------------------------------------------------------------
    def lora_config(self, model, task: str = "causal_lm"):
        """The PEFT LoraConfig of link 0 for `model` (targets checked against its linear layers)."""
        from lorachain.chain.knot import lora_config
        from lorachain.models import resolve_target_modules, uses_conv1d

        targets = resolve_target_modules(model, self.chain.target_modules)
        return lora_config(self.chain.links[0], self.chain, targets, uses_conv1d(model, targets), task)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kw):
        if args.load_best_model_at_end:
            raise ConfigError("ChainCallback: load_best_model_at_end would load one link over merged knots")
        if args.deepspeed:
            raise ConfigError(
                "ChainCallback: DeepSpeed ZeRO partitions the weights a knot merges into (not supported; "
                "use FSDP2: fsdp='full_shard', fsdp_config={'version': 2})"
            )
        if args.fsdp and int((args.fsdp_config or {}).get("version", 2)) != 2:
            raise ConfigError("ChainCallback: FSDP1 flattens the weights a knot merges into; use version 2")
        mixed = "bf16" if args.bf16 else "fp16" if args.fp16 else None
        if mixed and (note := slow_kernel_warning(mixed, args.device)):
            print(f"[lorachain] {note}", file=sys.stderr)
        if self.seed is None:
            self.seed = args.seed
        self._check_reference(args, model)
        self._total = state.max_steps
        spe = max(1, math.ceil(state.max_steps / max(1e-9, float(state.num_train_epochs or 1))))
        self.policy = make_policy(self.chain, self._total, spe)
        ranks = {link.rank for link in self.chain.links}
        if args.world_size > 1 and len(ranks) > 1:
            raise ConfigError(
                "chain.links: a rank step-down gives the LoRA new parameter shapes, which DDP's "
                "gradient buckets cannot follow; use one rank for every link under DDP"
            )
        if state.global_step > 0:
            self._restore(self._checkpoint(args, state.global_step), model)
            if self._step != state.global_step:
                raise ConfigError(
                    f"ChainCallback: prepared to resume at step {self._step}, but the Trainer resumes "
                    f"at step {state.global_step}; prepare_resume the same checkpoint"
                )
            self.policy.load_state_dict(self._policy_state)
        else:
            self.knots, self.link, self.link_start = [], 0, 0
            self.base_fingerprint = fingerprint(model)
        rank, alpha = peft_rank(model)
        check_peft_kind(model, self.chain)
        link = self.chain.links[self.link]
        if (rank, alpha) != (link.rank, link.alpha):
            raise ConfigError(
                f"chain.links.{self.link}: rank {link.rank}, alpha {link.alpha:g}, but the PEFT model "
                f"has r={rank}, lora_alpha={alpha:g} (build it with ChainCallback.lora_config)"
            )
        if self.restart:
            restart_schedule(lr_scheduler, self.link_start, self._link_end() - self.link_start, self._total)

    # -- knots -------------------------------------------------------------------------------
    def on_step_end(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kw):
        if self.chain.knot.policy == "auto":
            control.should_log = True  # the auto policy reads each step's loss in on_log
            return control
        if state.global_step < self._total:
            reason = self.policy.should_tie(state.global_step, self.link, self.link_start, math.nan)
            if reason:
                self._tie(state, model, optimizer, lr_scheduler, reason)
        return control

    def on_log(self, args, state, control, logs=None, model=None, optimizer=None, lr_scheduler=None, **kw):
        loss = (logs or {}).get("loss")
        if self.chain.knot.policy != "auto" or loss is None or state.global_step >= self._total:
            return control
        reason = self.policy.should_tie(state.global_step, self.link, self.link_start, float(loss))
        if reason:
            self._tie(state, model, optimizer, lr_scheduler, reason)
        return control

    def _tie(self, state, model, optimizer, lr_scheduler, reason: str) -> None:
        link = self.chain.links[self.link]
        if sharded(model):  # FSDP2: into the rows each rank holds
            knot = tie_on_shards(model, self.link, state.global_step, link.rank, link.alpha, reason)
        else:
            knot = tie_knot(
                model, self.link, state.global_step, link.rank, link.alpha, reason, None, self._merge(model)
            )
        self.knots.append(knot)
        self.link, self.link_start = self.link + 1, state.global_step
        nxt = self.chain.links[self.link]
        start_link(model, optimizer, nxt.rank, nxt.alpha, self.chain.link_init(self.link), self._generator())
        if self.link_init is not None:
            self.link_init(self.link, model)
        if self.restart:
            restart_schedule(lr_scheduler, self.link_start, self._link_end() - self.link_start, self._total)
        if state.is_world_process_zero:
            print(f"[lorachain] knot {self.link - 1} at step {state.global_step} ({reason})", file=sys.stderr)

    def _merge(self, model) -> Callable:
        """How a knot adds a link: beside the weights, off in the reference (`chain.reference`), or
        into them (`merge_quantized`: a side path on a quantized base, else `apply_factors`)."""
        return keep_links(model) if self.keep_reference else merge_quantized

    def _check_reference(self, args, model) -> None:
        """Keep the reference (the adapter-off model) the starting model when the Trainer uses one."""
        if self.keep_reference is None:
            self.keep_reference = uses_reference(args)
        if self.keep_reference and sharded(model):
            raise ConfigError(
                "ChainCallback: keeping the reference (a preference trainer's adapter-off model) is not "
                "supported under FSDP2; use DDP, or precompute_ref_log_probs=True and keep_reference=False"
            )

    def _generator(self) -> torch.Generator:
        seed = self.seed if self.seed is not None else 0
        return torch.Generator().manual_seed(seed * 1_000_003 + self.link)

    def _link_end(self) -> int:
        ends = getattr(self.policy, "ends", None)
        return ends[self.link] if ends else self._total

    # -- checkpoints -------------------------------------------------------------------------
    def _meta(self, model) -> dict:
        config = model.peft_config[ADAPTER]
        return {
            "step": self._step,
            "link": self.link,
            "link_start": self.link_start,
            "policy": self.policy.state_dict() if self.policy else {},
            "base_fingerprint": self.base_fingerprint,
            "base_model": config.base_model_name_or_path,
            "task": "classification"
            if getattr(config.task_type, "value", None) == "SEQ_CLS"
            else "causal_lm",
            "target_modules": sorted(config.target_modules),
            "keep_reference": bool(self.keep_reference),
        }

    def on_save(self, args, state, control, model=None, **kw):
        self._step = state.global_step
        if state.is_world_process_zero:
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}" / STATE_FILE
            save_chain(path, self.knots, {}, self._meta(model))
        return control

    def _checkpoint(self, args, step: int) -> Path:
        if self._resume_from is not None:
            return Path(self._resume_from)
        return Path(args.output_dir) / f"checkpoint-{step}"

    def prepare_resume(self, trainer, checkpoint: str | bool = True) -> str:
        """Before `trainer.train(resume_from_checkpoint=...)`: merge the checkpoint's knots into
        the (original) base and give the LoRA the current link's rank, so the Trainer can load
        the link's weights and optimizer state. Returns the checkpoint folder to resume from."""
        if checkpoint is True:
            from transformers.trainer_utils import get_last_checkpoint

            checkpoint = get_last_checkpoint(trainer.args.output_dir)
            if checkpoint is None:
                raise ConfigError(f"{trainer.args.output_dir}: no checkpoint to resume from")
        if self.keep_reference is None:
            self.keep_reference = uses_reference(trainer.args)
        self._restore(Path(checkpoint), trainer.model)
        self._resume_from = str(checkpoint)
        return str(checkpoint)

    def _restore(self, folder: Path, model) -> None:
        """Knots and chain position of a checkpoint, applied to the model (once)."""
        if self._resume_from is not None and Path(self._resume_from) == folder:
            return  # prepare_resume did it
        path = folder / STATE_FILE
        if not path.is_file():
            raise ConfigError(f"{path}: missing; resuming a chain needs the knots saved with the checkpoint")
        knots, _, meta = load_chain(path)
        if meta["base_fingerprint"] != fingerprint(model):
            raise ConfigError(
                f"{path}: the model's base weights are not the ones this run started from "
                "(already holding knots?); build the model afresh before resuming"
            )
        merge = apply_on_shards if sharded(model) else self._merge(model)
        for knot in knots:
            merge(model.base_model.model, knot.factors)
        self.knots, self.link, self.link_start = knots, meta["link"], meta["link_start"]
        self.base_fingerprint, self._step, self._policy_state = (
            meta["base_fingerprint"],
            meta["step"],
            meta["policy"],
        )
        link = self.chain.links[self.link]
        if peft_rank(model) != (link.rank, link.alpha):
            start_link(model, None, link.rank, link.alpha, self.chain.init, torch.Generator().manual_seed(0))

    # -- the end -----------------------------------------------------------------------------
    def on_train_end(self, args, state, control, model=None, **kw):
        """Record the last link (not merged: the model keeps working as trained) and write the
        chain: chain.safetensors and adapter/ (one PEFT LoRA of rank Σr on the original base)."""
        if state.global_step > self.link_start or not self.knots:
            link = self.chain.links[self.link]
            factors = {name: shard_factors(layer) for name, layer in lora_layers(model).items()}
            self.knots.append(
                Knot(self.link, state.global_step, link.rank, link.alpha, "end of budget", factors)
            )
        if not state.is_world_process_zero:
            return control
        out = Path(self.output_dir or os.path.join(args.output_dir, "chain"))
        meta = self._meta(model)
        head = trained_head(model)
        save_chain(out / "chain.safetensors", self.knots, head, meta)
        write_adapter(out / "adapter", self.knots, head, meta)
        print(f"[lorachain] chain of {len(self.knots)} links written to {out}", file=sys.stderr)
        return control


def trained_head(model) -> dict[str, torch.Tensor]:
    """Fully trained modules (PEFT's modules_to_save, e.g. a classifier head), by base-model name."""
    names = list(model.peft_config[ADAPTER].modules_to_save or [])
    if not names:
        return {}
    out = {}
    for name, module in model.named_modules():
        saved = getattr(module, "modules_to_save", None)
        if name.split(".")[-1] in names and saved is not None and ADAPTER in saved:
            prefix = name.removeprefix(PEFT_PREFIX)
            for key, p in saved[ADAPTER].named_parameters():
                out[f"{prefix}.{key}"] = p.detach().float().cpu().clone()
    return out
