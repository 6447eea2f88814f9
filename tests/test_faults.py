"""Fault injection: SIGKILL `lorachain train` at random moments and resume; the result is the
unkilled run's, bit for bit (a small version of benchmarks/kill_anywhere.py)."""

from __future__ import annotations

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import kill_anywhere  # noqa: E402


def test_sigkill_at_random_moments_then_resume_equals_unkilled(tmp_path):
    import shutil
    import time

    ref_cfg, cfg = kill_anywhere.setup(tmp_path)
    t0 = time.perf_counter()
    assert kill_anywhere.run(ref_cfg, None) == 0
    duration = time.perf_counter() - t0
    rng = random.Random(7)
    kills = 0
    while kills == 0:  # until at least one kill landed before the run could finish
        shutil.rmtree(tmp_path / "killed", ignore_errors=True)
        while not (tmp_path / "killed" / "summary.json").is_file():
            delay = rng.uniform(0.5, 0.95) * duration if kills < 3 else None
            kills += kill_anywhere.run(cfg, delay) == -9
    assert kill_anywhere.compare(tmp_path / "ref", tmp_path / "killed") == []
