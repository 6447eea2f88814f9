"""`selector.evidence`: route to a task adapter only where the store has evidence that it answers
its own task type better than the mixed adapter does (issue 43, "do no harm").

`validation`: every task adapter and the mixed adapter score the reference answers of the store's
validation rows of that adapter's task type (one teacher-forced pass each, kept in the store's
answer cache, `routing.eval.answers`). Per type, the gain is the task adapter's log-likelihood of
the reference minus the mixed adapter's, in nats per reference token, with a 95% paired bootstrap
interval over the rows. The task adapter may answer only when the interval's lower bound is above
0; otherwise an instruction routed to it is answered by the mixed adapter. Unlike the likelihood
gate (`routing.gate`) this costs nothing per request: it is measured once, when the store is built
(`lorachain route train`), or for an existing store by `lorachain route evidence STORE`.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from lorachain.data import DataError, read_rows
from lorachain.metrics import paired_bootstrap
from lorachain.routing.eval.answers import AnswerCache
from lorachain.routing.gate import gain
from lorachain.store import MIXED, read_manifest, write_manifest


def measure(router, rows: list[dict], cache_dir: str | Path) -> dict[str, dict]:
    """Per task type of `rows` that has a task adapter: the gain over mixed ({n, mean, low, high},
    nats per reference token) and whether the adapter may answer (`routes`: low > 0)."""
    by: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        if r["task"] in router.adapters:
            by[r["task"]].append(r)
    cache = AnswerCache(cache_dir, router)
    out = {}
    for task, got in sorted(by.items()):
        name = router.adapters[task]
        cache.fill(got, [name, MIXED], "ref")
        b = paired_bootstrap([gain(cache.get("ref", name, r), cache.get("ref", MIXED, r)) for r in got])
        out[task] = b | {"adapter": name, "routes": b["low"] > 0}
    return out


def entry(per_task: dict[str, dict], split: str = "val") -> dict:
    """The manifest's `selector.evidence` entry: the measurement, and the adapters that may answer."""
    routes = sorted(p["adapter"] for p in per_task.values() if p["routes"])
    return {"evidence": {"kind": "validation", "split": split, "per_task": per_task, "routes": routes}}


def add_evidence(store: str | Path, router, split: str = "val") -> dict:
    """Measure a store's evidence on its `split` rows (store/splits/<split>.jsonl) and write it into
    its manifest; returns the entry. `router`: a Router open on the store, without evidence."""
    store = Path(store)
    path = store / "splits" / f"{split}.jsonl"
    if not path.exists():
        raise DataError(f"{path}: no {split} split in this store (evidence is measured on it)")
    rows = [r for _, r in read_rows(path)]
    got = entry(measure(router, rows, store / "answers"), split)
    manifest = read_manifest(store)
    manifest.selector = {k: v for k, v in manifest.selector.items() if k != "evidence"} | got
    write_manifest(store, manifest)
    return got["evidence"]


def evidence_choices(chosen: list[str], routes: set[str]) -> list[str]:
    """Routed choices (adapter names) with every adapter lacking evidence sent to the mixed one."""
    return [a if a == MIXED or a in routes else MIXED for a in chosen]
