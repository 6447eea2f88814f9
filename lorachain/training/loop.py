"""The one training loop: LoRA, COLA and every baseline are configurations of it.

`train(cfg)` runs a chain link by link inside one fixed budget: tune the link (`step.run_steps`), tie a
knot, extend the chain with a fresh adapter and a new optimizer. It checkpoints atomically, resumes
from the last checkpoint (mid-link or between links) to the same weights, and writes the run folder:
config.json, metrics.jsonl, tb/, chain.safetensors, adapter/, summary.json (and merged/).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from torch import nn

from lorachain.chain.export import head_state, is_dora, save_chain, write_adapter, write_merged
from lorachain.chain.init import learned, load_start, save_start, start_link
from lorachain.chain.knot import Knot, extend, lora_config, tie_knot, trainable_state, unload
from lorachain.chain.policy import KnotPolicy, make_policy
from lorachain.chain.shards import apply_on_shards, tie_on_shards
from lorachain.config import RunConfig
from lorachain.io import write_json
from lorachain.training import base_checkpoint, resume
from lorachain.training.checkpointing import enable_checkpointing
from lorachain.training.dpo import DPO, evaluate_pairs
from lorachain.training.evaluate import evaluate
from lorachain.training.gradients import check_fits, layer_gradients
from lorachain.training.merged_shards import write_merged_shards
from lorachain.training.precision import restore_masters
from lorachain.training.resume import CHECKPOINT, State
from lorachain.training.runfolder import NoWriter, StopFlag, peak_memory_mb, prepare_run_dir
from lorachain.training.setup import prepare
from lorachain.training.step import LMLoss, lr_factor, make_optimizer, run_steps, trainable


@dataclass
class Result:
    summary: dict
    model: nn.Module | None = None
    tokenizer: object | None = None


class Trainer:
    """Holds one run's moving parts; `run()` is the loop. Use `train(cfg)` rather than this."""

    def __init__(self, cfg: RunConfig, model: nn.Module | None, tokenizer, progress: bool) -> None:
        self.cfg, self.out = cfg, Path(cfg.output_dir)
        self.s = prepare(cfg, model, tokenizer)  # the setup pipeline (training/setup.py)
        self.dist, self.prec, self.data = self.s.dist, self.s.prec, self.s.data
        self.progress = progress and self.dist.main
        self.classifier, self.full = cfg.model.task == "classification", cfg.chain.method == "full"
        self.total, self.model = self.data.total, self.s.model  # the model changes at each knot
        self.policy: KnotPolicy = make_policy(cfg.chain, self.total, self.data.steps_per_epoch)
        self.scaler = self.prec.scaler()
        self.dpo = cfg.train.objective == "dpo"
        packing, length = cfg.data.packing, cfg.data.max_length
        self.objective = DPO(cfg.dpo) if self.dpo else LMLoss(self.classifier, packing, length)
        for line in self.s.notes:
            self.log(line)

    # -- the chain ---------------------------------------------------------------------------
    def extend(self, st: State) -> None:
        """Extend the chain with link `st.link` and a new, empty optimizer."""
        link = self.cfg.chain.links[st.link]
        if self.cfg.train.gradient_checkpointing:
            enable_checkpointing(self.model)  # idempotent; kept through knots and unload
        if self.full:
            self.peft, self.modules_to_save, self.start = self.model, [], {}
            self.model.requires_grad_(True)
        else:
            self.peft = self.new_link(st, link)
            self.modules_to_save = list(self.peft.peft_config["default"].modules_to_save or [])
        self.net = self.dist.wrap(self.peft)  # DDP over this link's parameters (itself on one process)
        fast = [p for n, p in self.peft.named_parameters() if p.requires_grad and ".lora_B." in n]
        self.opt = make_optimizer(trainable(self.peft), self.cfg.optim, fast)
        if len(st.links) <= st.link:
            n_train = sum(p.numel() for p in trainable(self.peft))
            st.links.append(
                {
                    "link": st.link,
                    "rank": link.rank,
                    "alpha": link.alpha,
                    "start_step": st.step,
                    "trainable_params": n_train,
                    "tokens": 0,
                    "est_train_flops": 0.0,
                    "wall_seconds": 0.0,
                    "losses": [],
                }
            )

    def new_link(self, st: State, link) -> PeftModel:
        """The base wrapped with link `st.link`, started as its init says (chain/init.py); a resumed
        link gets the start factors it was first given."""
        kind = self.cfg.chain.link_init(st.link)
        path = self.out / f"link{st.link}_start.pt"
        saved = load_start(path)
        grads = None
        if kind == "gradient" and saved is None:  # on the base, before the link wraps it
            check_fits(self.model, self.s.targets)
            pad = self.s.tokenizer.pad_token_id
            grads = layer_gradients(
                self.model, self.s.targets, self.data.train, self.cfg, st.step, self.prec, pad
            )
        config = lora_config(link, self.cfg.chain, self.s.targets, self.s.fan_in_fan_out, self.cfg.model.task)
        peft = extend(self.model, config, gaussian=kind == "gaussian")
        self.start = start_link(peft, kind, self.s.masters, self.s.merge, grads, saved)
        if self.start and saved is None and self.dist.main:
            save_start(path, self.start)
        return peft

    def tie(self, st: State, reason: str) -> None:
        """Tie a knot: merge the link into the base, evaluate, record; extend unless finished."""
        t0 = time.perf_counter()
        link = self.cfg.chain.links[st.link]
        if not self.full:  # full fine-tuning has nothing to merge
            if self.dist.sharded:  # each rank adds into the rows it holds
                knot = tie_on_shards(self.peft, st.link, st.step, link.rank, link.alpha, reason)
            else:
                knot = tie_knot(
                    self.peft, st.link, st.step, link.rank, link.alpha, reason, self.s.masters, self.s.merge
                )
            if self.start:  # a link that started away from zero learned s·(B·A − B₀·A₀): rank 2r
                knot.factors, knot.rank = learned(knot.factors, self.start), 2 * link.rank
            st.knots.append(knot)
            st.links[st.link]["knot_rounding"] = knot.rounding
            self.model = unload(self.peft)
        knot_seconds = time.perf_counter() - t0
        row = st.links[st.link]
        losses = row.pop("losses")
        row.update(
            end_step=st.step,
            steps=st.step - row["start_step"],
            knot_reason=reason,
            knot_seconds=knot_seconds,
            final_loss=sum(losses[-10:]) / max(1, len(losses[-10:])),
        )
        if self.data.eval and (self.dist.main or self.dist.sharded):  # a sharded forward needs every rank
            row["eval"] = self.evaluate(self.model)
        self.log(f"knot {st.link} at step {st.step} ({reason}); rank {link.rank}", row.get("eval"))
        if st.step < self.total:
            st.link, st.link_start = st.link + 1, st.step
            self.extend(st)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        size = self.cfg.train.eval_batch_size
        with self.prec.autocast():
            if self.dpo:  # preference accuracy, margin, log-ratio to the reference
                return evaluate_pairs(
                    model, self.data.eval, self.s.tokenizer.pad_token_id, size, self.cfg.dpo
                )
            return evaluate(
                model,
                self.data.eval,
                self.s.tokenizer.pad_token_id,
                size,
                self.classifier,
                self.data.cand_ids,
            )

    def due_eval(self, step: int) -> bool:
        """Whether `train.eval_every` asks for an evaluation after `step` (knots and the end
        evaluate anyway)."""
        every = self.cfg.train.eval_every
        return bool(every and self.data.eval and step % every == 0 and step < self.total)

    def lr_at(self, st: State) -> Callable[[int], float]:
        o = self.cfg.optim
        if o.restart_per_link:
            ends = getattr(self.policy, "ends", None)
            end = ends[st.link] if ends else self.total
            return lambda s: (
                o.lr * lr_factor(s - st.link_start, end - st.link_start, o.warmup_steps, o.schedule)
            )
        return lambda s: o.lr * lr_factor(s, self.total, o.warmup_steps, o.schedule)

    # -- checkpoints (format: training/resume.py) -------------------------------------------
    def save_checkpoint(self, st: State) -> None:
        base = base_checkpoint.save_base(self.out, self.model, len(st.knots), self.cfg, self.s)  # every rank
        if self.dist.main:
            resume.save(self.out, st, trainable_state(self.peft), self.opt, self.policy, self.scaler, base)
            base_checkpoint.prune(self.out, base)  # older knotted bases, now that checkpoint.pt names this

    def restore(self) -> State:
        """The state of the last checkpoint, with the model rebuilt to match; a new State if none."""
        loaded = resume.load(self.out)
        if loaded is None:
            if self.dist.main:
                resume.clear(self.out)
                for path in self.out.glob("link*_start.pt"):  # a previous run's
                    path.unlink()
            st = State()
            self.extend(st)
            return st
        st, ck = loaded
        if not base_checkpoint.load_base(self.out, ck, self.model, self.cfg, self.s):
            for knot in st.knots:  # no knotted base saved with the checkpoint: rebuild it
                if self.dist.sharded:
                    apply_on_shards(self.model, knot.factors)
                else:
                    self.s.merge(self.model, knot.factors, self.s.masters)
        self.extend(st)
        path = self.out / CHECKPOINT
        missing = set(trainable_state(self.peft)) - set(ck["trainable"])
        if missing:
            raise RuntimeError(f"{path}: checkpoint lacks {sorted(missing)[0]}; delete it to restart")
        self.peft.load_state_dict(ck["trainable"], strict=False)
        self.opt.load_state_dict(ck["optimizer"])
        self.policy.load_state_dict(json.loads(ck["policy"]))
        if self.scaler and ck.get("scaler"):
            self.scaler.load_state_dict(ck["scaler"])
        torch.set_rng_state(ck["rng"])
        if self.dist.main:
            resume.trim_metrics(self.out, st.step)
        self.log(f"resumed from {path} at step {st.step}, link {st.link}")
        return st

    # -- logging -----------------------------------------------------------------------------
    def log(self, msg: str, extra: dict | None = None) -> None:
        if self.progress:
            import sys

            from tqdm import tqdm

            tqdm.write(f"[lorachain] {msg}" + (f" {json.dumps(extra)}" if extra else ""), file=sys.stderr)

    def run(self, stop_after: int | None = None) -> Result:
        """Train to the end of the budget (or `stop_after` steps, as if interrupted)."""
        from tqdm import tqdm

        from lorachain.training.trackers import open_trackers

        st = self.restore()
        main = self.dist.main
        writer = open_trackers(self.cfg, self.out, st.step) if main else NoWriter()  # train.report_to
        metrics = (self.out / "metrics.jsonl").open("a") if main else open(os.devnull, "w")
        bar = tqdm(total=self.total, initial=st.step, disable=not self.progress, desc="train", unit="step")
        interrupted = False
        t0 = time.perf_counter()

        def on_step(step: int, loss: float, tokens: int) -> bool:
            nonlocal interrupted, t0
            st.step = step
            row = st.links[st.link]
            row["wall_seconds"] += time.perf_counter() - t0
            empty = loss != loss  # a batch without target tokens: counted; no update, no loss of 0
            if empty:
                row["empty_batches"] = row.get("empty_batches", 0) + 1
                self.log(f"step {step}: the batch has no target tokens; no update (counted in summary.json)")
            else:
                row["losses"].append(loss)
            row["tokens"] += tokens
            row["est_train_flops"] += tokens * (4 * self.s.n_params + 6 * row["trainable_params"])
            lr = self.opt.param_groups[0]["lr"]
            if not empty:
                extra = {"loss": loss, **self.objective.metrics(self.dist.sum)}  # (DPO: rewards)
                metrics.write(json.dumps({"step": step, "link": st.link, **extra, "lr": lr}) + "\n")
                metrics.flush()
                add_scalars(writer, "train", extra, step)
            writer.add_scalar("train/lr", lr, step)
            bar.update(1)
            bar.set_postfix(link=st.link, loss=f"{loss:.4f}")
            reason = self.policy.should_tie(step, st.link, st.link_start, loss)
            if reason is None and step == self.total:
                reason = "end of budget"
            link = st.link
            if reason:
                self.tie(st, reason)  # evaluates the knotted model: the same function as the link's
                writer.add_scalar("chain/knot", st.link, step)
            if self.due_eval(step) and (self.dist.main or self.dist.sharded):  # a sharded forward needs all
                ev = st.links[link].get("eval") if reason else self.evaluate(self.peft)
                metrics.write(json.dumps({"step": step, "link": link, "eval": ev}) + "\n")
                for name, value in ev.items():
                    writer.add_scalar(f"eval/{name}", value, step)
            stop = flag.stop if self.dist.world == 1 else self.dist.reduce(float(flag.stop), "max") > 0
            if step < self.total and (stop or (stop_after or self.total) <= step):
                interrupted = True
            if step < self.total and (reason or interrupted or step % self.cfg.train.save_every == 0):
                self.save_checkpoint(st)
            t0 = time.perf_counter()  # knots, evaluation and checkpoints are not step time
            return bool(reason) or interrupted

        try:
            with StopFlag() as flag:
                while st.step < self.total and not interrupted:
                    run_steps(
                        self.net,
                        self.opt,
                        self.data.train,
                        self.cfg,
                        st.step,
                        self.total,
                        self.lr_at(st),
                        self.s.tokenizer.pad_token_id,
                        self.classifier,
                        on_step,
                        self.dist,
                        self.prec,
                        self.scaler,
                        self.objective,
                    )
        finally:
            bar.close()
            metrics.close()
            writer.close()
        if interrupted:
            self.log(f"stopped at step {st.step}; run the same command again to resume")
            return Result({"status": "interrupted", "step": st.step}, self.peft, self.s.tokenizer)
        return Result(self.finish(st), self.model, self.s.tokenizer)

    def finish(self, st: State) -> dict:
        """Write the chain, the single-adapter export, (merged model) and summary.json (rank 0)."""
        cfg = self.cfg
        restore_masters(self.model, self.s.masters)  # the exact fp32 weights, knots included
        if cfg.export_merged and self.dist.sharded:  # every rank gathers, a unit at a time; rank 0 writes
            write_merged_shards(self.out / "merged", self.model, self.s.tokenizer, self.dist)
        if not self.dist.main:
            return {"status": "finished", "rank": self.dist.rank, "total_steps": self.total}
        meta = {
            "base_model": cfg.model.name_or_path,
            "gguf_file": cfg.model.gguf_file,
            "task": cfg.model.task,
            "target_modules": self.s.targets,
        }
        if not self.full:
            head = head_state(self.model, self.modules_to_save)
            save_chain(self.out / "chain.safetensors", st.knots, head, meta)
            if not is_dora(st.knots):  # a DoRA chain has no single-adapter form: merged/ instead
                write_adapter(self.out / "adapter", st.knots, head, meta)
        if cfg.export_merged or self.full or is_dora(st.knots):
            if not self.dist.sharded:  # (written above from the shards)
                write_merged(self.out / "merged", self.model, [], {}, self.s.tokenizer)
        summary = {
            "status": "finished",
            "total_steps": self.total,
            "steps_per_epoch": self.data.steps_per_epoch,
            "train_examples": len(self.data.train),
            "eval_examples": len(self.data.eval),
            "links": st.links,
            "chain_rank": sum(k.rank for k in st.knots),
            "precision": self.prec.name,
            "matmul": "emulated" if self.prec.emulate else "native",
            "base_dtype": self.cfg.model.dtype,
            "quantization": self.cfg.model.quantization,
            "attention": self.s.attn or getattr(self.model.config, "_attn_implementation", None),
            "knot_rounding": _rounding_total(st.knots),
            "wall_seconds": sum(r["wall_seconds"] for r in st.links),
            "est_train_flops": sum(r["est_train_flops"] for r in st.links),
            "peak_memory_mb": peak_memory_mb(),
            "target_modules": self.s.targets,
            "final_eval": st.links[-1].get("eval", {}),
        }
        write_json(self.out / "summary.json", summary)
        from lorachain.training.plots import plot_runs

        plot_runs({self.out.name or "run": self.out}, self.out / "loss.png")
        (self.out / CHECKPOINT).unlink(missing_ok=True)
        base_checkpoint.prune(self.out, None)
        for path in self.out.glob("link*_start.pt"):
            path.unlink()
        return summary


def add_scalars(writer, prefix: str, values: dict[str, float], step: int) -> None:
    for name, value in values.items():
        writer.add_scalar(f"{prefix}/{name}", value, step)


def _rounding_total(knots: list[Knot]) -> dict[str, float]:
    """The largest rounding of any knot (0 unless the base is held in a low dtype)."""
    return {
        "max_abs": max((k.rounding.get("max_abs", 0.0) for k in knots), default=0.0),
        "max_rel_fro": max((k.rounding.get("rel_fro", 0.0) for k in knots), default=0.0),
    }


def train(
    cfg: RunConfig,
    model: nn.Module | None = None,
    tokenizer=None,
    *,
    stop_after: int | None = None,
    progress: bool = True,
) -> Result:
    """Train the chain described by `cfg`; resume if its output_dir holds a checkpoint.

    `model`/`tokenizer` may be given (tests, notebooks); the model is modified in place. A finished
    run folder returns its summary without training again.
    """
    out = Path(cfg.output_dir)
    if int(os.environ.get("RANK", "0")) == 0:
        prepare_run_dir(out, cfg)
    if (out / "summary.json").is_file():
        return Result(json.loads((out / "summary.json").read_text()))
    return Trainer(cfg, model, tokenizer, progress).run(stop_after)
