"""The training configuration: a typed schema, named sections merged in order, command-line overrides.

`TrainConfig` (schema.py) is the user's manual: every key, its type, its default and one line on what it does.
`configs/config.yaml` holds named sections; `--configs defaults falcon-7b oasst-top1` starts from the
schema's defaults and merges each section in order (later wins; nested mappings merge, lists replace), then
the command line's `key=value` overrides. Every user mistake becomes a `ConfigError` whose message names the
key, where it came from and the closest valid name; the CLI turns it into exit status 2, never a traceback.

Paths: inputs (the DeepSpeed config, `data_dir`, a local tokenizer or model folder) given relative resolve
against the project root, so a run does not depend on the working directory; a relative dataset file is looked
up in `cache_dir` (when set, as the OpenAssistant trainer reads its datasets there), then in `data_dir`. Outputs
(`output_dir`, `log_dir`) and `cache_dir` are relative to the working directory, as users expect.

`model_name` and `tokenizer_name` are hub ids when they have a hub id's form, `name` or `owner/name`, and
are local folders otherwise: anything that starts with `/`, `.` or `~`, ends with `/` or has a second `/`,
and any name whose first part is a file or folder under the project root (`data/tokenizr` is the folder
`data/` and a typo, never a hub id). A local folder must exist when the config is validated.

The package, bottom to top: datasets.py (the typed `datasets` entries), schema.py (the dataclasses, the project's
folders), checks.py (`validate`: what the types cannot express), loading.py (reading and merging sections and
overrides, then the checks); `ConfigError` and its message helpers are model_training/errors.py's. Import from here:
these re-exports are the package's interface.
"""

from model_training.config.checks import TOKENIZER_FILES, optimizer_offloaded, read_deepspeed_json, zero_stage
from model_training.config.loading import (
    load_config,
    parse_override,
    read_config_folder,
    read_run_config,
    read_sections,
)
from model_training.config.schema import (
    DEFAULT_CONFIG_FILE,
    PROJECT_ROOT,
    DpoConfig,
    GrpoConfig,
    PeftConfig,
    PpoConfig,
    QuantizationConfig,
    TrainConfig,
    resolve_input_path,
    to_yaml,
)
from model_training.errors import ConfigError, closest_name, first_line
from model_training.hub import is_hub_id

__all__ = [
    "DEFAULT_CONFIG_FILE",
    "PROJECT_ROOT",
    "TOKENIZER_FILES",
    "ConfigError",
    "DpoConfig",
    "GrpoConfig",
    "PeftConfig",
    "PpoConfig",
    "QuantizationConfig",
    "TrainConfig",
    "closest_name",
    "first_line",
    "is_hub_id",
    "load_config",
    "optimizer_offloaded",
    "parse_override",
    "read_config_folder",
    "read_deepspeed_json",
    "read_run_config",
    "read_sections",
    "resolve_input_path",
    "to_yaml",
    "zero_stage",
]
