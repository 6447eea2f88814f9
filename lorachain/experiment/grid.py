"""An experiment folder: its grid definition (`experiment.json`), the lock of each cell that a
worker runs, and the finished cells. Several workers may share one folder."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from lorachain.config import ConfigError, as_current
from lorachain.experiment.config import ExperimentConfig
from lorachain.io import write_text


def lock_holder(lock: Path) -> int | None:
    """The pid in a cell's lock while that process is alive (0: the lock is still being written);
    None when there is no lock or its process is gone."""
    try:
        pid = int(lock.read_text() or 0)
        os.kill(pid, 0)
        return pid
    except (ValueError, ProcessLookupError, FileNotFoundError):
        return None


@contextlib.contextmanager
def cell_lock(folder: Path):
    """Yield True if this process holds the cell's lock (workers on one grid share the cells).
    A lock whose process is gone is taken over, so a killed worker's cell is resumed."""
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / "cell.lock"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            pid = lock_holder(lock)
            if pid is not None and pid != os.getpid():
                yield False
                return
            lock.unlink(missing_ok=True)  # stale: its process is gone
            continue
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        try:
            yield True
        finally:
            lock.unlink(missing_ok=True)
        return
    yield False


def prepare(cfg: ExperimentConfig, ran: dict[str, set[str]]) -> None:
    """Write experiment.json, or check that the folder holds the same grid definition; `ran` is
    `finished_precisions` of the folder."""
    out = Path(cfg.output_dir)
    path = out / "experiment.json"
    new = json.loads(cfg.to_json())
    new.pop("lorachain_version")
    if path.is_file():
        old = json.loads(path.read_text())
        old = as_current(ExperimentConfig, old)  # fields added since: their defaults
        old.pop("lorachain_version", None)
        old = _pin_auto(old, new, ran)
        # the grid may grow (tasks, methods, seeds, lrs); what a finished cell means may not change
        fixed = ("model", "base", "n_train", "n_val", "n_test", "max_length", "icl_k", "max_new_tokens")
        fixed += ("forgetting",)
        changed = [k for k in fixed if old.get(k) != new.get(k)]
        changed += [
            f"methods.{m}"
            for m in old["methods"]
            if m in new["methods"] and _meaning(old["methods"][m]) != _meaning(new["methods"][m])
        ]
        if changed:
            raise ConfigError(
                f"{out}: holds an experiment with another {', '.join(changed)}; choose another output_dir"
            )
    write_text(path, cfg.to_json() + "\n")


def _pin_auto(old: dict, new: dict, ran: dict[str, set[str]]) -> dict:
    """`old` with its base `train.precision: auto` read as the precision the new definition pins,
    when every finished cell ran in that one: pinning what `auto` resolved to changes no cell."""
    before = old.get("base", {}).get("train", {}).get("precision")
    after = new.get("base", {}).get("train", {}).get("precision")
    if before != "auto" or after in (None, "auto") or set().union(*ran.values(), {after}) != {after}:
        return old
    pinned = json.loads(json.dumps(old))
    pinned["base"]["train"]["precision"] = after
    return pinned


def finished_precisions(output_dir: str | Path) -> dict[str, set[str]]:
    """Each method's precisions (resolved: fp32, bf16 or fp16) that its finished cells trained in."""
    ran: dict[str, set[str]] = {}
    for r in collect(output_dir):
        if r.get("spec", {}).get("precision"):
            ran.setdefault(r["method"], set()).add(r["spec"]["precision"])
    return ran


def _meaning(method: dict) -> dict:
    """A method's settings without its lrs and seeds: those are part of the cell id and may grow."""
    return {k: v for k, v in method.items() if k not in ("lrs", "seeds")}


def collect(output_dir: str | Path) -> list[dict]:
    """Every finished cell's result under `output_dir`, in a stable order."""
    paths = sorted(Path(output_dir).glob("cells/**/result.json"))
    return [json.loads(p.read_text()) for p in paths]
