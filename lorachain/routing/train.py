"""`lorachain route train`: one adapter per task, the task-selection adapter and the mixed-task
adapter, each trained by the one training loop (so each may be a COLA chain) on one base model,
adapter by adapter, resumable; the result is an adapter store."""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from lorachain.config import ConfigError
from lorachain.data import DataError
from lorachain.io import atomic_dir, write_text
from lorachain.models import load_tokenizer, resolve_path
from lorachain.routing.config import RouteConfig
from lorachain.routing.data import InstructionRow, read_instruction_rows, stratified_split
from lorachain.routing.gate import gate_entry
from lorachain.routing.other import (
    OTHER,
    SELECTOR_SPLITS,
    held_back_datasets,
    needs_own_splits,
    record,
    selector_labels,
    selector_splits,
)
from lorachain.routing.runs import adapter_runs, chat_templates
from lorachain.routing.second_opinion import fit_second_opinion
from lorachain.routing.selectors import get_kind
from lorachain.store import (
    CHAT_FORMAT,
    SELECTOR,
    TEXT_FORMAT,
    Manifest,
    file_hashes,
    fingerprint,
    safe_name,
    write_manifest,
)
from lorachain.training.loop import train
from lorachain.training.parallel import init_dist
from lorachain.training.setup import load_base


def row_dict(r: InstructionRow) -> dict:
    """A row as the store's split files (and `route eval`) keep it."""
    return (
        {"instruction": r.instruction, "output": r.output, "task": r.task, "line": r.line}
        | ({"messages": r.messages} if r.messages is not None else {})
        | ({"dataset": r.dataset} if r.dataset else {})
    )


def write_rows(path: Path, rows: list[InstructionRow]) -> Path:
    return write_text(path, "".join(json.dumps(row_dict(r)) + "\n" for r in rows))


def is_chat(cfg: RouteConfig) -> bool:
    """Whether the store is trained on conversations (`data.format`, or detected from row 1)."""
    d = cfg.data
    if d.format != "auto":
        return d.format == "chat"
    from lorachain.data import read_rows
    from lorachain.data.chat import messages_field

    rows = read_rows(d.path)
    return bool(rows) and messages_field(rows[0][1], d.messages_field) is not None


def read_rows_of(cfg: RouteConfig, rejected: list[str] | None = None) -> list[InstructionRow]:
    """Every row of `data.path`, chat or text, read with the config's field names."""
    d = cfg.data
    if is_chat(cfg):
        from lorachain.routing.data import read_chat_rows

        skip = rejected if d.on_bad_rows == "skip" else None
        return read_chat_rows(d.path, d.task_field, d.messages_field, d.selector_input, skip, d.dataset_field)
    return _text_rows(cfg, rejected)


def load_split(cfg: RouteConfig, rejected: list[str] | None = None) -> dict[str, list[InstructionRow]]:
    d = cfg.data
    rows = read_rows_of(cfg, rejected)
    if d.tasks:
        rows = [r for r in rows if r.task in set(d.tasks)]
    rows = exclude_datasets(rows, d.exclude_datasets, d.path)
    return stratified_split(rows, tuple(d.split), d.seed, d.max_per_task, d.balance, d.max_per_dataset)


def exclude_datasets(rows: list[InstructionRow], names: list[str], path: str) -> list[InstructionRow]:
    """The rows of no data set in `names`; a name no row has is an error (a typo would otherwise
    leave the data set in, and the 'unseen' score would be in-distribution)."""
    if not names:
        return rows
    present = {r.dataset for r in rows}
    missing = [n for n in names if n not in present]
    if missing:
        raise DataError(
            f"{path}: data.exclude_datasets: no row has data set {missing[0]!r} (field "
            f"data.dataset_field); known: {sorted(present)[:12]}"
        )
    kept = [r for r in rows if r.dataset not in set(names)]
    if not kept:
        raise DataError(f"{path}: data.exclude_datasets leaves no rows")
    return kept


def _text_rows(cfg: RouteConfig, rejected: list[str] | None) -> list[InstructionRow]:
    d = cfg.data
    return read_instruction_rows(
        d.path,
        d.instruction_field,
        d.output_field,
        d.task_field,
        d.input_field,
        rejected if d.on_bad_rows == "skip" else None,
        d.dataset_field,
    )


def write_selector_splits(cfg: RouteConfig, root: Path, split: dict, labels: list[str]) -> tuple:
    """With `selector.other_datasets` or `selector.augment`: the selector's own splits
    (`routing.other`), written under STORE/splits/selector/; (its labels, the manifest's record of
    them, the data sets held back from the task adapters). Without: (labels, {}, [])."""
    sel, d = cfg.selector, cfg.data
    if not needs_own_splits(sel):
        return labels, {}, []
    if OTHER in labels and sel.other_datasets:
        raise DataError(f"{d.path}: selector.other_datasets: the data already has a task named {OTHER!r}")
    every = [r for part in split.values() for r in part]
    held = held_back_datasets(every, sel.other_datasets, d.seed, d.path)
    foreign = foreign_rows(cfg) if sel.other_datasets else []
    parts, added = selector_splits(split, held, sel, d.seed, foreign)
    for part, rows in parts.items():
        write_rows(root.joinpath(*SELECTOR_SPLITS, f"{part}.jsonl"), rows)
    return (
        selector_labels(labels, parts),
        record(parts, added, held, sel, sorted({r.task for r in foreign})),
        held,
    )


def foreign_rows(cfg: RouteConfig) -> list[InstructionRow]:
    """Rows of the file's task types outside `data.tasks` (none when it is unset), but never of
    `data.exclude_datasets`, balanced like the store's rows: `other` rows for the selector."""
    d = cfg.data
    if not d.tasks:
        return []
    rows = [r for r in read_rows_of(cfg, []) if r.task not in set(d.tasks)]
    rows = [r for r in rows if r.dataset not in set(d.exclude_datasets)]
    from lorachain.routing.balance import balance_rows

    return balance_rows(rows, d.balance, d.max_per_task, d.max_per_dataset, d.seed) if rows else []


def write_splits(
    cfg: RouteConfig, root: Path, split: dict, labels: list[str], rejected: list[str], held: list[str] = ()
) -> None:
    """The store's split files; rows of `held` data sets (`selector.other_datasets`) are left out of
    the task adapters' files (`by_task/`), not of the mixed adapter's."""
    if rejected:
        write_text(root / "splits" / "rejected.txt", "".join(f"{x}\n" for x in rejected))
        print(
            f"[lorachain] skipped {len(rejected)} bad rows (first: {rejected[0]}); all listed in "
            f"{root / 'splits' / 'rejected.txt'}",
            file=sys.stderr,
        )
    for part, rows in split.items():
        write_rows(root / "splits" / f"{part}.jsonl", rows)
        for label in labels:
            mine = [r for r in rows if r.task == label and r.dataset not in set(held)]
            write_rows(root / "splits" / "by_task" / f"{safe_name(label)}.{part}.jsonl", mine)
    write_text(root / "route_config.json", cfg.to_json() + "\n")


def route_train(cfg: RouteConfig, model=None, tokenizer=None, progress: bool = True) -> Manifest | None:
    """Train every adapter of the store in `cfg.output_dir`; None if interrupted (rerun resumes)."""
    root = Path(cfg.output_dir)
    if root.exists() and not root.is_dir():
        raise ConfigError(f"output_dir: {root} is an existing file, not a folder")
    dist = init_dist()
    rejected: list[str] = []
    chat = is_chat(cfg)
    split = load_split(cfg, rejected)
    labels = sorted({r.task for r in split["train"]})
    names = [safe_name(label) for label in labels]
    if len(set(names)) != len(names):
        raise ValueError(f"task labels {labels} give clashing folder names {names}")
    sel_labels, sel_record, held = labels, {}, []
    if dist.main:
        sel_labels, sel_record, held = write_selector_splits(cfg, root, split, labels)
        write_splits(cfg, root, split, labels, rejected, held)
    dist.barrier()  # the other ranks read the split files rank 0 wrote
    tokenizer = tokenizer or load_tokenizer(resolve_path(cfg.model))
    model = model if model is not None else load_base(cfg.model)
    pristine = {n: p.detach().clone() for n, p in model.state_dict().items()}
    manifest = Manifest(
        base_model={
            "name_or_path": cfg.model.name_or_path,
            "gguf_file": cfg.model.gguf_file,
            "dtype": cfg.model.dtype,
            "fingerprint": fingerprint(model),
        },
        labels=labels,
        templates={"prompt": cfg.prompt, "task_prompt": cfg.task_prompt, "max_length": cfg.data.max_length}
        | (chat_templates(cfg) if chat else {}),
        format=CHAT_FORMAT if chat else TEXT_FORMAT,  # an older lorachain refuses a chat store
        complete=False,  # until the last adapter is in: `ask` and `serve` refuse it meanwhile
        selector={"kind": cfg.selector.kind},
    )
    if dist.main:
        write_manifest(root, manifest)
    runs = adapter_runs(cfg, root, labels, chat)
    selector = get_kind(cfg.selector.kind)
    if selector.fit is not None:  # this kind is not a LoRA on the base: fitted after the adapters
        runs.pop(SELECTOR)
    for name, (kind, run_cfg) in runs.items():
        result = train(run_cfg, model, tokenizer, progress=progress)
        if result.summary.get("status") == "interrupted":
            return None  # (the model is still wrapped by this adapter; a rerun loads it afresh)
        with torch.no_grad():
            model.load_state_dict(pristine)  # every adapter starts from the same base
        if not dist.main:
            continue  # rank 0 writes the store
        folder = Path("adapters") / name
        atomic_dir(root / folder, lambda tmp, src=Path(run_cfg.output_dir) / "adapter": _copy(src, tmp))
        s = result.summary
        manifest.adapters[name] = {
            "path": str(folder),
            "kind": kind,
            "task": labels[names.index(name)] if kind == "task" else None,
            "files": file_hashes(root / folder, root),
            "summary": {
                "links": [
                    {k: link.get(k) for k in ("rank", "steps", "final_loss", "eval")} for link in s["links"]
                ],
                "train_examples": s["train_examples"],
                "total_steps": s["total_steps"],
                "wall_seconds": s["wall_seconds"],
                "chain": asdict(run_cfg.chain),
            },
        }
        write_manifest(root, manifest)
    if selector.fit is not None and dist.main:  # (rank 0 only: the selector is small)
        manifest.selector = _fit_selector(cfg, root, sel_labels, (model, tokenizer), pristine, progress)
        if not manifest.selector:
            return None  # interrupted; a rerun resumes
        manifest.selector |= sel_record
    manifest.selector = manifest.selector | gate_entry(cfg.selector.gate, cfg.selector.gate_margin)
    manifest.complete = True
    if dist.main:
        write_manifest(root, manifest)
    return manifest


def _fit_selector(cfg: RouteConfig, root: Path, labels: list[str], base, pristine, progress) -> dict:
    """The selector's manifest entry (and its second opinion's); {} if interrupted. The base
    model's weights are restored after each fit."""
    model, tokenizer = base
    entry = get_kind(cfg.selector.kind).fit(cfg, root, labels, model, tokenizer, progress)
    with torch.no_grad():
        model.load_state_dict(pristine)
    if entry and cfg.selector.second_opinion:
        entry = fit_second_opinion(cfg, root, labels, entry, model, tokenizer, progress)
        with torch.no_grad():
            model.load_state_dict(pristine)
    return entry


def _copy(src: Path, dst: Path) -> None:
    for path in src.iterdir():
        shutil.copy2(path, dst / path.name)
