"""`train:` the fixed budget, precision, parallelism and the run's bookkeeping."""

from __future__ import annotations

from dataclasses import dataclass, field

from lorachain.config.base import check

PARALLEL = ("auto", "none", "ddp", "fsdp")
OBJECTIVES = ("sft", "dpo")
TRACKERS = ("tensorboard", "wandb", "mlflow")


@dataclass
class TrainConfig:
    """The fixed training budget and the run's bookkeeping."""

    epochs: float | None = 1.0
    max_steps: int | None = None  # overrides epochs when set
    batch_size: int = 8
    grad_accum: int = 1
    seed: int = 0
    # also evaluate data.eval every this many steps (rows in metrics.jsonl: a curve); knots and the
    # end always evaluate
    eval_every: int = 0
    save_every: int = 50  # checkpoint period in optimizer steps
    log_every: int = 1
    eval_batch_size: int = 16
    # fp32 | bf16 | fp16 (autocast; LoRA weights, gradients, optimizer state in fp32) | auto (bf16
    # where the device runs it fast: CUDA with bf16, a CPU with AMX or AVX-512 BF16; else fp32).
    # bf16/fp16 on a CPU without native matmuls: emulated in fp32: the same numbers, ~1.2x fp32 time
    precision: str = "fp32"
    # recompute each decoder layer's activations in the backward (non-reentrant): less memory
    gradient_checkpointing: bool = False
    check_memory: bool = True  # refuse, before loading, a model whose estimated peak memory cannot fit
    # several processes (torchrun / accelerate launch): ddp (whole model per rank) | fsdp (frozen base
    # sharded per decoder layer, FSDP2) | none | auto (ddp when launched on several processes)
    parallel: str = "auto"
    fsdp_offload: bool = False  # fsdp: keep the base shards in CPU memory between uses (CPUOffloadPolicy)
    # save the knotted base once per knot with torch.distributed.checkpoint, so that a resume at any
    # world size loads it instead of replaying the knots (null: under fsdp only)
    base_checkpoint: bool | None = None
    # fsdp: how each rank gets its rows of the base's safetensors: map (the file's pages, shared by the
    # ranks, copied where a knot writes) | read (into its own memory) | broadcast (rank 0 reads, sends)
    fsdp_load: str = "map"
    # fsdp: how the ranks gather a unit of the base: shared_memory (CPU ranks on one host: through a
    # /dev/shm arena, no socket) | process_group (gloo, NCCL) | auto (shared_memory where it applies)
    fsdp_all_gather: str = "auto"
    # fsdp: free each gathered unit after its forward and gather it again for its backward; false
    # keeps it until its backward (one all-gather a step instead of two; the whole model on each rank)
    fsdp_reshard_after_forward: bool = True
    # sft (the LM loss on targets) | dpo (preference pairs {prompt, chosen, rejected}; see `dpo:`)
    objective: str = "sft"
    # experiment trackers rank 0 logs to: tensorboard (tb/ in the run folder), wandb, mlflow (`pip
    # install 'lorachain[trackers]'`); one name, or [] / none for none. A resumed run continues the
    # same tracker runs
    report_to: list[str] | str = field(default_factory=lambda: ["tensorboard"])

    def __post_init__(self) -> None:
        check(
            self.parallel in PARALLEL,
            f"train.parallel: expected one of {PARALLEL}, got {self.parallel!r}",
        )
        check(
            self.precision in ("fp32", "bf16", "fp16", "auto"),
            f"train.precision: expected fp32, bf16, fp16 or auto, got {self.precision!r}",
        )
        check(
            self.objective in OBJECTIVES,
            f"train.objective: expected one of {OBJECTIVES}, got {self.objective!r}",
        )
        check(
            self.fsdp_load in ("map", "read", "broadcast"),
            f"train.fsdp_load: expected map, read or broadcast, got {self.fsdp_load!r}",
        )
        check(
            self.fsdp_all_gather in ("auto", "shared_memory", "process_group"),
            "train.fsdp_all_gather: expected auto, shared_memory or process_group, "
            f"got {self.fsdp_all_gather!r}",
        )
        if isinstance(self.report_to, str):  # as Trainer's report_to: "wandb", "none"
            self.report_to = [] if self.report_to == "none" else [self.report_to]
        for name in self.report_to:
            check(name in TRACKERS, f"train.report_to: expected some of {TRACKERS}, got {name!r}")
        check(
            len(set(self.report_to)) == len(self.report_to),
            f"train.report_to: names a tracker twice: {self.report_to}",
        )
        check(self.batch_size > 0, f"train.batch_size: expected > 0, got {self.batch_size}")
        check(self.grad_accum > 0, f"train.grad_accum: expected > 0, got {self.grad_accum}")
        check(
            self.max_steps is not None or (self.epochs is not None and self.epochs > 0),
            "train: expected epochs > 0 or max_steps",
        )
        check(self.max_steps is None or self.max_steps > 0, "train.max_steps: expected > 0")
        check(self.save_every > 0, "train.save_every: expected > 0")
