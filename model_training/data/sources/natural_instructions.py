"""`natural_instructions`: Natural Instructions v2 (allenai/natural-instructions), one of the sources of the
RLHF-tuned Falcon-40B. Each instance of a task is one prompter/assistant exchange: the task's definition and the
instance's input (after a blank line) as the prompt, the instance's first output as the reply.

Two layouts, told apart by the path:
- task files, as the allenai/natural-instructions repository holds them (`tasks/task1564_triviaqa_answer_generation
  .json`): one JSON object per task, with "Definition" (a list of strings, joined by blank lines), "Positive Examples",
  "Negative Examples", "Instances" (a list of {"id", "input", "output": [strings]}) and metadata ("Source",
  "Categories", "Input_language", ...), of which only the definition and the instances are read. The path is one
  such `.json` file or a folder of them (every `*.json`, in name order; the task's name is the file's);
- flat rows, as the hub dataset Muennighoff/natural-instructions holds them: {"task_name", "id", "definition",
  "inputs", "targets"}, one row per output of an instance (the rows of an instance share its id, and the first is
  read). The path is a JSON Lines or parquet file, a `datasets` folder, or the hub id.
Both layouts of the same tasks give the same records. A malformed instance names its file and its number in the
task's "Instances" (or its line); a task file without a definition or instances is an error of the whole file.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from model_training.data.records import Conversation, FileFormatError, InvalidRecord, invalid_json, text_lines
from model_training.data.sources.common import (
    DatasetConfig,
    LoadContext,
    Splits,
    Turn,
    conversation,
    join,
    optional,
    pair,
    required,
    split_by_record,
)
from model_training.data.sources.rows import Table, convert_rows, read_rows, suffix

# Files the `datasets` library writes into a save_to_disk folder: such a folder holds flat rows, not task files.
_SAVED_DATASET_FILES = ("state.json", "dataset_dict.json")


@dataclass
class NaturalInstructionsConfig(DatasetConfig):
    """Natural Instructions v2: task files (allenai/natural-instructions) or flat rows (its hub copy)."""

    input_file_path: str = "Muennighoff/natural-instructions"
    """A folder of task files (the repository's `tasks/`), one task file, or the flat rows (.jsonl, .parquet, a
    `datasets` folder, the hub id)."""
    max_instances_per_task: int | None = None
    """Keep at most this many instances of each task, the first ones (a task has up to 6,500); null: all."""


def load(path: str | Path, options: NaturalInstructionsConfig, context: LoadContext) -> Splits:
    """The records of every task, task after task and instances in file order, split by record."""
    kept = _Instances(options.max_instances_per_task)
    files = _task_files(Path(path).expanduser())
    if files is None:
        table = read_rows(path, context.config_key)
        records = convert_rows(table, partial(_from_row, kept), options.skip_invalid)
    else:
        records = [record for file in files for record in _from_task_file(file, kept, options.skip_invalid)]
    return split_by_record(records, options)


class _Instances:
    """Which instances a load keeps (the first row of each instance id, at most `cap` of each task), numbered in
    the order they are kept: the message ids of both layouts agree."""

    def __init__(self, cap: int | None) -> None:
        self.cap = cap
        self.ids: set[str] = set()
        self.per_task: Counter[str] = Counter()

    def wanted(self, task: str, instance_id: str) -> bool:
        return instance_id not in self.ids and (self.cap is None or self.per_task[task] < self.cap)

    def add(self, task: str, instance_id: str, turns: list[Turn]) -> Conversation:
        """The conversation of a wanted instance's turns (checked first: an invalid one is not kept)."""
        record = conversation("natural_instructions", len(self.ids) + 1, turns)
        self.ids.add(instance_id)
        self.per_task[task] += 1
        return record


def _task_files(path: Path) -> list[Path] | None:
    """The task files `path` names; None when it names flat rows (or nothing: `read_rows` says so)."""
    if path.is_dir() and not any((path / name).exists() for name in _SAVED_DATASET_FILES):
        files = sorted(path.glob("*.json"))
        if not files:
            raise FileFormatError(path, None, "holds no task files (*.json); expected the tasks/ folder of "
                                  "allenai/natural-instructions, or flat rows (a .jsonl file, a datasets folder)")
        return files
    return [path] if path.is_file() and suffix(path) == ".json" else None


def _from_row(kept: _Instances, row: dict, index: int) -> Conversation | None:
    task, instance_id = required(row, "task_name"), required(row, "id")
    if not kept.wanted(task, instance_id):
        return None
    prompt = join(required(row, "definition"), optional(row, "inputs"))
    return kept.add(task, instance_id, pair(prompt, required(row, "targets"), "targets"))


def _from_task_file(path: Path, kept: _Instances, skip_invalid: bool) -> list[Conversation]:
    """The records of one task file; an instance is numbered from 1 in the task's "Instances"."""
    try:
        task = json.loads("".join(text_lines(path)))
    except json.JSONDecodeError as error:
        raise FileFormatError(path, error.lineno, invalid_json(error)) from None
    if not isinstance(task, dict):
        raise FileFormatError(path, None, f"expected one task, a JSON object with 'Definition' and 'Instances'; got a "
                              f"JSON {type(task).__name__}")
    definition = _definition(task, path)
    instances = task.get("Instances")
    if not isinstance(instances, list):
        reason = "missing field 'Instances'" if instances is None else "field 'Instances' must be a list"
        raise FileFormatError(path, None, reason)
    convert = partial(_from_instance, kept, path.stem, definition)
    return convert_rows(Table(path, instances, "instance"), convert, skip_invalid)


def _definition(task: dict, path: Path) -> str:
    value = task.get("Definition")
    if value is None:
        raise FileFormatError(path, None, "missing field 'Definition'")
    if not isinstance(value, list) or not all(isinstance(part, str) for part in value):
        raise FileFormatError(path, None, "field 'Definition' must be a list of strings")
    definition = "\n\n".join(value)
    if not definition.strip():
        raise FileFormatError(path, None, "field 'Definition' is empty")
    return definition


def _from_instance(kept: _Instances, task: str, definition: str, instance: object, index: int) -> Conversation | None:
    if not isinstance(instance, dict):
        raise InvalidRecord(f"expected a JSON object, got {type(instance).__name__}")
    instance_id = required(instance, "id")
    if not kept.wanted(task, instance_id):
        return None
    outputs = instance.get("output")
    if outputs is None:
        raise InvalidRecord("missing field 'output'")
    if not isinstance(outputs, list) or not all(isinstance(output, str) for output in outputs):
        raise InvalidRecord("field 'output' must be a list of strings")
    if not outputs:
        raise InvalidRecord("field 'output' is empty")
    prompt = join(definition, optional(instance, "input"))
    return kept.add(task, instance_id, pair(prompt, outputs[0], "output"))
