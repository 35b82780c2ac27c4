"""The contract of a data source, and what every source shares.

A source is one module of this package and one line of `SOURCES` (__init__.py). The module holds
- its options: a dataclass subclassing `DatasetConfig`, each field with a one-line docstring; that is the whole
  schema of `datasets: [{name: {options}}]` (model_training/config/ checks each entry against it);
- `load(path, options, context) -> (train, validation)`: the records of `path` (a local file or folder, or a hub
  id when the source reads the hub), split for validation by the source's own rule: by record with
  `split_by_record` (rows.py's `load_rows` reads, converts and splits in one call), or, for the OASST sources, by
  message tree as the OpenAssistant trainer splits. A malformed record raises FileFormatError naming the file,
  the record and the field, unless `options.skip_invalid`; what a load filters itself (records in other
  languages) it counts in `context.report`.
A source that holds ranked replies (OASST trees, hh-rlhf pairs, preference files) also has
- `compare(path, options, context) -> (train, validation)`: its `Comparison`s, split by the same rule, which the
  preference stages (trainer_rm.py, trainer_dpo.py) read instead of conversations.
A source whose records are rows names its row conversion in `Source.rows` (and a filter `load` applies after the
split in `Source.keeps`): data preparation then streams a large JSON Lines file instead of calling `load`, with the
same records (sources/stream.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from model_training.data.records import ROLES, Comparison, Conversation, InvalidRecord, Message, Record
from model_training.data.selection import held_out_groups


@dataclass
class DatasetConfig:
    """Options every source takes: the split, how much of it an epoch draws, and filters."""

    input_file_path: str = ""
    """A file (a relative path is looked up in `cache_dir`, then in `data_dir`), a `datasets` save_to_disk
    folder, or a hub id."""
    val_split: float = 0.05
    """Fraction held out for validation (OASST: by message tree, as the OpenAssistant trainer; others: by record)."""
    manual_seed: int = 287631038922
    """Seed of the train/validation split (the OpenAssistant trainer's value, so splits match its runs)."""
    skip_invalid: bool = False
    """Skip malformed records (and report how many) instead of stopping at the first one."""
    fraction: float | None = None
    """Share of this dataset's training samples drawn each epoch (a new draw every epoch); null: all."""
    size: int | None = None
    """Training samples drawn each epoch (instead of `fraction`)."""
    share: float | None = None
    """Share of every epoch's samples that come from this dataset (e.g. 0.05 for 5% pretraining text)."""
    replace: bool = False
    """Allow drawing more samples than the dataset has (with replacement); otherwise that is an error."""
    min_length: int = 0
    """Drop samples shorter than this many tokens."""
    max_length: int | None = None
    """Drop samples longer than this many tokens (instead of cutting them to the global max_length)."""


@dataclass
class FilterReport:
    """What the filters removed from one dataset (both splits), for `--show_dataset_stats`."""

    name: str
    records: int = 0
    other_language: int = 0
    duplicates: int = 0
    too_short: int = 0
    too_long: int = 0

    def add_other_language(self, count: int) -> None:
        """Records a load left out for their language itself (OASST filters whole trees): read, then dropped."""
        self.records += count
        self.other_language += count


@dataclass(frozen=True)
class LoadContext:
    """What a load reports to, besides the records it returns."""

    report: FilterReport
    """Where a load counts what it filters itself (`add_other_language`)."""
    config_key: str | None = None
    """The setting `path` came from (`datasets[0].dolly15k.input_file_path`), named by messages about the path."""


Splits = tuple[list[Record], list[Record]]
"""(train, validation) records."""
ComparisonSplits = tuple[list[Comparison], list[Comparison]]
"""(train, validation) comparisons."""
Options = TypeVar("Options", bound=DatasetConfig)
R = TypeVar("R")


@dataclass(frozen=True)
class Source(Generic[Options]):
    """One entry of `SOURCES`: a source's options schema and its load."""

    options: type[Options]
    load: Callable[[str | Path, Options, LoadContext], Splits] | None
    """The source's conversations (or text) for supervised fine-tuning; None for a source of ranked replies only."""
    hub: bool = True
    """Whether `input_file_path` may name a hub dataset (read through `datasets`); false: local files only."""
    compare: Callable[[str | Path, Options, LoadContext], ComparisonSplits] | None = None
    """The source's ranked replies for the preference stages; None for a source that has none."""
    rows: Callable[[dict, int], Record | None] | None = None
    """The conversion `load` applies to each row (1-based), for a source whose records are rows: with it, data
    preparation reads a JSON Lines file as a stream of chunks (sources/stream.py), each record as `load` gives it."""
    keeps: Callable[[Options], Callable[[Record], bool] | None] | None = None
    """The per-record filter `load` applies after its split, from the options (chat_jsonl's languages); a record it
    refuses counts as in another language. None: no such filter."""
    documents: bool = False
    """A .txt file holds documents separated by blank lines (`text`), which data preparation streams too."""


def split_by_record(records: Sequence[R], options: DatasetConfig) -> tuple[list[R], list[R]]:
    """(train, validation): `options.val_split` of the records held out by their position, chosen by
    `options.manual_seed` (`held_out_groups`); records keep their order on each side."""
    # The key format is part of the split: the keys are sorted before the seeded shuffle.
    keys = [f"record:{index:09d}" for index in range(len(records))]
    held_out = held_out_groups(keys, options.val_split, options.manual_seed)
    return (
        [record for record, key in zip(records, keys) if key not in held_out],
        [record for record, key in zip(records, keys) if key in held_out],
    )


@dataclass(frozen=True)
class Turn:
    """One turn of a record, before it is checked."""

    role: str  # "prompter" | "assistant"
    text: str
    where: str  # the turn in the source's terms, for messages: "turn 2 (Assistant)", "field 'response'"


def optional(row: dict, name: str) -> str | None:
    """A string field, None when absent or null."""
    value = row.get(name)
    if value is not None and not isinstance(value, str):
        raise InvalidRecord(f"field {name!r} must be a string, got {type(value).__name__}")
    return value


def required(row: dict, name: str) -> str:
    """A string field that must be there and not blank."""
    value = optional(row, name)
    if value is None:
        raise InvalidRecord(f"missing field {name!r}")
    if not value.strip():
        raise InvalidRecord(f"field {name!r} is empty")
    return value


def join(instruction: str, extra: str | None) -> str:
    """An instruction and its input (Dolly's context, Alpaca's input), separated by a blank line when the input is
    not blank."""
    return f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction


def pair(prompt: str, reply: str, reply_field: str) -> list[Turn]:
    """The two turns of an instruction record; `reply_field` names where the reply came from."""
    return [Turn("prompter", prompt, "the prompt"), Turn("assistant", reply, f"field {reply_field!r}")]


def instruction_record(name: str, input_field: str, reply_field: str, row: dict, index: int) -> Conversation:
    """The conversation of an instruction row (Dolly, Alpaca): its `instruction`, joined with its `input_field` (may
    be empty or missing), as the prompt, and its `reply_field` as the reply."""
    prompt = join(required(row, "instruction"), optional(row, input_field))
    return conversation(name, index, pair(prompt, required(row, reply_field), reply_field))


def conversation(
    name: str, index: int, turns: list[Turn], system: str | None = None, lang: str | None = None
) -> Conversation:
    """The Conversation of checked turns: alternating from a prompter, ending with an assistant, none blank.

    Message ids are "<name>:<record>:<turn>", unique within one source."""
    return Conversation(messages=_messages(name, index, turns, "assistant"), system=system, lang=lang)


def comparison(
    name: str, index: int, prefix: list[Turn], replies: list[Turn], system: str | None = None, lang: str | None = None
) -> Comparison:
    """The Comparison of checked turns: `prefix` alternating from a prompter and ending with one, and at least two
    different, non-blank assistant `replies` to it, best first."""
    if len(replies) < 2:
        raise InvalidRecord(f"{len(replies)} ranked repl{'y' if len(replies) == 1 else 'ies'}; a comparison needs at "
                            "least two")
    for turn in replies:
        if not turn.text.strip():
            raise InvalidRecord(f"{turn.where} is empty")
    texts = [turn.text.strip() for turn in replies]
    if len(set(texts)) < len(texts):
        raise InvalidRecord(f"{replies[0].where} and {replies[1].where} are the same text; there is no preference "
                            "between them to learn")
    return Comparison(_messages(name, index, prefix, "prompter"), tuple(t.text for t in replies), system, lang)


def _messages(name: str, index: int, turns: list[Turn], last_role: str) -> tuple[Message, ...]:
    """The messages of turns that alternate from a prompter, end with `last_role` and are none blank."""
    if not turns:
        raise InvalidRecord("no prompter/assistant turns")
    for number, turn in enumerate(turns):
        if turn.role != ROLES[number % 2]:
            raise InvalidRecord(
                f"{turn.where} is out of order: turns must alternate prompter/assistant, starting with a prompter"
            )
        if not turn.text.strip():
            raise InvalidRecord(f"{turn.where} is empty")
    if turns[-1].role != last_role:
        what = "a conversation must end with an assistant turn" if last_role == "assistant" else (
            "the conversation before the ranked replies must end with a prompter turn")
        raise InvalidRecord(f"{turns[-1].where} is last; {what}")
    return tuple(
        Message(role=turn.role, text=turn.text, message_id=f"{name}:{index}:{number}")
        for number, turn in enumerate(turns, start=1)
    )
