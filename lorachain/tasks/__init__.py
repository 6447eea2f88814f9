"""Task definitions for the COLA paper's benchmarks: a loader per official format, a prompt
template and verbalizer in the style of the MeZO setup the paper follows, and a metric.

A task is a small registered definition; a user adds one with `@register("name")` on a function
`(path) -> list[TaskExample]` without touching the runner. Imports no model code.
"""

from __future__ import annotations

from lorachain.data import DataError
from lorachain.tasks import capacity, gsm8k, qa, superglue  # noqa: F401  (registers the built-in tasks)
from lorachain.tasks.registry import TASKS, Task, TaskExample, need, register

__all__ = ["TASKS", "Task", "TaskExample", "get_task", "need", "register"]


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise DataError(f"task {name!r} is not registered; known: {sorted(TASKS)}")
    return TASKS[name]
