"""Every row's numbers under every adapter, computed once and kept on disk (issue 43).

For held-out rows labelled by task and each adapter of a store (every task adapter, the mixed
adapter, and the base with adapters off): the reference answer's log-likelihood (`ref`, one
teacher-forced batched pass per adapter), the instruction's log-likelihood (`instr`, what the
likelihood gate reads) and, only where asked, a greedy answer (`answer`). Any way of choosing an
adapter per row (routed, mixed, oracle, base, a gate at any margin) is then scored by lookup.

One JSON file per adapter in the cache folder, keyed by a hash of the row; rewritten atomically
after every batch, so an interrupted fill resumes where it stopped. Each file records the
adapter's weight hashes and the base fingerprint: a cache made with other weights, or answers made
with another `max_new_tokens`, is refused, never mixed in.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from lorachain.data import DataError, encode_row
from lorachain.io import write_json
from lorachain.routing.eval.store import BASE, batched, using
from lorachain.routing.gate import instruction_logprobs
from lorachain.store import MIXED
from lorachain.training.evaluate import sequence_logprobs

FIELDS = ("ref", "instr", "answer")


class CacheError(DataError):
    """A cache file that does not belong to this store or these settings."""


def row_key(row: dict) -> str:
    """A stable hash of what a row asks and expects (instruction or conversation, and output)."""
    what = {k: row.get(k) for k in ("instruction", "messages", "output")}
    return hashlib.sha256(json.dumps(what, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:20]


def identity(router, adapter: str) -> dict:
    """What an adapter's cached numbers depend on: its weight files and the base model."""
    entry = router.manifest.adapters.get(adapter) or {}
    return {
        "adapter": adapter,
        "files": entry.get("files", {}),
        "base": router.manifest.base_model.get("fingerprint"),
    }


def _file(folder: Path, adapter: str) -> Path:
    return folder / f"{'base' if adapter == BASE else adapter.strip('_')}.json"


class AnswerCache:
    """The cache folder of one store: `get(field, adapter, row)`, filled by `fill`."""

    def __init__(self, folder: str | Path, router, max_new_tokens: int = 32, batch: int = 8) -> None:
        self.folder, self.router = Path(folder), router
        self.max_new_tokens, self.batch = max_new_tokens, batch
        self.data: dict[str, dict] = {}
        self.computed = 0  # (adapter, row, field) entries computed by this object (not read back)

    def _load(self, adapter: str) -> dict:
        if adapter in self.data:
            return self.data[adapter]
        path, want = _file(self.folder, adapter), identity(self.router, adapter)
        got = {"identity": want, "max_new_tokens": self.max_new_tokens, **{f: {} for f in FIELDS}}
        if path.is_file():
            try:
                got = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise CacheError(f"{path}: not a cache file ({e})") from None
            if got.get("identity") != want:
                raise CacheError(
                    f"{path}: made with other weights of {adapter!r}; delete it or use another cache"
                )
            if got["answer"] and got.get("max_new_tokens") != self.max_new_tokens:
                raise CacheError(
                    f"{path}: answers made with max_new_tokens={got.get('max_new_tokens')}, "
                    f"not {self.max_new_tokens}; use another cache"
                )
            got["max_new_tokens"] = self.max_new_tokens
        self.data[adapter] = got
        return got

    def _save(self, adapter: str) -> None:
        write_json(_file(self.folder, adapter), self.data[adapter])

    def has(self, field: str, adapter: str, row: dict) -> bool:
        return row_key(row) in self._load(adapter)[field]

    def get(self, field: str, adapter: str, row: dict):
        """The cached value; a missing one is an error naming the row (fill first)."""
        d = self._load(adapter)[field]
        key = row_key(row)
        if key not in d:
            raise KeyError(f"no cached {field} of adapter {adapter!r} for row {key} (fill the cache first)")
        value = d[key]
        return tuple(value) if field != "answer" else value

    def fill(self, rows: list[dict], adapters: list[str], field: str) -> None:
        """Compute `field` for every (row, adapter) pair not cached yet; saved after each batch."""
        if field not in FIELDS:
            raise ValueError(f"field: expected one of {FIELDS}, got {field!r}")
        for adapter in dict.fromkeys(adapters):
            self.fill_pairs([(r, adapter) for r in rows], field)

    def fill_pairs(self, pairs: list[tuple[dict, str]], field: str) -> None:
        """Compute `field` for the given (row, adapter) pairs that are not cached yet."""
        for adapter in dict.fromkeys(a for _, a in pairs):
            store = self._load(adapter)[field]
            todo = list(
                {row_key(r): r for r, a in pairs if a == adapter and row_key(r) not in store}.values()
            )
            for chunk in batched(todo, self.batch):
                store.update(zip(map(row_key, chunk), self._compute(field, adapter, chunk), strict=True))
                self.computed += len(chunk)
                self._save(adapter)

    def _compute(self, field: str, adapter: str, rows: list[dict]) -> list:
        r = self.router
        asks = [row.get("messages", [])[:-1] or row["instruction"] for row in rows]
        with using(r, adapter):
            if field == "instr":
                return [list(x) for x in instruction_logprobs(r, asks, None, self.batch)]
            if field == "ref":
                seqs = [
                    encode_row(r.answer_cfg, r.tok, row, "held-out row", classifier=False) for row in rows
                ]
                return [list(x) for x in sequence_logprobs(r.model, seqs, r.tok.pad_token_id, self.batch)]
            name = MIXED if adapter == BASE else adapter  # with the adapters disabled it changes nothing
            return [a.answer for a in r.ask(asks, adapter=name, max_new_tokens=self.max_new_tokens)]
