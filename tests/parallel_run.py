"""`lorachain.train` of a YAML config for 1 or N processes, for the tests of `train.parallel`:

    torchrun --standalone --nproc-per-node 2 tests/parallel_run.py CONFIG [STOP_AFTER] [DIE_RANK]

STOP_AFTER stops the run after that many steps, as an interruption would; DIE_RANK makes that rank
exit abruptly in the middle of its first knot (fault injection: the others must not hang)."""

from __future__ import annotations

import os
import sys

import yaml

from lorachain.config import RunConfig, from_dict
from lorachain.training import base_checkpoint, loop
from lorachain.training.parallel import end_launch


def _dying(*args, **kwargs):
    os._exit(17)  # no clean-up, no collective: as if the process were killed


def _noted(load):
    def noted(*args):
        loaded = load(*args)
        print(f"knotted base loaded: {loaded}")  # a resume that read base-K/ rather than replaying knots
        return loaded

    return noted


if __name__ == "__main__":
    base_checkpoint.load_base = _noted(base_checkpoint.load_base)
    cfg = from_dict(RunConfig, yaml.safe_load(open(sys.argv[1])))
    stop = int(sys.argv[2]) if len(sys.argv) > 2 and int(sys.argv[2]) > 0 else None
    if len(sys.argv) > 3 and os.environ.get("RANK") == sys.argv[3]:
        loop.tie_on_shards = _dying
    print(loop.train(cfg, stop_after=stop, progress=False).summary["status"])
    end_launch(0)  # as `lorachain train` ends under torchrun
