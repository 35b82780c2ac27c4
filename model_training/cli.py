"""The `trainer_sft.py` command line: which sections to merge, overrides, and the OpenAssistant flags."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from model_training.config import (
    ConfigError,
    TrainConfig,
    closest_name,
    load_config,
    parse_override,
    to_yaml,
)
from model_training.console import quiet_library_noise
from model_training.data.records import FileFormatError
from model_training.environment import apply_training_defaults
from model_training.layout import earlier_run
from model_training.run_folder import check_output_dir
from model_training.stages import STAGES

_CONFIG_KEYS = [f.name for f in fields(TrainConfig)]


@dataclass(frozen=True)
class TrainArgs:
    config: TrainConfig
    show_config: bool
    config_file: Path | None = None
    """--config_file: an input the run must not write over."""


def _parser(stage: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=STAGES[stage].command,
        description=f"{STAGES[stage].description} on DeepSpeed (or plain PyTorch: --no-deepspeed). Overrides: "
        "key=value (dotted keys for nested values) or --key value; every key is documented in "
        "model_training/config/schema.py.",
        allow_abbrev=False,
    )
    parser.add_argument("--configs", nargs="*", default=["defaults"], help="config sections to merge, in order")
    parser.add_argument("--config_file", type=Path, default=None,
                        help="a YAML file of sections to read instead of every configs/*.yaml")
    parser.add_argument("--show_config", action="store_true", help="print the merged config as YAML and exit")
    # The flags users of the OpenAssistant trainer know; each one is a config key.
    parser.add_argument("--deepspeed", action=argparse.BooleanOptionalAction, default=None,
                        help="train on DeepSpeed (the default); --no-deepspeed: plain PyTorch, one process or DDP")
    parser.add_argument("--local_rank", type=int, default=None, help="set by launchers")
    parser.add_argument(
        "--resume_from_checkpoint",
        nargs="?",
        const="latest",
        default=None,
        help="continue from the newest complete checkpoint in output_dir, or from the folder given; auto: the "
        "newest one when output_dir holds one, else start (the same command for a first start and every requeue)",
    )
    parser.add_argument("--wandb-entity", dest="wandb_entity", default=None, help="Weights & Biases entity")
    parser.add_argument("--rng_seed", type=int, default=None, help="seed of weights, dropout and data order")
    parser.add_argument(
        "--show_dataset_stats", action="store_true", default=None, help="print dataset statistics and exit"
    )
    parser.add_argument("--prepare_only", action="store_true", default=None,
                        help="prepare the datasets' token stores (data_cache_dir), say what was stored, and exit")
    return parser


_FLAG_KEYS = ("deepspeed", "local_rank", "resume_from_checkpoint", "wandb_entity", "rng_seed", "show_dataset_stats",
              "prepare_only")


def _split_overrides(tokens: list[str]) -> list[tuple[str, Any]]:
    """`key=value` and `--key value` / `--key=value` tokens -> (key, value); anything else is an error."""
    overrides = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token.startswith("--"):
            name, sep, value = token[2:].partition("=")
            key = name.replace("-", "_")
            if key.split(".")[0] not in _CONFIG_KEYS:
                raise ConfigError(f"unknown option '--{name}' on the command line{closest_name(key, _CONFIG_KEYS)}")
            if not sep:
                if i + 1 >= len(tokens) or tokens[i + 1].startswith("--"):
                    raise ConfigError(f"option '--{name}' needs a value")
                i += 1
                value = tokens[i]
            overrides.append(parse_override(f"{key}={value}"))
        elif "=" in token:
            overrides.append(parse_override(token))
        else:
            raise ConfigError(f"unexpected argument '{token}' on the command line; overrides look like key=value")
        i += 1
    return overrides


def _names_a_config_key(token: str | None) -> bool:
    key, sep, _ = (token or "").partition("=")
    return bool(sep) and key.split(".")[0] in _CONFIG_KEYS


def parse_train_args(argv: list[str], stage: str = "sft") -> TrainArgs:
    """The merged, validated config of `stage`'s command line; raises ConfigError on any user mistake, and when the
    sections name another stage (`stage` key)."""
    args, rest = _parser(stage).parse_known_args(argv)
    # `--configs a b key=value` reads naturally; argparse would take key=value as a section name.
    sections = [name for name in args.configs if "=" not in name]
    rest = [name for name in args.configs if "=" in name] + rest
    # A bare `--resume_from_checkpoint max_length=32` would resume from a folder named "max_length=32";
    # an override that names a config key is an override, and the flag means the newest checkpoint.
    if _names_a_config_key(args.resume_from_checkpoint):
        rest.append(args.resume_from_checkpoint)
        args.resume_from_checkpoint = "latest"
    overrides = _split_overrides(rest)
    overrides += [(key, getattr(args, key)) for key in _FLAG_KEYS if getattr(args, key) is not None]
    config = load_config(sections, overrides, config_file=args.config_file, stage=stage)
    return TrainArgs(config=config, show_config=args.show_config, config_file=args.config_file)


def report_user_error(err: Exception, quiet: bool = False) -> int:
    """One line on stderr and exit status 2: the user's input was wrong, the message says where. `quiet`: exit 2
    without the line, which another process prints."""
    if not quiet:
        print(f"error: {err}", file=sys.stderr)
    return 2


QUIET_RANK_GRACE = 10.0
"""Seconds a rank other than 0 waits before exiting on a user error found before any process group, for rank 0 to
print its line."""


def main_train(argv: list[str], stage: str = "sft") -> int:
    """`trainer_sft.py` (or the command of another `stage`): parse, then print the config, print dataset
    statistics, or train."""
    quiet_library_noise()
    if _launcher_rank() != 0:
        # Every rank reads the same config; its warnings (OpenAssistant keys without effect) are rank 0's to say.
        logging.getLogger("model_training.config").setLevel(logging.ERROR)
    try:
        args = parse_train_args(argv, stage)
        if args.show_config:
            print(to_yaml(args.config), end="")
            return 0
        if args.config.show_dataset_stats:
            return _show_dataset_stats(args.config)
        if args.config.prepare_only:
            return _prepare_only(args.config)
        _check_writable_folder(Path(args.config.output_dir), "output_dir")
        check_output_dir(args.config, args.config_file)
        resolve_auto_resume(args.config)
        if args.config.deepspeed:
            # Here, not in the config's checks: DeepSpeed takes seconds to import, which --show_config must not.
            from model_training.training.ds_config import check_deepspeed_json

            check_deepspeed_json(args.config)
        if args.config.model_config is not None:
            from model_training.models.builder import model_config

            model_config(args.config)
    except (ConfigError, FileFormatError) as err:
        # No process group yet: every rank checks the same inputs and fails alike, so rank 0 alone says why. A launcher
        # kills every rank once one has exited: a quiet rank that got here first would take rank 0 down before it
        # says why (the last checks import DeepSpeed and transformers, seconds apart from rank to rank).
        if _launcher_rank() != 0:
            time.sleep(QUIET_RANK_GRACE)
        return report_user_error(err, quiet=_launcher_rank() != 0)
    applied = apply_training_defaults()
    if applied and _launcher_rank() == 0:
        print(f"environment: {' '.join(applied)} (scripts/setup_env.sh's defaults; export a value to choose another)",
              file=sys.stderr)
    # Imported here: DeepSpeed and torch.distributed take seconds to import, and the two modes above
    # must answer without them.
    from model_training.export.export import export_start_model
    from model_training.training.distributed import part_together
    from model_training.training.run import run_or_exit

    # The exporter goes in from here: a run may start from an earlier run's checkpoint, and training/ does not import
    # export/ (training/start.py).
    try:
        return run_or_exit(args.config, lambda cfg: STAGES[cfg.stage].call("recipe", cfg, export_start_model))
    except (ConfigError, FileFormatError) as err:
        # Every rank found the same mistake (a resume that does not fit, a model the config cannot build): rank 0 says
        # it, then they leave together.
        status = report_user_error(err, quiet=_launcher_rank() != 0)
        part_together()
        return status


AUTO_RESUME = "auto"
"""`resume_from_checkpoint: auto`: resume when output_dir holds a checkpoint, start when it holds no run."""


def resolve_auto_resume(cfg: TrainConfig) -> None:
    """`resume_from_checkpoint: auto` becomes "latest" when output_dir holds a complete checkpoint (its manifest and
    file sizes check out; the resume checks the hashes), or null (a new run) when it holds no run at all; an earlier
    run without such a checkpoint is refused as a new run would be. Decided from the files alone, before any process
    group: every rank sees the same folder and decides alike."""
    if cfg.resume_from_checkpoint != AUTO_RESUME:
        return
    from model_training.checkpoints.read import CheckpointError, resolve_checkpoint

    output_dir = Path(cfg.output_dir)
    try:
        resolve_checkpoint("latest", output_dir)
    except CheckpointError as err:
        found = earlier_run(output_dir)
        if found:
            raise ConfigError(
                f"key 'resume_from_checkpoint' is auto, but output_dir '{cfg.output_dir}' holds an earlier run "
                f"({', '.join(found[:4])}) and no checkpoint to resume: {err}; resume a checkpoint by its path, choose "
                "another output_dir, or set overwrite_output_dir=true to replace it"
            ) from None
        cfg.resume_from_checkpoint = None
        return
    cfg.resume_from_checkpoint = "latest"


def _launcher_rank() -> int:
    """The global rank the launcher gave this process (torchrun and deepspeed: RANK; srun: SLURM_PROCID)."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def _check_writable_folder(folder: Path, key: str) -> None:
    """ConfigError unless `folder` is a folder this process can write into, or one it can create, checked before
    any process group starts: a run that cannot save must not get that far. Creates nothing."""
    existing = folder.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"key '{key}' is '{folder}', but {existing} is a file; expected a folder, or a path where "
                          "one can be created")
    try:
        # An unnamed file where the OS allows it (O_TMPFILE), else one removed at once: nothing is left behind.
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise ConfigError(f"key '{key}' is '{folder}', but {existing} cannot be written ({err.strerror}); expected "
                          "a folder this user can write") from None


def _show_dataset_stats(cfg: TrainConfig) -> int:
    """`--show_dataset_stats`: the stage's table of its data (stages.py: `stats`)."""
    print(STAGES[cfg.stage].call("stats", cfg, _stats_tokenizer(cfg)))
    return 0


def _prepare_only(cfg: TrainConfig) -> int:
    """`--prepare_only`: every dataset's token store, prepared (or found), one line each."""
    if cfg.data_cache_dir is None:
        raise ConfigError("key 'data_cache_dir' is null, so nothing prepared would be kept; set it to the folder the "
                          "training job will read")
    stage = STAGES[cfg.stage]
    data = stage.call("prepare", cfg, _stats_tokenizer(cfg))
    if _launcher_rank() != 0:  # several processes prepared together (srun, a launcher): one says what they did
        return 0
    if data is None:
        print(f"nothing to prepare: {stage.command} reads its data at each start (ppo.prompt_file)")
        return 0
    total = 0
    for train, val, cached in zip(data.train, data.val, data.cached, strict=True):
        store = train.samples.store
        size = sum(p.stat().st_size for p in store.folder.iterdir())
        total += size
        print(f"{train.name}: {'found' if cached else 'prepared'} {store.folder}  {len(train.samples)} train + "
              f"{len(val.samples)} validation {stage.unit}, {len(store.ids)} tokens, {size / 1e6:.1f} MB "
              f"({size / max(len(store.ids), 1):.2f} bytes a token)")
    print(f"{len(data.train)} token stores in {Path(cfg.data_cache_dir).expanduser()}, {total / 1e6:.1f} MB")
    return 0


def _stats_tokenizer(cfg: TrainConfig) -> Any:
    """The run's tokenizer, without exporting anything (start.tokenizer_config)."""
    from model_training.models.builder import load_tokenizer
    from model_training.training.start import tokenizer_config

    return load_tokenizer(tokenizer_config(cfg))


def sample_stats(cfg: TrainConfig, tokenizer: Any) -> str:
    """SFT's `--show_dataset_stats`: each dataset's samples, tokens and lengths, and what an epoch draws of it."""
    from model_training.data.prepare import prepare_data
    from model_training.data.stats import format_stats
    from model_training.training.step_plan import plan_sources

    data = prepare_data(cfg, tokenizer)
    draws = plan_sources([s.name for s in data.train], [len(s.samples) for s in data.train], data.options)
    return format_stats(data, [d.per_epoch for d in draws], cfg.max_length, cfg.val_max_length or cfg.max_length)


def preference_stats(cfg: TrainConfig, tokenizer: Any) -> str:
    """The reward model's and DPO's `--show_dataset_stats`: each dataset's comparison groups, pairs and tokens."""
    from model_training.data.preferences import prepare_preferences

    data = prepare_preferences(cfg, tokenizer)
    lines = [f"{'dataset':<24} {'side':<6} {'groups':>8} {'pairs':>8} {'tokens':>10} {'cut':>6}"]
    for train, val in zip(data.train, data.val, strict=True):
        for side, split in (("train", train), ("val", val)):
            pairs = sum(g.loss_units for g in split.samples)
            tokens = sum(g.num_tokens for g in split.samples)
            lines.append(f"{split.name:<24} {side:<6} {len(split.samples):>8} {pairs:>8} {tokens:>10} "
                         f"{split.truncated:>6}")
    return "\n".join(lines)


def prompt_stats(cfg: TrainConfig, tokenizer: Any) -> str:
    """trainer_rl.py's `--show_dataset_stats`: how many prompts, and their lengths against the limit."""
    from model_training.data.prompts import load_prompts

    lengths = sorted(len(p.input_ids) for p in load_prompts(cfg, tokenizer))
    return (f"prompts {len(lengths)}, tokens: min {lengths[0]}, median {lengths[len(lengths) // 2]}, max "
            f"{lengths[-1]} (limit {cfg.ppo.max_prompt_length})")


def exit_process(status: int) -> None:
    """Exit without running C++ static destructors, once all Python-side work is flushed.

    After a ZeRO-3 run on CPU ranks, the teardown of native threads at interpreter exit sometimes aborts
    ("terminate called without an active exception") and turns a finished run's status into 250 or -6.
    Everything a run writes is closed by now (checkpoints are fsynced, metrics and wandb closed).
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
