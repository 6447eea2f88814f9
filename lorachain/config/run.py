"""A whole run: the sections together, and the checks that span them."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from lorachain import __version__
from lorachain.config.base import check
from lorachain.config.chain import ChainConfig
from lorachain.config.data import DataConfig
from lorachain.config.dpo import DPOConfig
from lorachain.config.model import ModelConfig
from lorachain.config.optim import OptimConfig
from lorachain.config.train import TrainConfig


@dataclass
class RunConfig:
    """Everything one `lorachain train` run needs."""

    model: ModelConfig
    data: DataConfig
    chain: ChainConfig = field(default_factory=ChainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)  # used when train.objective is dpo
    output_dir: str = "runs/default"
    export_merged: bool = False

    def __post_init__(self) -> None:
        if self.train.objective == "dpo":
            check(
                self.model.task == "causal_lm",
                "train.objective: dpo compares two responses' likelihoods; it needs model.task: causal_lm",
            )
            check(not self.data.packing, "data.packing: dpo scores whole pairs; set it to false")
        if self.model.task == "classification":
            check(
                self.data.label_words is not None or self.model.num_labels is not None,
                "data.label_words: a classification model needs the label set",
            )
            check(not self.data.packing, "data.packing: a classifier scores whole sequences; set it to false")
        if self.model.quantization != "none":
            check(
                not self.export_merged,
                "export_merged: a quantized base cannot be saved merged; merge the exported adapter "
                "into the full-precision base instead",
            )
            check(self.chain.method == "lora", "chain.method: full fine-tuning cannot train a quantized base")
            check(
                not self.chain.use_dora,
                "chain.use_dora: a DoRA knot rescales whole weights, which a quantized base cannot hold "
                "exactly; use DoRA on a full-precision base",
            )
            for key in self.chain.moving_inits():
                check(
                    False,
                    f"{key}: a link that starts from the weights or their gradient needs the full-"
                    f"precision base; model.quantization {self.model.quantization} has none (use gaussian)",
                )

    def to_dict(self) -> dict[str, Any]:
        return {"lorachain_version": __version__, **dataclasses.asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)
