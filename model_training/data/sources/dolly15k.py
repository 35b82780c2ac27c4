"""`dolly15k`: databricks-dolly-15k, one prompter/assistant exchange per row."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

from model_training.data.sources.common import DatasetConfig, LoadContext, Splits, instruction_record
from model_training.data.sources.rows import load_rows


@dataclass
class Dolly15kConfig(DatasetConfig):
    """databricks-dolly-15k rows: instruction, context (may be empty), response."""

    input_file_path: str = "databricks/databricks-dolly-15k"
    """The hub id, a `datasets` folder saved from it, or its rows as a .jsonl/.parquet file."""


convert_row = partial(instruction_record, "dolly15k", "context", "response")
"""One row as its conversation (`load`'s conversion)."""


def load(path: str | Path, options: Dolly15kConfig, context: LoadContext) -> Splits:
    """Rows with `instruction`, `context` (may be empty or missing), `response` and `category` (not used): one
    two-message conversation each, whose prompt is the instruction, followed by a blank line and the context when
    the context is not blank. Split by record."""
    return load_rows(path, options, context, convert_row)
