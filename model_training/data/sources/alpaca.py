"""`alpaca`: Stanford Alpaca records, one prompter/assistant exchange each."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

from model_training.data.sources.common import DatasetConfig, LoadContext, Splits, instruction_record
from model_training.data.sources.rows import load_rows


@dataclass
class AlpacaConfig(DatasetConfig):
    """Alpaca-style rows (a JSON array or JSON Lines): instruction, input (may be empty), output."""

    input_file_path: str = "tatsu-lab/alpaca"
    """The hub id, a `datasets` folder, or the release's JSON array (`alpaca_data.json`) or JSON Lines."""


convert_row = partial(instruction_record, "alpaca", "input", "output")
"""One row as its conversation (`load`'s conversion)."""


def load(path: str | Path, options: AlpacaConfig, context: LoadContext) -> Splits:
    """Records with `instruction`, `input` (may be empty or missing) and `output`: one two-message conversation
    each, whose prompt is `instruction + "\\n\\n" + input` when the input is not blank, else the instruction. The
    release is one JSON array; JSON Lines and the other sources work too. Split by record."""
    return load_rows(path, options, context, convert_row)
