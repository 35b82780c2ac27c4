"""Reading a config: named sections from `configs/*.yaml`, merged in order onto the schema's defaults, then the
command line's overrides, typed and checked.

`load_config` is the way in (the CLI's); `read_run_config` reads back the config a run saved. Merging goes through
OmegaConf on the schema (schema.py), whose errors become `ConfigError`s that name the key and where it was set;
the result is checked by checks.py's `validate`. The top of the package: it imports schema.py and checks.py.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from model_training import openassistant_keys
from model_training.config.checks import validate
from model_training.config.datasets import DATASET_KEYS, merge_checked, parse_dataset_specs
from model_training.config.schema import CONFIG_DIR, PROJECT_ROOT, TrainConfig
from model_training.errors import ConfigError, closest_name, first_line
from model_training.stages import STAGES

logger = logging.getLogger(__name__)


class _YamlLoader(yaml.SafeLoader):
    """YAML as users mean it (YAML 1.2's scalars): `1e-5` is a float, and only true/false are booleans, so
    `save_strategy: no` stays the string "no" (YAML 1.1 reads yes/no/on/off as booleans)."""


_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def read_sections(config_file: Path) -> dict[str, Any]:
    """The named sections of a config file, as plain mappings."""
    try:
        with open(config_file, encoding="utf-8") as f:
            sections = yaml.load(f, Loader=_YamlLoader)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {config_file}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{config_file} is not valid YAML: {err}") from None
    if sections is None:
        return {}
    if not isinstance(sections, dict) or not all(isinstance(v, dict) for v in sections.values()):
        raise ConfigError(f"{config_file} must be a mapping of section names to mappings of keys")
    return sections


def read_config_folder(folder: Path = CONFIG_DIR) -> dict[str, tuple[dict[str, Any], Path]]:
    """Every section of every `*.yaml` in `folder` (as the OpenAssistant trainer reads its configs/), with the
    file it came from; a section defined in two files is an error that names both."""
    found: dict[str, tuple[dict[str, Any], Path]] = {}
    for config_file in sorted(folder.glob("*.yaml")):
        for name, section in read_sections(config_file).items():
            if name in found:
                raise ConfigError(f"config section '{name}' is defined twice: in {_display_path(found[name][1])} "
                                  f"and in {_display_path(config_file)}; rename one of them")
            found[name] = (section, config_file)
    return found


def _display_path(path: Path) -> str:
    """Paths in messages as the user would type them: relative to the project root when inside it."""
    try:
        return str(Path(path).resolve().relative_to(PROJECT_ROOT))
    except ValueError:
        return str(path)


def parse_override(item: str) -> tuple[str, Any]:
    """`key=value` (dotted keys reach nested values) -> (key, value parsed as YAML, so `1e-5` is a float).

    A value that YAML cannot parse is taken as a plain string (a prompt such as `What is: this?`), unless it
    opens with YAML syntax (`[`, `{` or a quote): then the user meant YAML, and the error says where it broke."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"command-line override '{item}' must look like key=value")
    try:
        value = yaml.load(raw, Loader=_YamlLoader) if raw else ""
    except yaml.YAMLError as err:
        if not raw.lstrip().startswith(("[", "{", '"', "'")):
            return key.strip(), raw
        mark = getattr(err, "problem_mark", None)
        where = f" at column {len(key) + 2 + mark.column} of the override" if mark else ""
        problem = getattr(err, "problem", None) or first_line(err)
        raise ConfigError(f"command-line override '{item}' is not valid YAML: {problem}{where}") from None
    return key.strip(), value


def _nest(dotted_key: str, value: Any) -> dict[str, Any]:
    node: Any = value
    for part in reversed(dotted_key.split(".")):
        node = {part: node}
    return node


def load_config(
    section_names: list[str],
    overrides: list[tuple[str, Any]] | None = None,
    config_file: Path | None = None,
    stage: str = "sft",
) -> TrainConfig:
    """Merge the schema's defaults, the named sections in order, then the overrides, and validate, for the command
    of `stage`: a config whose `stage` names another is refused, one without takes `stage`.

    The sections come from every `configs/*.yaml`, or from `config_file` alone. OpenAssistant trainer keys the
    schema lacks are read or dropped with one warning each (model_training/openassistant_keys.py).
    """
    if config_file is None:
        sections = read_config_folder()
    else:
        sections = {name: (section, config_file) for name, section in read_sections(config_file).items()}
    shown = _display_path(config_file) if config_file else f"{_display_path(CONFIG_DIR)}/*.yaml"
    if not section_names:
        raise ConfigError(f"no config section given; --configs takes section names first (then key=value "
                          f"overrides), from those in {shown}: {', '.join(sections)}")
    merged = OmegaConf.structured(TrainConfig)
    warnings: dict[str, str] = {}
    origins: dict[str, str] = {}  # dataset list key -> where it was set, for `parse_dataset_specs`'s messages
    for name in section_names:
        if name not in sections:
            raise ConfigError(f"unknown config section '{name}' in {shown}{closest_name(name, list(sections))}")
        section, origin = sections[name]
        where = f"in section '{name}' of {_display_path(origin)}"
        section = openassistant_keys.translate(section, where, warnings)
        merged = merge_checked(merged, section, TrainConfig, where, unlisted=TrainConfig)
        # Lists replace: the last section that sets a dataset list is where its mistakes are.
        origins.update({key: f" {where}" for key in DATASET_KEYS if key in section})
    for key, value in overrides or []:
        override = openassistant_keys.translate(_nest(key, value), "on the command line", warnings)
        merged = merge_checked(merged, override, TrainConfig, "on the command line", unlisted=TrainConfig)
        origins.update({name: "" for name in DATASET_KEYS if name in override})
    for message in warnings.values():
        logger.warning("%s", message)
    cfg: TrainConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    if cfg.stage not in (None, stage) and cfg.stage in STAGES:
        raise ConfigError(f"key 'stage' is {cfg.stage!r}: this config trains with {STAGES[cfg.stage].command}, not "
                          f"{STAGES[stage].command}")
    cfg.stage = cfg.stage or stage
    cfg.dataset_specs = parse_dataset_specs(cfg, origins)
    validate(cfg)
    return cfg


def read_run_config(path: Path) -> TrainConfig:
    """The merged config a run saved (its `config.yaml`), typed; ConfigError when it does not fit the schema."""
    try:
        saved = OmegaConf.load(path)
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read the run config {path}: {err}") from None
    merged = merge_checked(OmegaConf.structured(TrainConfig), saved, TrainConfig, f"in {path}", unlisted=TrainConfig)
    return OmegaConf.to_object(merged)  # type: ignore[return-value]
