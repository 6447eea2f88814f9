"""The docs cannot drift: generated pages and measured tables equal what the code and the committed
JSON render, and every `lorachain ...` command quoted in the README and docs exists."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
import shlex
import sys
from pathlib import Path

import pytest

from lorachain.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))  # the docgen package beside docs_gen.py
spec = importlib.util.spec_from_file_location("docs_gen", ROOT / "scripts" / "docs_gen.py")
docs_gen = importlib.util.module_from_spec(spec)
sys.modules["docs_gen"] = docs_gen
spec.loader.exec_module(docs_gen)

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def test_generated_pages_and_tables_match_the_code_and_json():
    stale = docs_gen.drift()
    assert not stale, f"run `python scripts/docs_gen.py`: {stale}"


def test_a_changed_json_figure_shows_as_drift(tmp_path):
    d = docs_gen.load("benchmarks/results/cola_cost.json")
    before = docs_gen.cola_cost(d)
    d["rows"][1]["time_ratio"] = 9.876
    after = docs_gen.cola_cost(d)
    assert "9.876" in after and "9.876" not in before
    text = "x\n<!-- table: cola-cost -->\nan old hand-typed table\n<!-- /table -->\ny\n"
    filled = docs_gen.fill_tables(text, "t.md")
    assert "an old hand-typed table" not in filled and "benchmarks/results/cola_cost.json" in filled
    assert docs_gen.fill_tables(filled, "t.md") == filled  # idempotent
    with pytest.raises(SystemExit, match="unknown table 'nope'"):
        docs_gen.fill_tables("<!-- table: nope -->\n<!-- /table -->", "t.md")


def test_the_gap_summary_says_how_far_the_grid_is():
    from docgen.cola import GAP_CONFIG, gap_progress

    from lorachain.config import load_config
    from lorachain.experiment.config import ExperimentConfig
    from lorachain.experiment.runner import plan

    cells = plan(load_config(GAP_CONFIG, cls=ExperimentConfig))
    rows = [{"task": c.task, "method": c.method, "seed": c.seed, "lr": c.lr} for c in cells]
    assert gap_progress(rows) == f"All {len(cells)} planned cells are in: every method has 3 seeds."
    left = gap_progress(rows[:-1] + [dict(rows[-1], lr=9.0)])  # an unplanned cell does not count
    assert left.startswith(f"**Interim: {len(cells) - 1} of {len(cells)} planned cells are in**")
    assert f"`{cells[-1].method}`." in left and f"`{cells[0].method}`" not in left


def test_the_capacity_tables_say_how_far_the_grid_is_and_read_the_cost_json():
    from docgen.capacity import CAPACITY_CONFIG, capacity_cost, progress

    from lorachain.config import load_config
    from lorachain.experiment.config import ExperimentConfig
    from lorachain.experiment.runner import plan

    cells = plan(load_config(CAPACITY_CONFIG, cls=ExperimentConfig))
    rows = [{"task": c.task, "method": c.method, "seed": c.seed, "lr": c.lr} for c in cells]
    assert progress(rows) == f"All {len(cells)} planned cells are in."
    seed2 = [r for r in rows if r["seed"] != 2]
    left = progress(seed2)
    assert left.startswith(f"**Interim: {len(seed2)} of {len(cells)} planned cells are in**")
    assert "`full`" in left and "`pissa_r1`" not in left  # screening methods have seed 0 only
    d = docs_gen.load("benchmarks/results/capacity_cost.json")
    d["rows"][1]["mem_ratio"] = 4.321
    assert "| 4.32 |" in capacity_cost(d)


def test_the_precision_check_labels_grid_cells_by_how_they_ran():
    from docgen.cola import _grid_run

    assert _grid_run({"spec": {"matmul": "emulated"}}) == "grid, emulated bf16"
    assert _grid_run({"spec": {}}) == "grid, native bf16"  # cells from before the emulation existed
    rendered = docs_gen.gap_precision_check(
        docs_gen.load("results/cola_gap_emulated_check/cells/*/*/*/*/result.json")
    )
    grid = docs_gen.load("results/cola_gap_smollm2/cells/*/*/*/*/result.json").values()
    seed2 = next(g for g in grid if (g["method"], g["lr"], g["seed"]) == ("lora_r1", 5e-4, 2))
    assert f"| {_grid_run(seed2)}, seed 2 |" in rendered and seed2["spec"]["matmul"] == "emulated"


def test_every_table_of_figures_is_rendered_not_typed():
    """Outside the generated reference pages, a Markdown table sits between table markers, except
    tables of words (options, parts) listed here."""
    words = {"installation.md": 1}
    for page in PAGES:
        if page.parent.name == "reference":
            continue
        text = docs_gen.MARK.sub("", page.read_text())
        tables = len(re.findall(r"^\s*\|---", text, re.M))
        assert tables == words.get(page.name, 0), f"{page.relative_to(ROOT)}: {tables} hand-typed tables"


def test_the_config_reference_lists_every_key():
    text = (ROOT / "docs" / "reference" / "config.md").read_text()
    for key in ("`name_or_path`", "`label_words`", "`restart_per_link`", "`precision`", "`truncation`"):
        assert key in text
    assert "| `rank` | `int` | `8` |" in text


def quoted_commands() -> list[tuple[str, list[str]]]:
    out = []
    for page in PAGES:
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S):
            for line in block.splitlines():
                line = line.split("#")[0].strip()
                for part in re.split(r"&&|;", line):
                    part = part.strip()
                    if part.startswith("lorachain "):
                        out.append((page.name, shlex.split(part)[1:]))
    return out


def subcommand(argv: list[str]) -> list[str]:
    """The leading words of argv that name (nested) subcommands."""
    parser, path = build_parser(), []
    for word in argv:
        subs = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
        if not subs or word not in subs[0].choices:
            break
        parser = subs[0].choices[word]
        path.append(word)
    return path


def test_every_quoted_command_exists_and_answers_help():
    commands = quoted_commands()
    assert len(commands) >= 10
    for page, argv in commands:
        path = subcommand(argv)
        assert path, f"{page}: `lorachain {' '.join(argv)}` names no subcommand"
        with contextlib.redirect_stdout(io.StringIO()) as out, pytest.raises(SystemExit) as exit_:
            build_parser().parse_args([*path, "--help"])
        assert exit_.value.code == 0 and "usage: lorachain" in out.getvalue()


def test_readme_is_a_front_door():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200
    assert lines[3].startswith("pip install torch==2.13.0") and lines[3].endswith("lorachain demo")
    assert lines[4].endswith("python -m pytest -q")
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python -m pytest -q" in ci and "mkdocs build --strict" in ci
