"""`lorachain route add STORE TASK ADAPTER_DIR DATA`: a new task in a store whose selector is
`embedding`, without retraining anything: the task's adapter is copied in (sha256 in the
manifest) and its instructions' embeddings become one more centroid. A calibrated store's
temperature and routing threshold are fitted again on its held-out data sets, now scored against
every centroid including the new one (its own rows form one data set, so they are never held out)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lorachain.config import ConfigError
from lorachain.data import DataError, read_rows
from lorachain.io import atomic_dir, atomic_write
from lorachain.routing.calibrate import class_gaussian
from lorachain.routing.confidence import fit_calibration
from lorachain.routing.encoders import embed, load_encoder
from lorachain.routing.other import selector_splits_dir
from lorachain.routing.prototypes import prototype_index, stored_prototypes
from lorachain.routing.selectors import entry_for, read_split
from lorachain.store import (
    Manifest,
    StoreError,
    check_complete,
    file_hashes,
    fingerprint,
    read_manifest,
    safe_name,
    verify_selector,
    write_manifest,
)


def adapter_folder(path: str | Path) -> Path:
    """A PEFT adapter folder, or a lorachain run folder holding one in `adapter/`."""
    p = Path(path)
    for folder in (p, p / "adapter"):
        if (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file():
            return folder
    raise ConfigError(f"{p}: not a PEFT adapter folder (adapter_config.json and adapter_model.safetensors)")


def instructions_of(path: str | Path, field: str, input_field: str | None) -> list[str]:
    texts = []
    for line, row in read_rows(path):
        if row.get(field) in (None, ""):
            raise DataError(f"{path}: line {line}: missing or empty field {field!r}")
        text = str(row[field])
        if input_field and row.get(input_field):
            text = f"{text}\n{row[input_field]}"
        texts.append(text)
    if not texts:
        raise DataError(f"{path}: no rows")
    return texts


def add_task(
    store: str | Path,
    task: str,
    adapter_dir: str | Path,
    data: str | Path,
    field: str = "instruction",
    input_field: str | None = None,
) -> Manifest:
    """Add `task` to an embedding-selector store; returns the updated manifest."""
    root = Path(store)
    manifest = read_manifest(root)
    check_complete(root, manifest)
    entry = manifest.selector
    if entry.get("kind") != "embedding":
        raise StoreError(
            f"{root / 'manifest.json'}: route add needs an `embedding` selector; this store's is "
            f"{entry.get('kind')!r} (train it with selector.kind=embedding)"
        )
    if entry.get("second_opinion"):
        raise StoreError(
            f"{root / 'manifest.json'}: route add cannot extend a store with a second opinion "
            f"({entry['second_opinion'].get('kind')!r}); retrain it with the new task"
        )
    name = safe_name(task)
    if task in manifest.labels or name in manifest.adapters:
        raise ConfigError(f"task {task!r}: already in {root} (adapter {name!r})")
    source = adapter_folder(adapter_dir)
    texts = instructions_of(data, field, input_field)
    folder = verify_selector(root, manifest)
    enc, tok = load_encoder(entry["encoder"])
    if entry.get("encoder_fingerprint") and fingerprint(enc) != entry["encoder_fingerprint"]:
        raise StoreError(f"{folder}: encoder {entry['encoder']!r} has other weights than the one used to fit")
    vecs = embed(enc, tok, texts, entry["max_length"], entry.get("truncation", "head"))  # (N, D)
    sums, counts = vecs.sum(0, keepdim=True), torch.tensor([float(len(vecs))])  # one more prototype
    old = stored_prototypes(load_file(str(folder / "centroids.safetensors")), len(entry["labels"]))
    owner, described = old["owner"], old["described"]
    new = {"sums": torch.cat([old["sums"], sums]), "counts": torch.cat([old["counts"], counts])}  # (P+1, D)
    new["owner"] = torch.cat([owner, torch.tensor([len(entry["labels"])])])  # the new task's index
    new["described"] = torch.cat([described, torch.zeros(1, dtype=torch.uint8)])
    keep = {k: v for k, v in entry.items() if k not in ("kind", "path", "files")}
    if entry.get("calibration"):
        fixed = (old["sums"][described == 1], owner[described == 1]) if described.any() else None
        keep["calibration"], precision = recalibrate(root, entry, enc, tok, task, vecs, fixed)
        if precision is not None:
            new["precision"] = precision
    atomic_dir(root / "adapters" / name, lambda tmp: _copy(source, tmp))
    atomic_write(folder / "centroids.safetensors", lambda tmp: save_file(new, str(tmp)))
    manifest.selector = entry_for(root, "embedding", **(keep | {"labels": [*entry["labels"], task]}))
    manifest.labels = sorted([*manifest.labels, task])
    manifest.adapters[name] = {
        "path": f"adapters/{name}",
        "kind": "task",
        "task": task,
        "files": file_hashes(root / "adapters" / name, root),
        "summary": {"added_from": str(source), "instructions": len(texts)},
    }
    write_manifest(root, manifest)
    return manifest


def recalibrate(root: Path, entry: dict, enc, tok, task: str, vecs: torch.Tensor, fixed=None):
    """The calibration of `entry` fitted again with `task`'s rows (`vecs`, one data set) added to
    the store's training rows (`fixed`: its description prototypes, kept in every fold); and the
    Mahalanobis precision matrix, if its score needs one."""
    rows = read_split(root, "train", selector_splits_dir(root))  # `other` rows included, if any
    labels = [*entry["labels"], task]
    texts = [r["instruction"] for r in rows]
    mine = embed(enc, tok, texts, entry["max_length"], entry.get("truncation", "head"))  # (N, D)
    every = torch.cat([mine, vecs])
    index = torch.tensor([labels.index(r["task"]) for r in rows] + [len(labels) - 1] * len(vecs))
    groups = [r.get("dataset", "") for r in rows] + [f"{task} (route add)"] * len(vecs)
    old = entry["calibration"]
    score, target = old["score"], old["target_precision"]
    tasks = [r["task"] for r in rows] + [task] * len(vecs)
    protos = prototype_index(tasks, groups, labels, entry.get("prototypes", "task"))
    fitted = fit_calibration(
        every, index, groups, len(labels), entry["temperature"], score, target, protos, fixed
    )
    needs = fitted is not None and score == "mahalanobis"
    return fitted, class_gaussian(every, index, len(labels))[1] if needs else None


def _copy(src: Path, dst: Path) -> None:
    for path in src.iterdir():
        if path.is_file():
            shutil.copy2(path, dst / path.name)
