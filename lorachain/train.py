"""The public entry point `lorachain.train.train(cfg)`: the one training loop (lorachain.training.loop)."""

from lorachain.training.loop import Result, train

__all__ = ["Result", "train"]
