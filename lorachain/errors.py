"""The errors that mean bad input from the user: the CLI prints them as one line."""

from lorachain.chain.knot import KnotError
from lorachain.config import ConfigError
from lorachain.data import DataError

USER_ERRORS = (ConfigError, DataError, KnotError, FileNotFoundError)
