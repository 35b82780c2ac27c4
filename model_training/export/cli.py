"""The `export_model.py` command line, compatible with the OpenAssistant exporter's flags."""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path
from typing import NoReturn

from model_training.export.export import ExportError, export_model, parse_dtype
from model_training.export.hub import UploadError, upload_folder
from model_training.export.writer import parse_size
from model_training.training.checkpoint import CheckpointError

PROG = "export_model.py"
BAD_INPUT = 2
UPLOAD_FAILED = 1


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
        "Face model folder",
    )
    parser.add_argument("--dtype", default="bf16", help="bf16 (default), fp16 or fp32")
    parser.add_argument("--output_folder", type=Path, help="where to write the model folder")
    parser.add_argument("--max_shard_size", default="2GB",
                        help="largest weight file (tensor bytes): 500MB, 1.5GB (powers of 1000), 2GiB; default 2GB")
    parser.add_argument("--hf_repo_name", help="also upload the folder to this Hugging Face Hub repository")
    parser.add_argument("--auth_token", help="Hub token (default: HF_TOKEN or a saved login; the variable keeps "
                        "it out of the process list)")
    parser.add_argument("--trust_remote_code", action="store_true", help="allow model code from the model folder")
    parser.add_argument("--cache_dir", type=Path, help="Hugging Face cache folder")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output_folder")
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
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        dtype = parse_dtype(args.dtype)
        try:
            max_shard_size = parse_size(args.max_shard_size)
        except ValueError as exc:
            raise ExportError(f"--max_shard_size: {exc}") from exc
        if args.output_folder is None and args.hf_repo_name is None:
            raise ExportError("give --output_folder, --hf_repo_name or both")
        # Without --output_folder the folder is built in a temporary place, uploaded, then deleted.
        with tempfile.TemporaryDirectory(prefix="export-") as scratch:
            folder = args.output_folder or Path(scratch) / "model"
            export_model(
                args.checkpoint, folder, dtype, max_shard_size,
                trust_remote_code=args.trust_remote_code, cache_dir=args.cache_dir, overwrite=args.overwrite,
                merge_adapter=args.merge_adapter, base_model=args.base_model, allow_older=args.allow_older,
                check_hashes=not args.skip_hash_check,
            )
            if args.output_folder is not None:
                print(f"exported {args.checkpoint} to {folder}")
            if args.hf_repo_name is not None:
                print(f"uploaded to {upload_folder(folder, args.hf_repo_name, args.auth_token)}")
    except (ExportError, CheckpointError) as exc:
        return _fail(BAD_INPUT, exc)
    except UploadError as exc:
        return _fail(UPLOAD_FAILED, exc)
    return 0


def _fail(status: int, error: Exception) -> int:
    print(f"{PROG}: error: {' '.join(str(error).split())}", file=sys.stderr)
    return status
