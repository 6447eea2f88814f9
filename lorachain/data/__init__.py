"""Data: rows from files, text templates, chat rendering, batching and packing.

Imports no model code. `from lorachain.data import ...` reaches every public name of the parts:
`rows` (files and rows), `text` (prompt/target templates, label words), `chat` (conversations and
chat templates), `examples` (a file as tokenized Examples), `batching` (padded batches, step order),
`packing` (several rows per sequence, none attending to another).
"""

from lorachain.data.batching import batch_order, collate, micro_batches, steps_per_epoch
from lorachain.data.examples import check_targets, encode_row, is_chat, load_examples
from lorachain.data.packing import pack
from lorachain.data.rows import DataError, Example, read_parquet, read_rows
from lorachain.data.text import (
    candidate_ids,
    candidates,
    encode_text_row,
    prompt_ids,
    render,
    row_label,
    template_fields,
)

__all__ = [
    "DataError",
    "Example",
    "batch_order",
    "candidate_ids",
    "candidates",
    "check_targets",
    "collate",
    "encode_row",
    "encode_text_row",
    "is_chat",
    "load_examples",
    "micro_batches",
    "pack",
    "prompt_ids",
    "read_parquet",
    "read_rows",
    "render",
    "row_label",
    "steps_per_epoch",
    "template_fields",
]
