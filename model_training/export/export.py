"""A training checkpoint (or a Hugging Face model folder) -> a Hugging Face model folder for inference.

The folder holds the weights as safetensors shards in the asked dtype, ``config.json`` (that dtype,
``use_cache`` back on), ``generation_config.json`` (eos and pad of the tokenizer) and the tokenizer with the
chat tokens and chat template, so that ``AutoTokenizer``/``pipeline("text-generation", model=folder)`` work
unchanged. A reward model's checkpoint (trainer_rm.py) becomes a ``*ForSequenceClassification`` folder with one
score, without a generation config: ``AutoModelForSequenceClassification`` loads it and scores a conversation
rendered by the shipped chat template. It is written into a hidden sibling folder and renamed into place at the
end: the output folder is complete or absent, never half-written.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import shutil
import struct
import time
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoTokenizer,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)

from model_training.checkpoints.read import (
    NewestCheckpointUnusable,
    checkpoint_bytes,
    resolve_checkpoint,
    run_folder,
    verify_checkpoint,
)
from model_training.checkpoints.zero import LazyTensor, ZeroCheckpointError, read_zero_checkpoint
from model_training.config import TOKENIZER_FILES, ConfigError, first_line, read_run_config
from model_training.console import ranks, size_text
from model_training.export.adapter import AdapterExportError, is_adapter_checkpoint, merged_model, write_adapter
from model_training.export.writer import WeightEntry, write_weights
from model_training.folders import hidden_sibling, replace_folder
from model_training.layout import MODEL_CONFIG_DIR, RUN_CONFIG, TOKENIZER_DIR, is_training_run
from model_training.models.dtypes import TORCH_DTYPES
from model_training.models.reward_head import auto_model_class
from model_training.run_folder import is_run_name

logger = logging.getLogger(__name__)

DTYPES = {**TORCH_DTYPES, "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
"""--dtype: the config's names and torch's."""
SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
"""How safetensors headers name the dtypes an export writes."""


class ExportError(ValueError):
    """The input cannot be exported as asked; the message says why."""


class OutputFolderNotEmptyError(ExportError):
    """The output folder holds files and replacing them was not asked for."""

    def __init__(self, folder: Path) -> None:
        super().__init__(f"the output folder {folder} exists and is not empty; pass --overwrite to replace it")
        self.folder = folder


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise ExportError(f"unknown dtype {name!r}: choose bf16, fp16 or fp32") from None


START_SHARD_SIZE = 5 * 2**30
"""The shards of a starting model's export (`export_start_model`): read once by the run, never shipped."""


def export_start_model(checkpoint: Path, target: Path, dtype: str) -> None:
    """The training checkpoint a run starts from, as the Hugging Face folder `target` it loads (training/start.py's
    `Exporter`, which the command line hands to the recipes); whatever `target` held is replaced."""
    export_model(checkpoint, target, TORCH_DTYPES[dtype], START_SHARD_SIZE, overwrite=True)


def export_model(
    source: Path,
    output_folder: Path,
    dtype: torch.dtype,
    max_shard_size: int,
    trust_remote_code: bool = False,
    cache_dir: Path | None = None,
    overwrite: bool = False,
    merge_adapter: bool = False,
    base_model: str | None = None,
    allow_older: bool = False,
    check_hashes: bool = True,
) -> Path:
    """Export ``source`` into ``output_folder``; return the folder.

    ``source``: a run folder (its newest complete checkpoint is taken), one ``checkpoint-<step>`` folder, or
    a Hugging Face model folder (config.json and weights), which is loaded and saved again. An existing
    ``output_folder`` must be empty unless ``overwrite``. A LoRA checkpoint gives the adapter alone (a peft
    folder), or with ``merge_adapter`` the base with the adapter merged in (``base_model`` overrides the base
    it names). A run folder whose newest checkpoint does not verify is refused unless ``allow_older``, which
    takes the newest that does. With ``check_hashes`` every file of the checkpoint must match the hash its
    manifest recorded. Raises ExportError (or CheckpointError) for input that cannot be exported; the output
    folder is then left as it was.
    """
    source, output_folder = Path(source), Path(output_folder)
    _check_output_folder(output_folder, source, overwrite)  # before the checkpoint's hashes: minutes at 40B
    checkpoint = None if is_model_folder(source) else _resolve(source, allow_older, check_hashes)
    if merge_adapter and (checkpoint is None or not is_adapter_checkpoint(checkpoint)):
        raise ExportError(f"--merge_adapter: {source} is not a LoRA checkpoint (it has no adapter/ folder)")

    output_folder.parent.mkdir(parents=True, exist_ok=True)
    _clear_leftovers(output_folder)
    partial = hidden_sibling(output_folder, "partial")
    partial.mkdir()
    try:
        if checkpoint is None:
            _resave_hf_folder(source, partial, dtype, max_shard_size, trust_remote_code, cache_dir)
        elif is_adapter_checkpoint(checkpoint):
            _export_lora_checkpoint(
                checkpoint, partial, dtype, max_shard_size, trust_remote_code, cache_dir, merge_adapter, base_model
            )
        else:
            _export_checkpoint(checkpoint, partial, dtype, max_shard_size, trust_remote_code)
        replace_folder(partial, output_folder, aside=hidden_sibling(output_folder, "replaced"))
    except BaseException as err:
        shutil.rmtree(partial, ignore_errors=True)
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            raise ExportError(_disk_full(output_folder, getattr(err, "needed", None))) from err
        raise
    return output_folder


def _disk_full(output_folder: Path, needed: int | None) -> str:
    """The one line of an export that filled the disk (its partial folder removed)."""
    free = shutil.disk_usage(output_folder.parent).free
    weights = f"its weights need {size_text(needed)}" if needed is not None else "it needs more than that"
    return (f"the disk of {output_folder.parent} is full: {size_text(free)} free once the partial export was "
            f"removed, and {weights}; free space there, or choose another --output_folder")


def is_model_folder(path: Path) -> bool:
    """A Hugging Face model folder (config.json beside the weights) rather than a run or checkpoint folder."""
    return (Path(path) / "config.json").is_file()


def check_upload_as_is(folder: Path, dtype: torch.dtype | None, max_shard_size: int | None) -> None:
    """Make sure the model folder ``folder`` needs no conversion to be uploaded; read only the weights' headers.

    Its safetensors weights (``model.safetensors``, or every shard its index names) must be whole, their
    floating-point tensors in ``dtype`` and every shard that holds more than one tensor within
    ``max_shard_size`` bytes of tensors, as an export writes them; None accepts any. Raises ExportError.
    """
    for shard in _weight_files(folder):
        floats, size, count = _shard_contents(shard)
        if dtype is not None and floats not in ([], [SAFETENSORS_DTYPES[dtype]]):
            raise ExportError(f"{shard} holds {'/'.join(floats)} weights, not {SAFETENSORS_DTYPES[dtype]}: give "
                              "--output_folder for a converted copy")
        if max_shard_size is not None and size > max_shard_size and count > 1:
            raise ExportError(f"{shard} holds {size} bytes of tensors, more than --max_shard_size: give "
                              "--output_folder for a copy in smaller shards")


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return [folder / "model.safetensors"]
    try:
        return [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    except (ValueError, LookupError, TypeError, AttributeError) as exc:
        raise ExportError(f"{index} is not a safetensors index ({type(exc).__name__}: {first_line(exc)})") from exc


def _shard_contents(shard: Path) -> tuple[list[str], int, int]:
    """The floating-point dtypes, the tensors' bytes and the number of tensors of a safetensors file, from its
    header; the file must be whole. The format: the header's length (8 bytes, little-endian), the header
    (JSON: each tensor's dtype, shape and data_offsets), then the tensors' bytes."""
    try:
        with open(shard, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(min(length, file_size)))
        header.pop("__metadata__", None)
        spans = [(start, end) for start, end in (t["data_offsets"] for t in header.values())]  # pairs, checked here
        floats = sorted({t["dtype"] for t in header.values() if t["dtype"].startswith(("F", "BF"))})
    except (OSError, ValueError, LookupError, TypeError, AttributeError, struct.error) as exc:
        raise ExportError(f"{shard} is not readable as safetensors weights ({first_line(exc)})") from exc
    covered = 8 + length + max((end for _, end in spans), default=0)
    if covered != file_size:
        raise ExportError(f"{shard} is incomplete: its header describes {covered} bytes, the file has {file_size}")
    return floats, sum(end - start for start, end in spans), len(spans)


def _resolve(source: Path, allow_older: bool, check_hashes: bool) -> Path:
    if not source.is_dir():
        raise ExportError(f"{source} does not exist or is not a folder")
    start = time.perf_counter()
    try:
        # With the hashes, --allow_older passes over a newest checkpoint whose files changed after the save too.
        checkpoint = resolve_checkpoint(source, source.parent, allow_older, check_hashes, _HASH_THREADS)
    except NewestCheckpointUnusable as err:
        raise ExportError(
            f"{err}; export an older checkpoint by naming its folder, or pass --allow_older to take the newest one "
            "that is whole"
        ) from None
    logger.info("exporting checkpoint %s", checkpoint)
    for needed in (MODEL_CONFIG_DIR, TOKENIZER_DIR):
        if not (checkpoint / needed).is_dir():
            raise ExportError(f"checkpoint {checkpoint} has no {needed}/ folder (was it saved by this trainer?)")
    if check_hashes:
        seconds, gigabytes = time.perf_counter() - start, checkpoint_bytes(checkpoint) / 1e9
        logger.info("every file matches its manifest's hash: %.2f GB in %.1f s (%.0f MB/s, %d threads)",
                    gigabytes, seconds, gigabytes * 1e3 / max(seconds, 1e-9), _HASH_THREADS)
    return checkpoint


_HASH_THREADS = 4
"""Files hashed side by side while verifying a checkpoint before its export."""


def _check_output_folder(output_folder: Path, source: Path, overwrite: bool) -> None:
    read = run_folder(source.absolute())
    if not is_model_folder(source) and (output_folder.absolute() == read or is_training_run(output_folder) or (
            output_folder.absolute().parent == read and is_run_name(output_folder.name))):
        raise ExportError(f"the output folder {output_folder} is a training run, one of its checkpoints or a file of "
                          f"the run {read} the export reads; choose a folder of its own")
    if not output_folder.exists():
        return
    if not output_folder.is_dir():
        raise ExportError(f"the output folder {output_folder} is a file")
    if source.resolve().is_relative_to(output_folder.resolve()):
        raise ExportError(f"the output folder {output_folder} holds the model to export; choose another folder")
    if any(output_folder.iterdir()) and not overwrite:
        raise OutputFolderNotEmptyError(output_folder)


def _clear_leftovers(output_folder: Path) -> None:
    """Remove what an earlier export into ``output_folder`` left when it was killed: its hidden partial and
    replaced siblings. Two exports into one folder at the same time are not supported."""
    for leftover in output_folder.parent.glob(f".{output_folder.name}.*-*"):
        if leftover.is_dir() and leftover.name.split(".")[-1].split("-")[0] in ("partial", "replaced"):
            logger.info("removing %s, left by an export that did not finish", leftover)
            shutil.rmtree(leftover)


def _open_checkpoint(
    checkpoint: Path, trust_remote_code: bool
) -> tuple[dict, PretrainedConfig, PreTrainedTokenizerBase]:
    """The verified manifest, the model's transformers config and the tokenizer that a checkpoint holds."""
    manifest = verify_checkpoint(checkpoint)
    config = AutoConfig.from_pretrained(checkpoint / MODEL_CONFIG_DIR, trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint / TOKENIZER_DIR, trust_remote_code=trust_remote_code)
    _check_vocabulary(config.vocab_size, len(tokenizer))
    return manifest, config, tokenizer


def _export_checkpoint(
    checkpoint: Path, folder: Path, dtype: torch.dtype, max_shard_size: int, trust_remote_code: bool
) -> None:
    manifest, config, tokenizer = _open_checkpoint(checkpoint, trust_remote_code)
    try:
        zero = read_zero_checkpoint(checkpoint / manifest["deepspeed_tag"])
    except ZeroCheckpointError as exc:
        raise ExportError(f"checkpoint {checkpoint}: {exc}") from exc
    shards = (f"ZeRO-{zero.zero_stage} shards of {ranks(zero.world_size)}" if zero.zero_stage
              else "plain PyTorch weights")
    logger.info("%s: %s", checkpoint, shards)

    entries, num_parameters, architecture = _weight_entries(config, zero.tensors, dtype, trust_remote_code)
    write_weights(folder, entries, max_shard_size, {"total_parameters": num_parameters})
    config.architectures = [architecture]
    _write_inference_files(folder, checkpoint, config, tokenizer, dtype)


def _write_inference_files(
    folder: Path, checkpoint: Path, config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase, dtype: torch.dtype
) -> None:
    """config.json set up for inference, generation_config.json and the chat tokenizer."""
    config.dtype = dtype
    config.use_cache = True  # training turned it off; generation needs the KV cache
    config.pad_token_id, config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    config.save_pretrained(folder)
    if (checkpoint / MODEL_CONFIG_DIR / "generation_config.json").is_file():  # a reward model has none
        generation = GenerationConfig.from_pretrained(checkpoint / MODEL_CONFIG_DIR)
        generation.pad_token_id, generation.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
        generation.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _export_lora_checkpoint(
    checkpoint: Path,
    folder: Path,
    dtype: torch.dtype,
    max_shard_size: int,
    trust_remote_code: bool,
    cache_dir: Path | None,
    merge: bool,
    base_model: str | None,
) -> None:
    """The adapter folder (tokenizer included), or with ``merge`` a full model folder like any export."""
    manifest, config, tokenizer = _open_checkpoint(checkpoint, trust_remote_code)
    try:
        run_config = read_run_config(checkpoint / RUN_CONFIG)
        zero = read_zero_checkpoint(checkpoint / manifest["deepspeed_tag"], trained_only=True)
        # Only the adapters: small enough to read whole.
        trained = {name: tensor.load(torch.float32) for name, tensor in zero.tensors.items()}
        if not merge:
            count = write_adapter(folder, checkpoint, config, trained, dtype, trust_remote_code)
            tokenizer.save_pretrained(folder)
            logger.info(
                "adapter: %d tensors; load it with base.resize_token_embeddings(%d), then "
                "PeftModel.from_pretrained(base, folder)", count, config.vocab_size,
            )
            return
        model = merged_model(checkpoint, run_config, config, trained, base_model, trust_remote_code, cache_dir)
    except (ZeroCheckpointError, AdapterExportError, ConfigError) as exc:
        raise ExportError(f"checkpoint {checkpoint}: {exc}") from exc
    model.to(dtype)
    _write_inference_files(folder, checkpoint, model.config, tokenizer, dtype)
    model.save_pretrained(folder, max_shard_size=max_shard_size)


def _weight_entries(
    config: PretrainedConfig, tensors: dict[str, LazyTensor], dtype: torch.dtype, trust_remote_code: bool
) -> tuple[list[WeightEntry], int, str]:
    """What to write, in the model's own order, checked against the model the config describes.

    The model is built on the meta device (no memory): its state dict names every tensor a load expects,
    with its shape. A name the model ties to an earlier one (lm_head to the embeddings) is left out, as
    save_pretrained does; transformers ties it again on load. Returns the entries, the model's parameter
    count and its class name.
    """
    with torch.device("meta"):
        model = auto_model_class(config).from_config(config, trust_remote_code=trust_remote_code)
    expected = model.state_dict(keep_vars=True)
    missing = sorted(expected.keys() - tensors.keys())
    unexpected = sorted(tensors.keys() - expected.keys())
    if missing or unexpected:
        raise ExportError(
            f"the checkpoint does not fit its model config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    entries, written = [], set()
    for name, meta in expected.items():
        if id(meta) in written:
            continue
        written.add(id(meta))
        tensor = tensors[name]
        if tensor.shape != meta.shape:
            raise ExportError(
                f"{name} has shape {tuple(tensor.shape)} in the checkpoint, {tuple(meta.shape)} in the config"
            )
        out_dtype = dtype if tensor.dtype.is_floating_point else tensor.dtype
        entries.append(WeightEntry(name, tensor.numel * out_dtype.itemsize, functools.partial(tensor.load, dtype)))
    return entries, model.num_parameters(), type(model).__name__


def _check_vocabulary(rows: int, tokenizer_size: int) -> None:
    """Every token id must have an embedding row (rows may exceed it: they are padded to a multiple of 16)."""
    if tokenizer_size > rows:
        raise ExportError(f"the tokenizer has {tokenizer_size} tokens but the model only {rows} embedding rows")


def _resave_hf_folder(
    source: Path,
    folder: Path,
    dtype: torch.dtype,
    max_shard_size: int,
    trust_remote_code: bool,
    cache_dir: Path | None,
) -> None:
    """Load a Hugging Face model folder in ``dtype`` and save it with the shard size asked.

    The whole model is in memory once, in ``dtype``: the size of what is written.
    """
    options = {"trust_remote_code": trust_remote_code, "cache_dir": cache_dir}
    try:
        config = AutoConfig.from_pretrained(source, **options)
        model = auto_model_class(config).from_pretrained(source, dtype=dtype, **options)
        has_tokenizer = any((source / name).is_file() for name in TOKENIZER_FILES)
        tokenizer = AutoTokenizer.from_pretrained(source, **options) if has_tokenizer else None
    except (OSError, ValueError) as exc:
        raise ExportError(f"cannot load the Hugging Face model in {source}: {first_line(exc)}") from exc
    if tokenizer is None:
        logger.warning("%s has no tokenizer files: the export has no tokenizer either", source)
    else:
        _check_vocabulary(model.get_input_embeddings().weight.shape[0], len(tokenizer))
        tokenizer.save_pretrained(folder)
    model.save_pretrained(folder, max_shard_size=max_shard_size)

