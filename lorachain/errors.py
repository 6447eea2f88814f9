"""The errors that mean bad input from the user: the CLI prints them as one line."""

from lorachain.chain.knot import KnotError
from lorachain.config import ConfigError
from lorachain.data import DataError
from lorachain.routing.judge import JudgeError
from lorachain.store import StoreError

USER_ERRORS = (ConfigError, DataError, KnotError, StoreError, JudgeError, FileNotFoundError)
