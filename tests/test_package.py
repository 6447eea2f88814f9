"""Process-wide defaults that importing lorachain sets."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")

# A 64 MiB tensor allocated after `import lorachain`: how much of its mapping sits on huge pages (kB).
PROBE = """
import lorachain, torch
x = torch.empty(64 * 1024 * 1024 // 4); x.fill_(1.0)
addr, inside = x.data_ptr(), False
for line in open("/proc/self/smaps"):
    head = line.split()
    if "-" in head[0] and len(head) >= 5:
        lo, hi = (int(v, 16) for v in head[0].split("-"))
        inside = lo <= addr < hi
    elif inside and head[0] == "AnonHugePages:":
        print(head[1])
"""


def huge_kb(env: dict) -> int:
    full = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"} | env
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=full)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.split()[0])


@pytest.mark.skipif(
    not THP.exists() or "[never]" in THP.read_text(), reason="the kernel has no transparent huge pages"
)
def test_importing_lorachain_puts_large_tensors_on_huge_pages_unless_turned_off():
    assert huge_kb({}) >= 60 * 1024  # nearly all of the 64 MiB
    assert huge_kb({"THP_MEM_ALLOC_ENABLE": "0"}) == 0
