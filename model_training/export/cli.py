"""The `export_model.py` command line, compatible with the OpenAssistant exporter's flags."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn, TypeVar

from model_training.checkpoints.read import CheckpointError, run_folder
from model_training.console import quiet_library_noise
from model_training.export.export import (
    ExportError,
    OutputFolderNotEmptyError,
    check_upload_as_is,
    export_model,
    is_model_folder,
    parse_dtype,
)
from model_training.export.hub import UploadError, repo_folder_name, upload_folder
from model_training.export.writer import parse_size

PROG = "export_model.py"
BAD_INPUT = 2
UPLOAD_FAILED = 1
DEFAULT_DTYPE = "bf16"
DEFAULT_SHARD_SIZE = "2GB"
T = TypeVar("T")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, like every other input error of this command (the default adds the usage text).
        self.exit(BAD_INPUT, f"{self.prog}: error: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Export a training checkpoint (or a Hugging Face model folder) as a Hugging Face model "
        "folder: safetensors shards, config, generation config and the chat tokenizer.",
        allow_abbrev=False,
    )
    parser.add_argument(
        "checkpoint", type=Path,
        help="a run's output_dir (its newest complete checkpoint), one checkpoint-<step> folder, or a Hugging "
        "Face model folder (uploaded as it is when no --output_folder is given)",
    )
    # None when not given: a model folder uploaded as it is is only checked against the values given.
    parser.add_argument("--dtype", help=f"bf16, fp16 or fp32; default {DEFAULT_DTYPE}")
    parser.add_argument("--output_folder", type=Path,
                        help="where to write the model folder; default with --hf_repo_name: the repository's name "
                        "inside the run folder")
    parser.add_argument("--max_shard_size",
                        help="largest weight file (tensor bytes): 500MB, 1.5GB (powers of 1000), 2GiB; default "
                        f"{DEFAULT_SHARD_SIZE}")
    parser.add_argument("--hf_repo_name", help="also upload the folder to this Hugging Face Hub repository")
    parser.add_argument("--auth_token", help="Hub token (default: HF_TOKEN or a saved login; the variable keeps "
                        "it out of the process list)")
    parser.add_argument("--trust_remote_code", action="store_true", help="allow model code from the model folder")
    parser.add_argument("--cache_dir", type=Path, help="Hugging Face cache folder")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    parser.add_argument("--merge_adapter", action="store_true",
                        help="LoRA checkpoints: write the base with the adapter merged in (default: the adapter alone)")
    parser.add_argument("--base_model", help="LoRA checkpoints: the base to merge into (hub id or folder), instead of "
                        "the one the checkpoint names")
    parser.add_argument("--allow_older", action="store_true",
                        help="a run folder whose newest checkpoint is damaged: export the newest whole one instead "
                        "of refusing")
    parser.add_argument("--skip_hash_check", action="store_true",
                        help="do not check each file of the checkpoint against its manifest's hash (faster; a "
                        "corrupted file then goes into the export unnoticed)")
    return parser


def main_export(argv: list[str]) -> int:
    """Run the exporter; 0 on success, 2 for input that cannot be exported, 1 when the upload fails."""
    parser = _parser()
    args = parser.parse_args(_join_dashed_values(parser, argv))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    quiet_library_noise()
    try:
        folder = _model_folder(args)
        if args.hf_repo_name is not None:
            print(f"uploaded {folder} to {upload_folder(folder, args.hf_repo_name, args.auth_token)}")
    except OutputFolderNotEmptyError as exc:
        # Most likely the same command again after a failed upload: what is there may need no new export.
        if args.hf_repo_name is None or not is_model_folder(exc.folder):
            return _fail(BAD_INPUT, exc)
        return _fail(BAD_INPUT, f"{exc}, or upload it as it is with: {_upload_command(exc.folder, args)}")
    except (ExportError, CheckpointError) as exc:
        return _fail(BAD_INPUT, exc)
    except UploadError as exc:
        # The export is kept: one command uploads it again, without exporting it again.
        again = _upload_command(folder, args)
        return _fail(UPLOAD_FAILED, f"{str(exc).rstrip('.')}; {folder} is complete, upload it again with: {again}")
    return 0


def _join_dashed_values(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """`--max_shard_size -5GB` as `--max_shard_size=-5GB`: argparse takes a value that starts with "-" for an
    unknown option and says only "expected one argument"; joined, the value reaches its own check, which says
    what is wrong with it. A next token that is one of the command's options stays an option."""
    takes_value = {flag for action in parser._actions if action.nargs is None and action.option_strings
                   for flag in action.option_strings}
    joined: list[str] = []
    tokens = iter(argv)
    for token in tokens:
        value = next(tokens, None) if token in takes_value else None
        if value is None:
            joined.append(token)
        elif value.startswith("-") and value.split("=")[0] not in parser._option_string_actions:
            joined.append(f"{token}={value}")
        else:
            joined += [token, value]
    return joined


def _model_folder(args: argparse.Namespace) -> Path:
    """The folder to upload or keep: the input itself when it is a model folder to upload as it is, else the
    export of the input into --output_folder, or without it into the repository's name in the run folder."""
    dtype = _parsed("--dtype", parse_dtype, args.dtype)
    max_shard_size = _parsed("--max_shard_size", parse_size, args.max_shard_size)
    name = _parsed("--hf_repo_name", repo_folder_name, args.hf_repo_name)  # before an export of maybe an hour
    folder = args.output_folder
    if folder is None:
        if name is None:
            raise ExportError("give --output_folder, --hf_repo_name or both")
        # --merge_adapter on a model folder goes on to export_model, which refuses it.
        if is_model_folder(args.checkpoint) and not args.merge_adapter:
            check_upload_as_is(args.checkpoint, dtype, max_shard_size)
            return args.checkpoint
        folder = run_folder(args.checkpoint.absolute()) / name
    export_model(
        args.checkpoint, folder, parse_dtype(args.dtype or DEFAULT_DTYPE),
        parse_size(args.max_shard_size or DEFAULT_SHARD_SIZE),
        trust_remote_code=args.trust_remote_code, cache_dir=args.cache_dir, overwrite=args.overwrite,
        merge_adapter=args.merge_adapter, base_model=args.base_model, allow_older=args.allow_older,
        check_hashes=not args.skip_hash_check,
    )
    print(f"exported {args.checkpoint} to {folder}")
    return folder


def _parsed(flag: str, parse: Callable[[str], T], value: str | None) -> T | None:
    """``parse(value)``, None for a flag not given; the error of a value that does not parse names the flag."""
    if value is None:
        return None
    try:
        return parse(value)
    except ValueError as exc:
        raise ExportError(f"{flag}: {exc}") from exc


def _upload_command(folder: Path, args: argparse.Namespace) -> str:
    """The command that uploads ``folder`` as it is; a placeholder stands for a token given on the command line."""
    command = shlex.join(["python", PROG, str(folder.absolute()), "--hf_repo_name", args.hf_repo_name])
    return command + (" --auth_token <token>" if args.auth_token else "")


def _fail(status: int, error: Exception | str) -> int:
    print(f"{PROG}: error: {' '.join(str(error).split())}", file=sys.stderr)
    return status
