"""Opening a sealed lockbox half (data/lockbox/, issue 43) for scoring, through its seal.

`lockbox.json` holds each half's file and SHA-256 and a log of openings. `open_half` refuses a
half whose bytes no longer match the seal, refuses half B until half A has been opened (B stays
unseen until A has failed once), and appends the opening (half, time, reason, command) to the log
atomically before any row is returned. Nothing is written when it refuses.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from lorachain.data import DataError, read_rows
from lorachain.io import write_text

SEAL = "lockbox.json"


class LockboxError(DataError):
    """A broken seal, an unknown half, or an opening the rules do not allow."""


def read_seal(folder: str | Path) -> dict:
    path = Path(folder) / SEAL
    if not path.is_file():
        raise LockboxError(f"{path}: no seal (build the lockbox with scripts/build_lockbox.py)")
    return json.loads(path.read_text())


def open_half(
    folder: str | Path, half: str, reason: str, command: str = "", after_a_failed: bool = False
) -> list[dict]:
    """The rows of lockbox half `half` (A or B), its opening logged in the seal first. Half B needs
    `after_a_failed` and an earlier opening of A."""
    folder = Path(folder)
    seal = read_seal(folder)
    entry = seal.get("halves", {}).get(half)
    if entry is None:
        raise LockboxError(f"{folder / SEAL}: no half {half!r}; halves: {sorted(seal.get('halves', {}))}")
    if not reason.strip():
        raise LockboxError(
            f"{folder / SEAL}: opening half {half} needs a reason (what changed in the defaults)"
        )
    if half == "B":
        if not after_a_failed:
            raise LockboxError(
                f"{folder / SEAL}: half B stays sealed until half A has failed once (after_a_failed)"
            )
        if not any(o.get("half") == "A" for o in seal.get("opened", [])):
            raise LockboxError(f"{folder / SEAL}: half B: half A was never opened, so it cannot have failed")
    path = folder / entry["file"]
    digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
    if digest != entry["sha256"]:
        raise LockboxError(
            f"{path}: sha256 {digest} does not match the seal's {entry['sha256']}; refusing to open"
        )
    rows = read_rows(str(path))
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    seal["opened"] = [
        *seal.get("opened", []),
        {"half": half, "at": stamp, "reason": reason, "command": command},
    ]
    write_text(folder / SEAL, json.dumps(seal, indent=2) + "\n")  # the builder's layout, keys in order
    return [row for _, row in rows]
