"""The task registry: TaskExample, Task, `register` and the row helper `need`. Members import this
module, and the package imports its members, so the two form no circle."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorachain.data import DataError


@dataclass
class TaskExample:
    """One evaluation unit. Classification / multiple choice: `prompt` + each of `candidates` is
    scored and `gold` is the right one's index. Generation: `answers` are the references."""

    prompt: str
    candidates: list[str] = field(default_factory=list)
    gold: int | None = None
    answers: list[str] = field(default_factory=list)
    group: str | None = None  # examples scored together (MultiRC question, ReCoRD query)

    @property
    def target(self) -> str:
        """The text trained with the LM loss: the gold candidate or the first reference."""
        return self.candidates[self.gold] if self.gold is not None else self.answers[0]


@dataclass(frozen=True)
class Task:
    name: str
    load: Callable[[str | Path], list[TaskExample]]
    metric: str  # accuracy | f1 | em_f1 | number_em (final number of a solution) | char_em
    kind: str  # classification | multiple_choice | generation
    # generated, not read: `load` takes a spec mapping (the experiment's `paths.<task>`), and the
    # model is scored on its training examples (memorisation)
    memorise: bool = False


TASKS: dict[str, Task] = {}


def register(name: str, metric: str = "accuracy", kind: str = "classification", memorise: bool = False):
    """Register a loader `(path) -> list[TaskExample]` as task `name`; a duplicate name raises."""

    def deco(fn: Callable[[str | Path], list[TaskExample]]):
        if name in TASKS:
            raise ValueError(f"task {name!r} is already registered")
        TASKS[name] = Task(name, fn, metric, kind, memorise)
        return fn

    return deco


def need(row: dict[str, Any], name: str, where: str, kind: type | tuple = object) -> Any:
    """Field `name` of a row, or a DataError naming the file, line and field."""
    if name not in row or row[name] is None:
        raise DataError(f"{where}: missing field {name!r}")
    if not isinstance(row[name], kind):
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise DataError(f"{where}: field {name!r} should be {expected}, got {type(row[name]).__name__}")
    return row[name]
