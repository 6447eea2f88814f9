"""The configuration and CLI reference pages, from the config dataclasses and the argparse parser."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import re
import typing

from docgen.common import table


def field_comments(cls: type) -> dict[str, str]:
    """Each field's comment: the trailing `# ...` on its line and any comment lines just above."""
    out, above = {}, []
    for line in inspect.getsource(cls).splitlines():
        s = line.strip()
        if s.startswith("#"):
            above.append(s.lstrip("# "))
            continue
        m = re.match(r"(\w+)\s*:\s*[^=]+?(?:=.*?)?(?:\s+#\s*(.*))?$", s)
        if m and not s.startswith(("def ", "class ", "@", "return")) and ":" in s:
            out[m.group(1)] = " ".join([*above, m.group(2) or ""]).strip()
        above = []
    return out


def type_name(tp) -> str:
    text = tp if isinstance(tp, str) else getattr(tp, "__name__", str(tp))
    return text.replace("typing.", "")


def default_of(fld: dataclasses.Field) -> str:
    if fld.default is not dataclasses.MISSING:
        return f"`{fld.default!r}`"
    if fld.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = fld.default_factory()  # type: ignore[misc]
        return "section" if dataclasses.is_dataclass(value) else f"`{value!r}`"
    return "required"


def config_section(cls: type, title: str) -> list[str]:
    doc = inspect.getdoc(cls) or ""
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    rows = [
        [
            f"`{fld.name}`",
            f"`{type_name(fld.type)}`".replace("|", "\\|"),
            default_of(fld).replace("|", "\\|"),
            comments.get(fld.name, "").replace("|", "\\|"),
        ]
        for fld in dataclasses.fields(cls)
    ]
    del hints
    return [f"## {title}", "", doc, "", table(["key", "type", "default", "meaning"], rows), ""]


def config_reference() -> str:
    from lorachain import config as c
    from lorachain.experiment.config import ExperimentConfig
    from lorachain.routing import config as rc

    sections = [
        (c.RunConfig, "A run (`lorachain train`)"),
        (c.ModelConfig, "`model`"),
        (c.DataConfig, "`data`"),
        (c.ChainConfig, "`chain`"),
        (c.LinkConfig, "`chain.links[]`"),
        (c.KnotConfig, "`chain.knot`"),
        (c.OptimConfig, "`optim`"),
        (c.TrainConfig, "`train`"),
        (c.DPOConfig, "`dpo`"),
        (rc.RouteConfig, "A routing store (`lorachain route train`)"),
        (rc.RouteDataConfig, "`data` of a routing store"),
        (rc.SelectorConfig, "`selector`"),
        (ExperimentConfig, "An experiment grid (`lorachain experiment`)"),
    ]
    lines = [
        "# Configuration reference",
        "",
        "Generated from the config dataclasses by `python scripts/docs_gen.py`; a test fails when this",
        "page differs from the code. Every key can be set in the YAML file or as a dotted override on the",
        "command line (`optim.lr=5e-4 chain.links.1.rank=4`). A bad value fails with one line naming",
        "the key.",
        "",
    ]
    for cls, title in sections:
        lines += config_section(cls, title)
    return "\n".join(lines).rstrip() + "\n"


# -- the CLI reference ----------------------------------------------------------------------------
def parsers(p: argparse.ArgumentParser, name: str = "lorachain"):
    yield name, p
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, child in action.choices.items():
                yield from parsers(child, f"{name} {sub}")


def cli_reference() -> str:
    from lorachain.cli import build_parser

    os.environ["COLUMNS"] = "100"
    lines = ["# CLI reference", "", "Generated from the argparse parser by `python scripts/docs_gen.py`.", ""]
    for name, p in parsers(build_parser()):
        lines += [f"## `{name}`", "", "```text", p.format_help().rstrip(), "```", ""]
    return "\n".join(lines).rstrip() + "\n"
