"""Worker processes never outlive the command that started them; a clean run prints no warnings."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest

PARENT = textwrap.dedent(
    """
    import os, sys, time
    sys.path.insert(0, {here!r})
    from helper import work
    from lorachain.demo import run_in_child, sigterm_as_interrupt
    print(run_in_child(work, 0), flush=True)  # a clean round trip first
    try:
        with sigterm_as_interrupt():
            run_in_child(work, 600)
    except KeyboardInterrupt:
        sys.exit(130)
    """
)
HELPER = textwrap.dedent(
    """
    import os, time
    from pathlib import Path
    def work(seconds):
        Path(os.environ["PIDFILE"]).write_text(str(os.getpid()))
        time.sleep(seconds)
        return "child ok"
    """
)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is gone for our purposes
        return f.read().split(")")[-1].split()[0] != "Z"


def start(tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    (tmp_path / "helper.py").write_text(HELPER)
    pidfile = tmp_path / "child.pid"
    env = {**os.environ, "PIDFILE": str(pidfile)}
    proc = subprocess.Popen(
        [sys.executable, "-c", PARENT.format(here=str(tmp_path))],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "child ok"
    deadline = time.time() + 60
    first = pidfile.read_text()
    while time.time() < deadline and pidfile.read_text() == first:  # the long child has started
        time.sleep(0.1)
    return proc, pidfile


def wait_gone(pid: int, seconds: float = 20) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_children_die_with_their_parent(tmp_path, sig):
    proc, pidfile = start(tmp_path)
    child = int(pidfile.read_text())
    assert alive(child)
    proc.send_signal(sig)
    code = proc.wait(timeout=60)
    assert code == (130 if sig == signal.SIGTERM else -signal.SIGKILL)
    assert wait_gone(child), f"child {child} outlived its parent"
    if sig == signal.SIGTERM:
        err = proc.stderr.read()
        assert "resource_tracker" not in err and "leaked" not in err, err


def test_plot_of_an_underscore_run_has_a_legend_and_no_warning(tmp_path):
    import json

    from lorachain.training.plots import plot_runs

    run = tmp_path / "_selector"
    run.mkdir()
    (run / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": i, "loss": 1 / i}) + "\n" for i in range(1, 5))
    )
    (run / "summary.json").write_text(
        json.dumps({"links": [{"end_step": 4}], "final_eval": {"accuracy": 0.5}})
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plot_runs({"_selector": run}, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").stat().st_size > 1000


SEMAPHORE_PARENT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {here!r})
    from bar_helper import work
    from lorachain.demo import run_in_child
    if __name__ == "__main__":
        print([run_in_child(work, i) for i in range(3)], flush=True)
    """
)
BAR_HELPER = textwrap.dedent(
    """
    def work(i):
        from tqdm import tqdm  # its progress bar lock is a multiprocessing semaphore
        for _ in tqdm(range(3)):
            pass
        import torch  # noqa: F401  (a real worker's slower exit)
        return i
    """
)


def test_the_demo_workers_leave_no_semaphore_behind(tmp_path):
    """The demo's worker path (`run_in_child`, as the demo calls it three times): the children
    exit by themselves once they answered, so the resource tracker finds nothing to warn about.
    Before, they were terminated right after answering and left tqdm's lock registered."""
    (tmp_path / "bar_helper.py").write_text(BAR_HELPER)
    script = tmp_path / "parent.py"
    script.write_text(SEMAPHORE_PARENT.format(here=str(tmp_path)))
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=240, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[0, 1, 2]"
    assert "leaked semaphore" not in proc.stderr
    assert "resource_tracker" not in proc.stderr


def test_importing_lorachain_mutes_the_bitsandbytes_kernel_fetch_warning():
    """On a CPU with AVX-512 BF16, importing bitsandbytes (every `import peft` does) tries to fetch
    a gemm kernel from the hub and warns when it cannot; lorachain's import mutes that, in every
    process (the demo's spawned workers import lorachain before peft)."""
    pytest.importorskip("bitsandbytes")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    def stderr(code: str) -> str:
        run = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
        )
        assert run.returncode == 0, run.stderr[-2000:]
        return run.stderr

    if "gemm_4bit_forward" not in stderr("import peft, bitsandbytes"):
        pytest.skip("this CPU's bitsandbytes does not try the hub kernel (no AVX-512 BF16)")
    quiet = stderr("import lorachain, peft, bitsandbytes")
    assert "gemm_4bit_forward" not in quiet and "publisher trust" not in quiet
