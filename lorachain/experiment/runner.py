"""`lorachain experiment`: the grid of tasks x methods x seeds x learning rates, one cell at a time.

Every cell writes `cells/<task>/<method>/seed<s>/lr<lr>/result.json` atomically when it is done and
is never computed again; a killed cell resumes from its training checkpoint. Each cell trains with
the one loop (`lorachain.training.loop.train`) on a fresh copy of the base model, then scores validation
and test with the task's metric, and records its cost: time, estimated FLOPs, peak memory.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from lorachain.config import ConfigError, RunConfig, from_dict
from lorachain.experiment import forgetting
from lorachain.experiment.config import ExperimentConfig
from lorachain.experiment.grid import cell_lock, collect, finished_precisions, prepare
from lorachain.experiment.records import curve, link_kind
from lorachain.io import write_json, write_text
from lorachain.models import best_device
from lorachain.tasks import Task, TaskExample, get_task
from lorachain.tasks.protocol import PATHS, Splits, sample_splits
from lorachain.training.evaluate import score_task
from lorachain.training.precision import resolve
from lorachain.training.runfolder import peak_memory_mb, reset_peak_memory

RESERVED = (
    "n_train",
    "n_val",
    "n_test",
    "lrs",
    "seeds",
    "baseline",
)  # method keys that are not RunConfig sections


@dataclass(frozen=True)
class Cell:
    task: str
    method: str
    seed: int
    lr: float | None  # None: a baseline without training

    @property
    def id(self) -> str:
        lr = "none" if self.lr is None else f"{self.lr:g}"
        return f"{self.task}/{self.method}/seed{self.seed}/lr{lr}"


def cell_cost(summary: dict, t0: float, t1: float, t2: float) -> dict:
    """A cell's cost. `t0`..`t1` is this sitting's set-up and training, `t1`..`t2` its evaluation;
    the training seconds come from the run's summary, summed over every sitting that trained it, so
    a cell resumed from a checkpoint costs all of its sittings, not only the last one."""
    train = summary.get("wall_seconds", 0.0)
    return {
        "train_seconds": train,
        "eval_seconds": t2 - t1,
        "cell_seconds": max(t2 - t0, train + t2 - t1),
        "est_train_flops": summary.get("est_train_flops", 0.0),
        "peak_rss_mb": peak_memory_mb(),
        "trainable_params": sum(link["trainable_params"] for link in summary.get("links", [])),
    }


def plan(cfg: ExperimentConfig) -> list[Cell]:
    """Every cell of the grid, tasks outermost, so a task's results complete early; within a task,
    by method or (`order: seeds`) by seed first."""
    cells = []
    for task in cfg.tasks:
        mine = []
        for name, m in cfg.methods.items():
            lrs = [None] if m.get("baseline") else m.get("lrs", cfg.lrs)
            mine += [Cell(task, name, seed, lr) for seed in m.get("seeds", cfg.seeds) for lr in lrs]
        if cfg.order == "seeds":  # stable: methods keep their order within a seed
            seeds = list(dict.fromkeys(c.seed for c in mine))
            mine.sort(key=lambda c: seeds.index(c.seed))
        cells += mine
    return cells


def task_paths(cfg: ExperimentConfig, task: str) -> tuple[Path, Path]:
    given = cfg.paths.get(task)
    if given is not None:
        if not isinstance(given, dict) or "train" not in given or "test" not in given:
            raise ConfigError(f"paths.{task}: expected a mapping with train and test")
        return Path(given["train"]), Path(given["test"])
    if task not in PATHS:
        raise ConfigError(f"paths.{task}: no default location for this task; give paths.{task}.train/test")
    train, test = PATHS[task]
    return Path(cfg.data_dir) / train, Path(cfg.data_dir) / test


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def run_config(cfg: ExperimentConfig, cell: Cell, task: Task, folder: Path, n_labels: int = 2) -> RunConfig:
    """The RunConfig of a training cell: base, then the method's sections, then the cell's own."""
    sections = {k: v for k, v in cfg.methods[cell.method].items() if k not in RESERVED}
    merged = _deep_merge(cfg.base, sections)
    merged = _deep_merge(
        merged,
        {
            "model": dataclasses.asdict(cfg.model),
            "data": {"train": str(folder / "train.jsonl"), "eval": None, "max_length": cfg.max_length},
            "optim": {"lr": cell.lr},
            "train": {"seed": cell.seed},
            "output_dir": str(folder / "run"),
        },
    )
    if cfg.model.task == "classification":
        words = {str(i): str(i) for i in range(n_labels)}
        merged["data"].update(prompt="{prompt}", target=None, label_field="label", label_words=words)
    else:
        merged["data"].update(prompt="{prompt}", target="{target}", label_field=None)
        merged["data"]["eos"] = task.kind == "generation"
    return from_dict(RunConfig, merged, f"methods.{cell.method}")


def _rows(examples: list[TaskExample], classifier: bool) -> list[dict]:
    if classifier:
        return [{"prompt": e.prompt, "label": str(e.gold)} for e in examples]
    return [{"prompt": e.prompt, "target": e.target} for e in examples if e.gold is not None or e.answers]


def icl_examples(test: list[TaskExample], train: list[TaskExample], k: int, seed: int) -> list[TaskExample]:
    """The in-context baseline's inputs: k random training demonstrations before each prompt."""
    rng = random.Random(seed)
    pool = [e for e in train if e.gold is not None or e.answers]
    out = []
    for e in test:
        demos = rng.sample(pool, min(k, len(pool)))
        context = "".join(f"{d.prompt}{d.target}\n\n" for d in demos)
        out.append(TaskExample(context + e.prompt, e.candidates, e.gold, e.answers, e.group))
    return out


class Runner:
    """The loaded base model, tokenizer and splits, shared by every cell of one process."""

    def __init__(self, cfg: ExperimentConfig, progress: bool = True) -> None:
        self.cfg, self.progress = cfg, progress
        self.out = Path(cfg.output_dir)
        self._base = self._tokenizer = None
        self._loaded: dict[str, tuple[list[TaskExample], list[TaskExample]]] = {}

    def base(self):
        """(base model, tokenizer); a classifier's model is None: each cell loads it with its head."""
        if self._tokenizer is None:
            from lorachain.models import load_tokenizer, resolve_path
            from lorachain.training.setup import load_base

            self._tokenizer = load_tokenizer(resolve_path(self.cfg.model))
            if self.cfg.model.task == "classification":
                return None, self._tokenizer
            self._base = load_base(self.cfg.model)
            if self._base.config.pad_token_id is None:
                self._base.config.pad_token_id = self._tokenizer.pad_token_id
        return self._base, self._tokenizer

    def general_examples(self) -> list[TaskExample]:
        """The forgetting set's rows (fixed for the whole grid)."""
        if not hasattr(self, "_general"):
            f = self.cfg.forgetting
            self._general = forgetting.general_examples(
                Path(f["general"]), list(f["general_tasks"]), int(f.get("n_general", 200))
            )
        return self._general

    def splits(self, task: str, seed: int, n_train: int, n_val: int, n_test: int) -> Splits:
        if get_task(task).memorise:  # generated pairs, scored on themselves: val and test are prefixes
            pool = get_task(task).load(self.cfg.paths.get(task, {}))[:n_train]
            counts = {"train": len(pool), "val": min(n_val, len(pool)), "test": min(n_test, len(pool))}
            return Splits(pool, pool[:n_val], pool[:n_test], counts | {"borrowed_from_validation": 0})
        if task not in self._loaded:
            train_path, test_path = task_paths(self.cfg, task)
            load = get_task(task).load
            if train_path.resolve() == test_path.resolve():  # one file: draw every split from it
                self._loaded[task] = ([], load(test_path))
            else:
                self._loaded[task] = (load(train_path), load(test_path))
        pool, held = self._loaded[task]
        return sample_splits(pool, held, seed, n_train, n_val, n_test)

    def score(
        self, model, task: Task, examples: list[TaskExample], max_length: int, precision: str = "fp32"
    ) -> dict:
        """The task's metric on `examples`, under the autocast of the cell's training precision."""
        from lorachain.models import device_of
        from lorachain.training.precision import resolve

        c = self.cfg
        classifier = c.model.task == "classification"
        with resolve(precision, device_of(model)).autocast():
            return score_task(
                model,
                self._tokenizer,
                task,
                examples,
                c.eval_batch_size,
                max_length,
                c.max_new_tokens,
                classifier,
            )

    def run_cell(self, cell: Cell) -> dict:
        c, method = self.cfg, self.cfg.methods[cell.method]
        task = get_task(cell.task)
        n_train = int(method.get("n_train", c.n_train))
        n_val, n_test = int(method.get("n_val", c.n_val)), int(method.get("n_test", c.n_test))
        splits = self.splits(cell.task, cell.seed, n_train, n_val, n_test)
        folder = self.out / "cells" / cell.id
        base, tok = self.base()
        reset_peak_memory()
        t0 = time.perf_counter()
        row = {
            "task": cell.task,
            "method": cell.method,
            "seed": cell.seed,
            "lr": cell.lr,
            "metric": task.metric,
        }
        row["counts"] = splits.counts
        baseline = method.get("baseline")
        precision = _deep_merge(c.base, method).get("train", {}).get("precision", "fp32")
        if baseline:
            model, summary = base, {}
            val, test, length = splits.val, splits.test, c.max_length
            if baseline == "icl":
                k, length = c.icl_k, min(2048, c.max_length * (c.icl_k + 1))
                val = icl_examples(val, splits.train, k, cell.seed)
                test = icl_examples(test, splits.train, k, cell.seed + 1)
            row["spec"] = {
                "baseline": baseline,
                "icl_k": c.icl_k if baseline == "icl" else 0,
                "n_train": n_train,
            }
        else:
            model, summary, run_cfg = self._train(cell, task, splits, folder)
            val, test, length = splits.val, splits.test, c.max_length
            row["spec"] = {
                "method": run_cfg.chain.method,
                "ranks": [link.rank for link in run_cfg.chain.links],
                "optimizer": run_cfg.optim.name,
                "knot_policy": run_cfg.chain.knot.policy,
                "n_train": n_train,
                "steps": summary["total_steps"],
                "precision": summary.get("precision", "fp32"),
                "matmul": summary.get("matmul", "native"),
                "attention": summary.get("attention"),
            }
            if run_cfg.optim.restart_per_link:  # ReLoRA's jagged schedule: a different method
                row["spec"]["restart_per_link"] = True
            row["spec"] |= link_kind(run_cfg)
            row["curve"] = curve(folder / "run" / "metrics.jsonl")
            row["knots"] = [
                {k: link.get(k) for k in ("link", "rank", "end_step", "knot_reason", "final_loss")}
                for link in summary["links"]
            ]
        t1 = time.perf_counter()
        row["val"] = self.score(model, task, val, length, precision) if val else {}
        row["test"] = self.score(model, task, test, length, precision)
        if c.forgetting:
            after = forgetting.measure(self, model, precision)
            row["forgetting"] = after | forgetting.change(after, forgetting.base_figures(self, precision))
        t2 = time.perf_counter()
        row["cost"] = cell_cost(summary, t0, t1, t2)
        if not c.keep_models:
            shutil.rmtree(folder / "run" / "merged", ignore_errors=True)
        return row

    def _train(self, cell: Cell, task: Task, splits: Splits, folder: Path):
        from lorachain.training.loop import train

        c = self.cfg
        classifier = c.model.task == "classification"
        if classifier and task.kind != "classification":
            raise ConfigError(
                f"tasks: {cell.task} is {task.kind}; a classifier model handles classification only"
            )
        n_labels = len(splits.train[0].candidates)
        run_cfg = run_config(c, cell, task, folder, n_labels)
        folder.mkdir(parents=True, exist_ok=True)
        rows = _rows(splits.train, classifier)
        write_text(folder / "train.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        if run_cfg.train.eval_every:  # a curve: the loop evaluates validation every eval_every steps
            val = _rows(splits.val, classifier)
            write_text(folder / "eval.jsonl", "".join(json.dumps(r) + "\n" for r in val))
            run_cfg.data.eval = str(folder / "eval.jsonl")
        model = self.fresh(cell.seed, n_labels)
        result = train(run_cfg, model=model, tokenizer=self.base()[1], progress=self.progress)
        if result.summary.get("status") != "finished":
            raise KeyboardInterrupt(f"cell {cell.id} interrupted")
        model = result.model if result.model is not None else self._rebuild(run_cfg, cell.seed, n_labels)
        return model, result.summary, run_cfg

    def fresh(self, seed: int, n_labels: int):
        """A copy of the base model; a classifier gets a new head of `n_labels`, seeded."""
        if self.cfg.model.task != "classification":
            return copy.deepcopy(self.base()[0])
        import torch

        from lorachain.models import load_model

        torch.manual_seed(seed)
        model = load_model(self.cfg.model, num_labels=n_labels)
        model.config.pad_token_id = self.base()[1].pad_token_id
        return model

    def _rebuild(self, run_cfg: RunConfig, seed: int, n_labels: int):
        """The trained model of a run that finished before its cell's result was written."""
        from lorachain.chain.export import load_chain
        from lorachain.chain.knot import apply_factors
        from lorachain.models import load_model

        run = Path(run_cfg.output_dir)
        if run_cfg.chain.method == "full":
            return load_model(
                run_cfg.model.__class__(name_or_path=str(run / "merged"), task=run_cfg.model.task)
            )
        model = self.fresh(seed, n_labels)
        knots, head, _ = load_chain(run / "chain.safetensors")
        for knot in knots:
            apply_factors(model, knot.factors)
        if head:
            model.load_state_dict(head, strict=False)
        return model


def same_precision(out: str | Path, method: str, requested: str, ran: set[str]) -> None:
    """Refuse to train a method's new cells in another precision than its finished cells: `auto`
    resolves per machine (bf16 only where the CPU or GPU runs it fast), so a grid moved to another
    machine would silently mix protocols."""
    here = resolve(requested, best_device()).name
    other = sorted(ran - {here})
    if other:
        raise ConfigError(
            f"{out}: the finished cells of methods.{method} trained in {other[0]}, but train.precision: "
            f"{requested} is {here} on this machine; set base.train.precision: {other[0]} to go on "
            "with the same protocol"
        )


def check_inputs(cfg: ExperimentConfig) -> None:
    """Fail on an unknown task, a bad task spec or a missing file, before any training."""
    for task in cfg.tasks:
        if get_task(task).memorise:
            get_task(task).load(cfg.paths.get(task, {}))
            continue
        for p in task_paths(cfg, task):
            if not p.is_file():
                raise ConfigError(f"paths.{task}: {p} not found")
    general = cfg.forgetting.get("general")
    if general and not Path(general).is_file():
        raise ConfigError(f"forgetting.general: {general} not found")
    if cfg.forgetting.get("task"):
        get_task(cfg.forgetting["task"])


def run_experiment(cfg: ExperimentConfig, progress: bool = True) -> dict:
    """Run every cell not yet done; write results.json and the report. Returns counts."""
    from tqdm import tqdm

    from lorachain.experiment.report import write_report

    ran = finished_precisions(cfg.output_dir)
    prepare(cfg, ran)
    check_inputs(cfg)
    runner = Runner(cfg, progress)
    cells = plan(cfg)
    for cell in cells:  # every method's RunConfig must build before the first cell runs
        if not cfg.methods[cell.method].get("baseline"):
            rc = run_config(cfg, cell, get_task(cell.task), Path(cfg.output_dir))
            same_precision(cfg.output_dir, cell.method, rc.train.precision, ran.get(cell.method, set()))
    computed = cached = busy = 0
    bar = tqdm(cells, desc="experiment", unit="cell", disable=not progress)
    for cell in bar:
        bar.set_postfix_str(cell.id)
        path = runner.out / "cells" / cell.id / "result.json"
        if path.is_file():
            cached += 1
            continue
        with cell_lock(path.parent) as mine:
            if not mine:  # another worker on this grid runs it
                busy += 1
                continue
            if not path.is_file():
                write_json(path, runner.run_cell(cell))
                computed += 1
    bar.close()
    results = collect(cfg.output_dir)
    write_json(Path(cfg.output_dir) / "results.json", results)
    write_report(results, Path(cfg.output_dir), tasks=cfg.tasks, methods=list(cfg.methods))
    counts = {"cells": len(cells), "computed": computed, "cached": cached}
    return counts | ({"busy": busy} if busy else {})
