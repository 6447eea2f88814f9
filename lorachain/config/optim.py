"""`optim:` the optimizer rebuilt at every link, and the learning-rate schedule."""

from __future__ import annotations

from dataclasses import dataclass

from lorachain.config.base import check

OPTIMIZERS = ("adamw", "sgd", "adagrad")
SCHEDULES = ("linear", "cosine", "constant")


@dataclass
class OptimConfig:
    """The base optimizer, rebuilt empty at every link, and the learning-rate schedule."""

    name: str = "adamw"
    lr: float = 5e-4
    weight_decay: float = 0.0
    momentum: float = 0.0  # sgd only
    schedule: str = "linear"  # over the whole budget
    warmup_steps: int = 0
    restart_per_link: bool = False  # warm restart of the schedule at each link
    max_grad_norm: float | None = 1.0
    loraplus_lr_ratio: float | None = None  # LoRA+: the B factors learn this many times faster than A

    def __post_init__(self) -> None:
        check(self.name in OPTIMIZERS, f"optim.name: expected one of {OPTIMIZERS}, got {self.name!r}")
        check(self.lr > 0, f"optim.lr: expected > 0, got {self.lr}")
        check(self.schedule in SCHEDULES, f"optim.schedule: expected one of {SCHEDULES}")
        check(self.warmup_steps >= 0, "optim.warmup_steps: expected >= 0")
        ratio = self.loraplus_lr_ratio
        check(ratio is None or ratio > 0, f"optim.loraplus_lr_ratio: expected > 0, got {ratio}")
