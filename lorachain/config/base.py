"""The config error type and its one-line check, shared by every config dataclass."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is missing or invalid; the message names the field."""


def check(cond: bool, msg: str) -> None:
    """Raise ConfigError(msg) unless cond."""
    if not cond:
        raise ConfigError(msg)
