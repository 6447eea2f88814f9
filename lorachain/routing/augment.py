"""`selector.augment`: re-templated copies of the selector's training instructions (issue 43).

A selector that learned one phrasing per data set meets new phrasings of known task types on new
sources. Each training row gets `selector.augment` copies, each re-templated by one style of
`selector.augment_styles` (no paraphrase model, nothing learned; the label is kept):

- `swap`: the instruction's parts (paragraphs, else lines) in another order: the last moved first
  (a last part that only prompts, `Answer:`, stays last), so an instruction that came after its
  input comes before it, and the other way round;
- `separator`: the line breaks between parts replaced by another separator (a space, ` | `,
  a blank line, ` -- `);
- `strip`: the template's words dropped: a `Word:` label at the start of a line (`Question:`,
  `Passage:`) and a last line that is only such a label (`Answer:`).

A style that leaves the text unchanged (one part, no label) gives no copy, so a row has at most
`augment` copies. Only training rows are augmented; validation rows stay as they are.
"""

from __future__ import annotations

import random
import re
from dataclasses import replace

STYLES = ("swap", "separator", "strip")
SEPARATORS = (" ", " | ", "\n\n", " -- ")
LABEL = re.compile(r"^[ \t]*[A-Z][A-Za-z]*(?: [A-Za-z0-9]+){0,2}[ \t]*:[ \t]*", re.MULTILINE)


def _parts(text: str) -> list[str]:
    paras = [p for p in re.split(r"\n\s*\n", text.strip()) if p.strip()]
    return paras if len(paras) > 1 else [x for x in text.strip().split("\n") if x.strip()]


def _prompt_only(part: str) -> bool:
    return LABEL.sub("", part).strip() == ""


def swap(text: str, rng: random.Random) -> str:
    parts = _parts(text)
    tail = [parts.pop()] if len(parts) > 2 and _prompt_only(parts[-1]) else []  # "Answer:" stays last
    return "\n\n".join([parts[-1], *parts[:-1], *tail]) if len(parts) > 1 else text


def separator(text: str, rng: random.Random) -> str:
    parts = _parts(text)
    return rng.choice(SEPARATORS).join(p.strip() for p in parts) if len(parts) > 1 else text


def strip(text: str, rng: random.Random) -> str:
    lines = text.rstrip().split("\n")
    if len(lines) > 1 and _prompt_only(lines[-1]):
        lines = lines[:-1]  # a last line that only prompts for the answer ("Answer:")
    return LABEL.sub("", "\n".join(lines)).strip() or text


RETEMPLATE = {"swap": swap, "separator": separator, "strip": strip}


def retemplate(text: str, style: str, rng: random.Random) -> str:
    """`text` re-templated by `style` (one of STYLES); the text itself when the style changes nothing."""
    return RETEMPLATE[style](text, rng)


def augment_rows(rows: list, copies: int, styles: list[str], seed: int = 0, field: str = "instruction"):
    """`rows` followed by up to `copies` re-templated copies of each (label and every other field
    kept; dataclass rows or dicts), one style each, taken in turn from a seeded shuffle of `styles`;
    a copy equal to its row or to an earlier copy is dropped."""
    rng = random.Random(seed)
    out = list(rows)
    for row in rows:
        text = row[field] if isinstance(row, dict) else getattr(row, field)
        order = list(styles)
        rng.shuffle(order)
        seen = {text}
        for style in order[:copies]:
            new = retemplate(text, style, rng)
            if new in seen:
                continue
            seen.add(new)
            out.append(row | {field: new} if isinstance(row, dict) else replace(row, **{field: new}))
    return out
