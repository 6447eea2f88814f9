"""Validated run configuration: one dataclass per concern, loaded from YAML plus dotted overrides.

Every field is checked when the dataclass is built, so a bad config fails with one line that names
the field and what was expected (`ConfigError`), before any model is loaded. One module per section
of a run's YAML: `model`, `data`, `chain`, `optim`, `train`, the whole `run`, and `load` (YAML files,
mappings and overrides); the names below are the public ones.
"""

from lorachain.config.base import ConfigError, check
from lorachain.config.chain import BIASES, INITS, ChainConfig, KnotConfig, LinkConfig
from lorachain.config.data import CHAT_CHOICES, DataConfig
from lorachain.config.dpo import DPOConfig
from lorachain.config.load import as_current, from_dict, load_config, set_dotted
from lorachain.config.model import QUANTIZATIONS, TASKS, ModelConfig
from lorachain.config.optim import OPTIMIZERS, SCHEDULES, OptimConfig
from lorachain.config.run import RunConfig
from lorachain.config.train import OBJECTIVES, PARALLEL, TrainConfig

__all__ = [
    "BIASES",
    "CHAT_CHOICES",
    "INITS",
    "OBJECTIVES",
    "OPTIMIZERS",
    "PARALLEL",
    "QUANTIZATIONS",
    "SCHEDULES",
    "TASKS",
    "ChainConfig",
    "DPOConfig",
    "ConfigError",
    "DataConfig",
    "KnotConfig",
    "LinkConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "TrainConfig",
    "as_current",
    "check",
    "from_dict",
    "load_config",
    "set_dotted",
]
