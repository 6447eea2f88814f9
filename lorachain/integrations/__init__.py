"""Adapters to other people's training loops: COLA as a `transformers`/TRL callback."""

from lorachain.integrations.callback import ChainCallback

__all__ = ["ChainCallback"]
