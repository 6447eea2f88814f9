"""Data parallelism over torch.distributed, for runs started by `accelerate launch` or `torchrun`.

Every rank holds the whole model and takes its share of each global micro-batch; gradients are
summed across ranks before the (identical) optimizer step, so all ranks keep equal weights and tie
knots at the same step. The loss is a sum over the global batch divided by its size, so a run on N
processes follows the single-process run with the same global batch. Only rank 0 writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, items: list) -> list:
        """This rank's share of a global micro-batch."""
        return items[self.rank :: self.world]

    def sum_grads(self, params: list[torch.nn.Parameter]) -> None:
        if self.world == 1:
            return
        import torch.distributed as dist

        for p in params:
            if p.grad is None:  # this rank had no examples in the step
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def sum(self, value: float) -> float:
        if self.world == 1:
            return value
        import torch.distributed as dist

        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t.item())


def init_dist() -> Dist:
    """The process group of this launch (Accelerate's state on top of torch.distributed), or a
    single process when not launched distributed."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist()
    from accelerate import PartialState

    state = PartialState()
    return Dist(state.process_index, state.num_processes)
