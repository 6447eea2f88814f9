"""Loading the committed JSON and writing Markdown tables and figures."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def load(rel: str | list[str]) -> dict | list:
    """The JSON at `rel`, or with a `*` in it, {path: JSON} of every match; of a list, {entry: its load}."""
    if isinstance(rel, list):
        return {r: load(r) for r in rel}
    if "*" in rel:
        return {str(p.relative_to(ROOT)): json.loads(p.read_text()) for p in sorted(ROOT.glob(rel))}
    return json.loads((ROOT / rel).read_text())


def exists(rel: str | list[str]) -> bool:
    if isinstance(rel, list):
        return all(exists(r) for r in rel)
    return any(ROOT.glob(rel)) if "*" in rel else (ROOT / rel).is_file()


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def f(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def signed(x: float) -> str:
    """+1.2 / −1.2; a value that rounds to zero is +0.0, never −0.0."""
    return f"{round(x, 1) + 0.0:+.1f}".replace("-", "−")
