"""export_model.py: DeepSpeed ZeRO checkpoints of real CPU runs -> Hugging Face folders, checked against
DeepSpeed's own consolidation (zero_to_fp32) as the oracle, then loaded by unchanged inference code."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers
import xxhash
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from helpers import REPO, check_ok, cpu_env, run_deepspeed
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from zero_worker import FROZEN, build_model

from model_training.checkpoints.read import resolve_checkpoint
from model_training.checkpoints.zero import read_zero_checkpoint
from model_training.data.formatting import format_conversation, format_prompt, prepare_tokenizer, to_chat_messages
from model_training.export.cli import main_export
from model_training.export.export import export_model
from model_training.export.writer import WeightEntry, parse_size, plan_shards

EXPORT_MODEL = REPO / "export_model.py"
WORKER = Path(__file__).with_name("zero_worker.py")
TIED = "lm_head.weight"  # Falcon ties it to transformer.word_embeddings.weight


def oracle(checkpoint: Path) -> dict[str, torch.Tensor]:
    """DeepSpeed's own fp32 consolidation of a committed checkpoint."""
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=manifest["deepspeed_tag"])


def folder_weights(folder: Path) -> dict[str, torch.Tensor]:
    weights = {}
    for shard in sorted(folder.glob("*.safetensors")):
        weights.update(load_file(shard))
    return weights


def leftovers(output_folder: Path) -> list[Path]:
    """Hidden partial/replaced folders an export left beside ``output_folder``."""
    return sorted(output_folder.parent.glob(f".{output_folder.name}.*"))


@pytest.fixture(scope="module")
def trainer_tokenizer():
    """The tokenizer as the trainer builds it (models.builder.load_tokenizer for tiny-falcon)."""
    return prepare_tokenizer(AutoTokenizer.from_pretrained(REPO / "data" / "tokenizer"))


@pytest.fixture(scope="module", params=["zero2_run", "zero3_run"])
def bf16_export(request, tmp_path_factory) -> tuple[Path, Path]:
    """(run folder, its bf16 export with the default shard size), for a ZeRO-2 and a ZeRO-3 run."""
    run = request.getfixturevalue(request.param)
    folder = tmp_path_factory.mktemp("export") / "model"
    export_model(run, folder, torch.bfloat16, parse_size("2GB"))
    return run, folder


# --- what an export holds ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_export_holds_the_latest_fp32_masters_in_bf16(bf16_export):
    run, folder = bf16_export
    checkpoint = resolve_checkpoint(run, run)
    assert checkpoint.name == "checkpoint-000008"
    reference = oracle(checkpoint)
    weights = load_file(folder / "model.safetensors")  # 0.4 MB: one shard, no index
    assert not (folder / "model.safetensors.index.json").exists()
    # The tied head is left out, as save_pretrained does; transformers ties it again on load.
    assert weights.keys() == reference.keys() - {TIED}
    for name, tensor in weights.items():
        assert tensor.dtype == torch.bfloat16, name
        assert torch.equal(tensor, reference[name].to(torch.bfloat16)), name


@pytest.mark.slow
def test_config_generation_config_and_vocabulary_agree_with_the_tokenizer(bf16_export):
    _, folder = bf16_export
    config = json.loads((folder / "config.json").read_text())
    generation = json.loads((folder / "generation_config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    rows = load_file(folder / "model.safetensors")["transformer.word_embeddings.weight"].shape[0]
    assert config["dtype"] == "bfloat16"
    assert config["use_cache"] is True  # the trainer turns it off; generation wants it
    assert config["vocab_size"] == rows and rows % 16 == 0 and len(tokenizer) <= rows
    assert (generation["eos_token_id"], generation["pad_token_id"]) == (tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert tokenizer.eos_token == "<|endoftext|>"


@dataclass(frozen=True)
class Message:
    role: str
    text: str


CONVERSATIONS = [
    (None, [Message("prompter", "Hi!"), Message("assistant", "Hello, how can I help?")]),
    (
        "You are a helpful assistant.",
        [
            Message("prompter", "  Two leading spaces and a trailing newline\n"),
            Message("assistant", "Sure.\n\nA second paragraph."),
            Message("prompter", "Ünïcödé, 日本語 and emoji 🦅?"),
            Message("assistant", "ok"),
        ],
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize(("system", "messages"), CONVERSATIONS)
def test_exported_chat_template_renders_the_trainers_token_ids(bf16_export, trainer_tokenizer, system, messages):
    exported = AutoTokenizer.from_pretrained(bf16_export[1])
    full = exported.apply_chat_template(to_chat_messages(messages, system), tokenize=True, return_dict=False)
    assert full == list(format_conversation(messages, trainer_tokenizer, None, system).input_ids)
    prompt = exported.apply_chat_template(
        to_chat_messages(messages[:-1], system), tokenize=True, return_dict=False, add_generation_prompt=True
    )
    assert prompt == format_prompt(messages[:-1], trainer_tokenizer, system)


@pytest.mark.slow
def test_pipeline_generates_from_the_exported_folder(bf16_export):
    _, folder = bf16_export
    tokenizer = AutoTokenizer.from_pretrained(folder)
    generator = transformers.pipeline("text-generation", model=str(folder), torch_dtype=torch.bfloat16)
    assert generator.model.dtype == torch.bfloat16
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    result = generator(prompt, max_new_tokens=6, min_new_tokens=3, do_sample=False, return_full_text=False)
    assert result[0]["generated_text"]


@pytest.mark.slow
def test_small_shards_reload_with_identical_logits(zero3_run, tmp_path, trainer_tokenizer):
    folder = tmp_path / "model"
    argv = [str(zero3_run), "--output_folder", str(folder), "--dtype", "fp32", "--max_shard_size", "100KB"]
    assert main_export(argv) == 0
    shards = sorted(folder.glob("model-*-of-*.safetensors"))
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(shards) >= 3 and sorted(set(index["weight_map"].values())) == [s.name for s in shards]
    for shard in shards:
        tensors = load_file(shard)
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        assert size <= 100_000 or len(tensors) == 1, shard.name  # a larger tensor gets a shard alone
        assert all(index["weight_map"][name] == shard.name for name in tensors)

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.float32).eval()
    reference.load_state_dict(oracle(resolve_checkpoint(zero3_run, zero3_run)))
    ids = torch.tensor([trainer_tokenizer.encode("The exported model computes the same logits.")])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


@pytest.mark.slow
def test_a_hugging_face_folder_is_saved_again_in_the_dtype_and_shards_asked(bf16_export, tmp_path):
    _, source = bf16_export
    folder = export_model(source, tmp_path / "fp32", torch.float32, parse_size("150KB"))
    assert len(list(folder.glob("model-*-of-*.safetensors"))) >= 2
    assert json.loads((folder / "config.json").read_text())["dtype"] == "float32"
    before, after = folder_weights(source), folder_weights(folder)
    assert before.keys() == after.keys()
    assert all(after[name].dtype == torch.float32 and torch.equal(after[name], before[name].float()) for name in after)
    assert AutoTokenizer.from_pretrained(folder).chat_template == AutoTokenizer.from_pretrained(source).chat_template


# --- consolidation of layouts the trainer does not write ---------------------------------------------------


@pytest.fixture(scope="module")
def worker_checkpoints(tmp_path_factory) -> Path:
    """bf16 ZeRO-1, 2 and 3 checkpoints of 3 ranks with a frozen parameter and buffers (zero_worker.py)."""
    out = tmp_path_factory.mktemp("zero_worker")
    check_ok(run_deepspeed(["--out", str(out)], nproc=3, script=WORKER))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_consolidation_reads_masters_frozen_parameters_and_buffers_on_3_ranks(worker_checkpoints, stage):
    untrained = build_model().state_dict()
    checkpoint = read_zero_checkpoint(worker_checkpoints / f"zero{stage}")
    reference = get_fp32_state_dict_from_zero_checkpoint(str(worker_checkpoints), tag=f"zero{stage}")
    assert (checkpoint.zero_stage, checkpoint.world_size) == (stage, 3)
    assert checkpoint.tensors.keys() == untrained.keys()
    assert checkpoint.tensors[TIED] is checkpoint.tensors["transformer.word_embeddings.weight"]
    unchanged = {FROZEN, "float_buffer", "transformer.int_buffer"}
    for name, tensor in checkpoint.tensors.items():
        if name in unchanged:  # no master: stored as they were built, in their own dtype
            assert torch.equal(tensor.load(), untrained[name]) and tensor.load().dtype == untrained[name].dtype
        else:
            assert torch.equal(tensor.load(torch.float32), reference[name]), name
    # bf16 training: the masters are not the module's bf16 copy, so reading the module would be caught.
    master = checkpoint.tensors["transformer.word_embeddings.weight"].load(torch.float32)
    assert not torch.equal(master, master.bfloat16().float())


# --- sizes and shards ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [("2GB", 2 * 10**9), ("500MB", 5 * 10**8), ("10KB", 10**4), ("1.5GB", 15 * 10**8), ("1.1kb", 1100),
     ("123", 123), ("64 B", 64), ("2GiB", 2 * 2**30), ("1.5MiB", 3 * 2**19)],
)
def test_sizes_parse(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "GB", "2XB", "-1GB", "0", "0.1B", "1e3", "2 G B", "two GB"])
def test_sizes_that_do_not_parse_are_refused(text):
    with pytest.raises(ValueError, match="size"):
        parse_size(text)


def test_shards_are_filled_in_order_and_an_oversized_tensor_goes_alone():
    entries = [WeightEntry(f"t{i}", nbytes, torch.empty) for i, nbytes in enumerate([40, 40, 40, 150, 10, 50])]
    shards = plan_shards(entries, max_shard_size=100)
    assert [[e.name for e in shard] for shard in shards] == [["t0", "t1"], ["t2"], ["t3"], ["t4", "t5"]]


# --- bad input: exit status 2, one line, nothing written ----------------------------------------------------


def _committed_copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(resolve_checkpoint(run, run), tmp_path / "copy" / "checkpoint-000008"))


def _edit_checkpoint(checkpoint: Path, edit) -> Path:
    """Apply ``edit(checkpoint)``, then update the manifest, so that the checkpoint still verifies."""
    edit(checkpoint)
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    paths = {name: checkpoint / name for name in manifest["files"]}
    manifest["files"] = {
        name: {"size": p.stat().st_size, "xxh3_128": xxhash.xxh3_128(p.read_bytes()).hexdigest()}
        for name, p in paths.items() if p.exists()
    }
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))
    return checkpoint


def _set_vocab_size(checkpoint: Path, rows: int) -> None:
    config = checkpoint / "model_config" / "config.json"
    config.write_text(config.read_text().replace('"vocab_size": 2032', f'"vocab_size": {rows}'))


def _missing_source(run, tmp_path):
    return [str(tmp_path / "nowhere")], "does not exist or is not a folder"


def _not_a_checkpoint(run, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not a checkpoint")
    return [str(tmp_path / "notes")], "No usable committed checkpoint"


def _staging_folder(run, tmp_path):
    # With its manifest, as just before the commit's rename: a staging folder is never exported.
    staging = tmp_path / ".staging-checkpoint-000012"
    shutil.copytree(resolve_checkpoint(run, run), staging)
    return [str(staging)], "is not a committed checkpoint"


def _no_manifest(run, tmp_path):
    (_committed_copy(run, tmp_path) / "manifest.json").unlink()
    return [str(tmp_path / "copy" / "checkpoint-000008")], "is not a committed checkpoint"


def _run_without_a_committed_checkpoint(run, tmp_path):
    (_committed_copy(run, tmp_path) / "manifest.json").unlink()
    return [str(tmp_path / "copy")], "checkpoint-000008, is unusable: "


def _run_without_a_committed_checkpoint_even_allowing_older(run, tmp_path):
    (_committed_copy(run, tmp_path) / "manifest.json").unlink()
    return [str(tmp_path / "copy"), "--allow_older"], "No usable committed checkpoint"


def _missing_rank_shard(run, tmp_path):
    checkpoint = _committed_copy(run, tmp_path)
    next(checkpoint.glob("global_step*/zero_pp_rank_1_*optim_states.pt")).unlink()
    return [str(checkpoint)], "is damaged"


def _rank_shard_missing_from_the_manifest_too(run, tmp_path):
    def drop_rank_1(checkpoint):
        next(checkpoint.glob("global_step*/zero_pp_rank_1_*optim_states.pt")).unlink()

    checkpoint = _edit_checkpoint(_committed_copy(run, tmp_path), drop_rank_1)
    return [str(checkpoint)], "holds 1 optimizer shards but they were written by 2 ranks"


def _config_that_does_not_fit(run, tmp_path):
    checkpoint = _edit_checkpoint(_committed_copy(run, tmp_path), lambda c: _set_vocab_size(c, 2048))
    return [str(checkpoint)], "has shape (2032, 64) in the checkpoint, (2048, 64) in the config"


def _tokenizer_larger_than_the_embeddings(run, tmp_path):
    checkpoint = _edit_checkpoint(_committed_copy(run, tmp_path), lambda c: _set_vocab_size(c, 2016))
    return [str(checkpoint)], "the tokenizer has 2026 tokens but the model only 2016 embedding rows"


def _checkpoint_without_model_config(run, tmp_path):
    checkpoint = _edit_checkpoint(_committed_copy(run, tmp_path), lambda c: shutil.rmtree(c / "model_config"))
    return [str(checkpoint)], "has no model_config/ folder"


def _hf_folder_without_weights(run, tmp_path):
    (tmp_path / "hf").mkdir()
    shutil.copy(resolve_checkpoint(run, run) / "model_config" / "config.json", tmp_path / "hf")
    return [str(tmp_path / "hf")], "cannot load the Hugging Face model in"


def _bad_dtype(run, tmp_path):
    return [str(run), "--dtype", "int8"], "unknown dtype 'int8'"


def _bad_shard_size(run, tmp_path):
    return [str(run), "--max_shard_size", "2XB"], "--max_shard_size: cannot read '2XB' as a size"


def _no_destination(run, tmp_path):
    return [str(run)], "give --output_folder, --hf_repo_name or both"


def _bad_repo_name(run, tmp_path):
    # Refused before the export, which can take an hour, rather than by the upload after it.
    return [str(run), "--hf_repo_name", "my model"], "--hf_repo_name: Repo id must use alphanumeric chars"


BAD_INPUTS = [
    _missing_source, _not_a_checkpoint, _staging_folder, _no_manifest, _run_without_a_committed_checkpoint,
    _run_without_a_committed_checkpoint_even_allowing_older,
    _missing_rank_shard, _rank_shard_missing_from_the_manifest_too, _config_that_does_not_fit,
    _tokenizer_larger_than_the_embeddings, _checkpoint_without_model_config, _hf_folder_without_weights,
    _bad_dtype, _bad_shard_size, _no_destination, _bad_repo_name,
]


@pytest.mark.slow
@pytest.mark.parametrize("make_case", BAD_INPUTS, ids=[f.__name__.strip("_") for f in BAD_INPUTS])
def test_bad_input_is_refused_with_one_line_and_nothing_written(zero2_run, tmp_path, capsys, make_case):
    argv, message = make_case(zero2_run, tmp_path)
    folder = tmp_path / "out" / "model"
    if make_case is not _no_destination:
        argv += ["--output_folder", str(folder)]
    assert main_export(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("export_model.py: error: ") and message in lines[-1], lines
    assert not folder.exists() and not (folder.parent.exists() and leftovers(folder))


@pytest.mark.slow
def test_a_damaged_newest_checkpoint_is_skipped_when_asked_and_the_export_says_so(zero2_run, tmp_path, caplog):
    # The INFO line must be captured whatever logging setup an earlier test in this process left behind.
    caplog.set_level(logging.INFO, logger="model_training")
    run = Path(shutil.copytree(zero2_run, tmp_path / "run"))
    (run / "checkpoint-000008" / "manifest.json").write_text("{ torn")
    folder = tmp_path / "model"
    assert main_export([str(run), "--output_folder", str(folder), "--dtype", "fp32", "--allow_older"]) == 0
    assert "skipping checkpoint checkpoint-000008: " in caplog.text
    assert f"exporting checkpoint {run / 'checkpoint-000004'}" in caplog.text
    exported, masters = folder_weights(folder), oracle(run / "checkpoint-000004")
    assert exported.keys() <= masters.keys() and all(torch.equal(exported[k], masters[k]) for k in exported)


@pytest.mark.slow
def test_a_killed_exports_leftovers_are_removed_and_hashes_are_checked_unless_skipped(zero2_run, tmp_path, capsys):
    run = Path(shutil.copytree(zero2_run, tmp_path / "run"))
    (shard,) = run.glob("checkpoint-000008/global_step8/zero_pp_rank_1_*optim_states.pt")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    folder = tmp_path / "model"
    killed = tmp_path / ".model.partial-0123456789ab"  # what a SIGKILLed export of this folder leaves
    killed.mkdir()
    (killed / "model.safetensors").write_bytes(b"half a shard")
    assert main_export([str(run), "--output_folder", str(folder)]) == 2
    assert f"{shard.relative_to(run / 'checkpoint-000008')} does not match its xxh3_128" in capsys.readouterr().err
    assert killed.exists() and not folder.exists()  # a refused export touches nothing
    assert main_export([str(run), "--output_folder", str(folder), "--skip_hash_check"]) == 0
    assert leftovers(folder) == [] and (folder / "model.safetensors").is_file()


@pytest.mark.slow
def test_a_non_empty_output_folder_is_kept_unless_overwrite(zero2_run, tmp_path, capsys):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "precious.txt").write_text("keep me")
    assert main_export([str(zero2_run), "--output_folder", str(folder)]) == 2
    assert "exists and is not empty; pass --overwrite" in capsys.readouterr().err
    assert [p.name for p in folder.iterdir()] == ["precious.txt"]

    assert main_export([str(zero2_run), "--output_folder", str(folder), "--overwrite"]) == 0
    assert not (folder / "precious.txt").exists() and (folder / "model.safetensors").is_file()
    assert leftovers(folder) == []


@pytest.mark.slow
def test_an_output_folder_that_is_a_file_or_holds_the_checkpoint_is_refused_even_with_overwrite(
    zero2_run, tmp_path, capsys
):
    (tmp_path / "file").write_text("")
    assert main_export([str(zero2_run), "--output_folder", str(tmp_path / "file"), "--overwrite"]) == 2
    assert "is a file" in capsys.readouterr().err
    assert main_export([str(zero2_run), "--output_folder", str(zero2_run.parent), "--overwrite"]) == 2
    assert "holds the model to export" in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "" and resolve_checkpoint(zero2_run, zero2_run).is_dir()


@pytest.mark.slow
def test_the_command_line_exits_2_with_one_line_on_stderr(tmp_path):
    folder = tmp_path / "model"
    result = subprocess.run(
        [sys.executable, str(EXPORT_MODEL), str(tmp_path), "--output_folder", str(folder)],
        cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"export_model.py: error: No usable committed checkpoint in {tmp_path}"
    )
    assert not folder.exists()


@pytest.mark.slow
def test_an_export_that_fills_the_disk_says_so_with_the_bytes_and_leaves_nothing(zero2_run, tmp_path, capsys,
                                                                                  monkeypatch):
    """safetensors' SafetensorError on a full disk, as the OS gives it (injected at the write: no root here)."""
    from safetensors import SafetensorError

    import model_training.export.writer as writer

    def full_disk(tensors, path, metadata=None):
        Path(path).write_bytes(b"the part that fit")
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No "
                              "space left on device\" })")

    monkeypatch.setattr(writer, "save_file", full_disk)
    folder = tmp_path / "out" / "model"
    assert main_export([str(zero2_run), "--output_folder", str(folder), "--dtype", "fp32"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(
        rf"export_model\.py: error: the disk of {re.escape(str(folder.parent))} is full: \d+ bytes \(\S+ GB\) free "
        r"once the partial export was removed, and its weights need (\d+) bytes \(\S+ GB\); free space there, or "
        r"choose another --output_folder", line), line
    assert not folder.exists() and leftovers(folder) == []
    monkeypatch.undo()  # the disk has room again: the bytes said are those the export writes
    assert main_export([str(zero2_run), "--output_folder", str(folder), "--dtype", "fp32"]) == 0
    written = sum(t.numel() * t.element_size() for t in folder_weights(folder).values())
    assert int(re.search(r"weights need (\d+) bytes", line).group(1)) == written
