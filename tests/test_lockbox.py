"""The routing lockbox (data/lockbox, scripts/build_lockbox.py): sealed, rebuilt byte for byte from
shared/data, outside the T0 mixture, at least 50 rows per covered task type."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LOCKBOX = ROOT / "data" / "lockbox"
DATA = ROOT.parent / "shared" / "data"


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (LOCKBOX / name).read_text().splitlines()]


def test_the_seal_matches_the_halves():
    seal = json.loads((LOCKBOX / "lockbox.json").read_text())
    for half in seal["halves"].values():
        body = (LOCKBOX / half["file"]).read_bytes()
        assert hashlib.sha256(body).hexdigest() == half["sha256"]
        assert len(body.decode().splitlines()) == half["rows"]
    a, b = _rows("half_a.jsonl"), _rows("half_b.jsonl")
    assert not {r["instruction"] for r in a} & {r["instruction"] for r in b}  # disjoint halves
    per_type = Counter(r["task"] for r in a + b)
    assert all(per_type[t] >= 50 for t in seal["covered"]) and per_type["other"] >= 50
    assert set(seal["covered"]) == {"sentiment", "extractive_qa", "multiple_choice_qa"}
    assert {r["dataset"] for r in a} == {r["dataset"] for r in b}  # both halves see every source


@pytest.mark.skipif(not DATA.is_dir(), reason="needs ../shared/data")
def test_the_builder_rebuilds_the_committed_lockbox(tmp_path):
    out = tmp_path / "lockbox"
    cmd = [sys.executable, str(ROOT / "scripts" / "build_lockbox.py"), "--data", str(DATA), "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    for name in ("half_a.jsonl", "half_b.jsonl"):
        assert (out / name).read_bytes() == (LOCKBOX / name).read_bytes()
    mixture = {json.loads(line)["dataset"] for line in (DATA / "instructions/t0_mixture.jsonl").open()}
    assert not {r["dataset"] for r in _rows("half_a.jsonl")} & mixture
