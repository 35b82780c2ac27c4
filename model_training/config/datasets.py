"""The typed entries of `datasets` and `datasets_extra`, and the merge that names the key a user got wrong.

Each entry is a source's name from `SOURCES` (model_training/data/sources/) with options merged onto that source's
schema; `parse_dataset_specs` types and checks them, and schema.py's `TrainConfig.dataset_specs` holds the result.
`merge_checked` is also how loading.py merges the sections and overrides onto `TrainConfig`. This module sits below
schema.py, which imports it.
"""

from __future__ import annotations

from dataclasses import fields, is_dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from model_training.data.sources import SOURCES
from model_training.data.sources.common import DatasetConfig
from model_training.errors import ConfigError, closest_name

if TYPE_CHECKING:  # schema.py imports this module
    from model_training.config.schema import TrainConfig


class DatasetSpec(NamedTuple):
    """One entry of `datasets` (or `datasets_extra`), typed: its source's name and its options (the source's
    schema, model_training/data/sources/)."""

    name: str
    options: DatasetConfig


def _describe_omegaconf_error(err: OmegaConfBaseException, schema: type, where: str, unlisted: type | None) -> str:
    key = getattr(err, "full_key", None) or "?"
    if isinstance(err, ConfigKeyError):
        *parents, leaf = str(key).split(".")
        for parent in parents:  # a nested section (peft.r): suggest among that section's keys
            nested = next((f.default_factory for f in fields(schema) if f.name == parent), None)
            schema = nested if is_dataclass(nested) else schema
        valid = [f.name for f in fields(schema)]
        # A dataset's options or a nested section have few keys: all of them fit on the line, and a user who guessed
        # a name ('path') sees the real one. The top level's hundred keys would not (`unlisted`); schema.py lists them.
        suggestion = closest_name(leaf, valid)
        listed = "" if schema is unlisted else f"{' V' if suggestion else '; v'}alid keys: {', '.join(valid)}"
        return f"unknown key '{key}' {where}{suggestion}{listed}"
    # OmegaConf's message is several lines with internals; its first line says what was wrong with the value.
    reason = str(getattr(err, "msg", err)).splitlines()[0]
    return f"bad value for key '{key}' {where}: {reason}"


def merge_checked(base: Any, update: Any, schema: type, where: str, unlisted: type | None = None) -> Any:
    """`update` merged onto `base` (a structured config of `schema`); ConfigError naming the key and `where` it was
    set when it does not fit, with the valid keys of its section unless that section is `unlisted` (too many)."""
    try:
        return OmegaConf.merge(base, update)
    except OmegaConfBaseException as err:
        raise ConfigError(_describe_omegaconf_error(err, schema, where, unlisted)) from None


DATASET_KEYS = ("datasets", "datasets_extra")


def parse_dataset_specs(cfg: TrainConfig, origins: dict[str, str]) -> list[DatasetSpec]:
    """`datasets` + `datasets_extra` as typed specs, each validated against its source's schema; `origins` says
    where each list was set (" in section 's' of FILE"; none: the command line), for the messages."""
    specs: list[DatasetSpec] = []
    for key in DATASET_KEYS:
        specs += _parse_dataset_entries(getattr(cfg, key), key, origins.get(key, ""))
    return specs


def _parse_dataset_entries(entries: Any, key: str, origin: str) -> list[DatasetSpec]:
    if not isinstance(entries, (list, tuple)) and not OmegaConf.is_list(entries):
        raise ConfigError(f"key '{key}'{origin} must be a list of datasets, got {entries!r}")
    specs = []
    for index, entry in enumerate(entries):
        where = f"{key}[{index}]{origin}"
        if OmegaConf.is_config(entry):
            entry = OmegaConf.to_container(entry)
        if isinstance(entry, str):
            name, options = entry, {}
        elif isinstance(entry, dict) and len(entry) == 1:
            name, options = next(iter(entry.items()))
            options = options or {}
        else:
            raise ConfigError(f"{where} must be a dataset name or {{name: {{options}}}}, got {entry!r}")
        if name not in SOURCES:
            raise ConfigError(
                f"unknown dataset '{name}' in {where}; known: {', '.join(SOURCES)}{closest_name(name, list(SOURCES))}"
            )
        schema = SOURCES[name].options
        if not isinstance(options, dict):
            raise ConfigError(f"options of dataset '{name}' in {where} must be a mapping, got {options!r}")
        merged = merge_checked(OmegaConf.structured(schema), options, schema, f"of dataset '{name}' in {where}")
        typed = OmegaConf.to_object(merged)
        validate_dataset(typed, f"dataset '{name}' in {where}")
        specs.append(DatasetSpec(name, typed))
    return specs


def validate_dataset(options: DatasetConfig, where: str) -> None:
    """The checks of one dataset's typed options that their types cannot express; `where` names the entry."""
    if not 0.0 <= options.val_split < 1.0:
        raise ConfigError(f"'val_split' of {where} must be in [0, 1), got {options.val_split}")
    chosen = [k for k in ("fraction", "size", "share") if getattr(options, k) is not None]
    if len(chosen) > 1:
        raise ConfigError(f"{where} sets {' and '.join(chosen)}; set at most one of fraction, size and share")
    if options.fraction is not None and options.fraction <= 0:
        raise ConfigError(f"'fraction' of {where} must be positive, got {options.fraction}")
    if options.size is not None and options.size < 1:
        raise ConfigError(f"'size' of {where} must be at least 1, got {options.size}")
    if options.share is not None and not 0.0 < options.share < 1.0:
        raise ConfigError(f"'share' of {where} must be in (0, 1), got {options.share}")
    if not options.input_file_path:
        raise ConfigError(f"{where} needs 'input_file_path'")
