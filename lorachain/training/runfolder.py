"""The run folder around the training loop: its config check, stop signals, writers, memory."""

from __future__ import annotations

import json
import re
import resource
import signal
import threading
from pathlib import Path

import torch

from lorachain.config import ConfigError, RunConfig, as_current
from lorachain.io import write_text

# train.* keys a resumed run may change (world sizes too; a tracker added starts at the resume step)
HOW = ("parallel", "fsdp_offload", "base_checkpoint", "report_to")


class NoWriter:
    """TensorBoard writer of the ranks that write nothing."""

    def add_scalar(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


class StopFlag:
    """Turns SIGINT/SIGTERM into a flag checked between steps, so a stop never lands mid-update."""

    def __init__(self) -> None:
        self.stop = False
        self.old: dict = {}

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.stop = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self.old.items():
            signal.signal(sig, handler)


def prepare_run_dir(out: Path, cfg: RunConfig) -> None:
    """Write config.json, or check that an existing run folder holds the same config."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir: {out} is an existing file, not a folder")
    path = out / "config.json"
    new = json.loads(cfg.to_json())
    if path.is_file():
        old = json.loads(path.read_text())
        old = as_current(RunConfig, old)  # fields added since: their defaults
        for cfg_dict in (old, new):
            cfg_dict.pop("lorachain_version", None)
            for key in HOW:  # how the run is spread over processes, not what it computes
                cfg_dict.get("train", {}).pop(key, None)
        if old != new:
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise ConfigError(
                f"{out}: holds a run with another config (differs in {', '.join(diff)}); "
                "choose another output_dir or delete it"
            )
        return
    write_text(path, cfg.to_json() + "\n")


def reset_peak_memory() -> None:
    """Start a new peak: CUDA's allocator counter, or (Linux) the process's peak RSS (VmHWM)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory_mb() -> float:
    """Peak GPU memory allocated, or the process's peak RSS since the last reset (VmHWM)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024
    except (OSError, AttributeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
