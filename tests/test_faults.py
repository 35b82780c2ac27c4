"""User mistakes through the real command lines: each one ends with exit status 2 and one line on stderr that
names the file, line or key and what was expected, never a traceback, and changes nothing that existed.

A row of FAULTS is one mistake: a builder that writes its inputs into a scratch folder and returns the command
line, a regex for the error line, and the folders it reads besides the scratch folder. Every file and folder
under them is hashed before and after the command; a row needs nothing else.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from helpers import FAULT_WORKER, REPO, TINY, cpu_env, run_deepspeed, snapshot

from model_training.config import read_config_folder

TRAINER = REPO / "trainer_sft.py"
EXPORTER = REPO / "export_model.py"
DATA = REPO / "data"
REPO_INPUTS = (DATA, REPO / "configs")
# The deepspeed launcher's own log lines, e.g. its "[ERROR] [launch.py:259:sigkill_handler] ... exits with return
# code = 2": the launcher's report of the failure, not the trainer's.
LAUNCHER_LOG = re.compile(r"^\[[\d-]+ [\d:,]+\] \[[A-Z]+\] \[(?:runner|launch)\.py:")


@dataclass(frozen=True)
class Fault:
    name: str
    command: Callable[[Path], list[str]]
    """Writes the mistake's inputs into the scratch folder; returns the script and its arguments."""
    expected: str
    """re.search pattern for the one error line."""
    protect: tuple[Path, ...] = REPO_INPUTS
    """Folders the command reads besides the scratch folder (which is always protected)."""
    ranks: int = 1
    """1: `python SCRIPT ...`; more: the deepspeed launcher with this many CPU ranks."""
    on_a_run: bool = False
    """The scratch folder holds `run/`, a copy of a finished 2-rank run (8 steps, checkpoints 4 and 8)."""


def trainer(*args: str) -> list[str]:
    return [str(TRAINER), *TINY, *args]


def with_dataset(name: str, file: str, content: bytes | Callable[[], bytes]) -> Callable[[Path], list[str]]:
    """`--show_dataset_stats` of `content`, written to scratch/`file`, as the only dataset `name`."""

    def build(scratch: Path) -> list[str]:
        path = scratch / file
        path.write_bytes(content() if callable(content) else content)
        # The tokenized cache in the scratch folder: whatever a failed run stored there would show as a new file.
        dataset = f"datasets=[{{{name}: {{input_file_path: {path}}}}}]"
        return trainer(dataset, f"data_cache_dir={scratch / 'cache'}", "--show_dataset_stats")

    return build


def first_half(sample: str) -> Callable[[], bytes]:
    """A bundled .gz sample cut in the middle, as an interrupted copy leaves it."""
    return lambda: (DATA / sample).read_bytes()[: (DATA / sample).stat().st_size // 2]


def lines(*records: str) -> bytes:
    return "".join(f"{record}\n" for record in records).encode()


def overrides(*args: str) -> Callable[[Path], list[str]]:
    """The tiny run's command line with `args`, where {scratch} is the scratch folder."""
    return lambda scratch: trainer(*(arg.replace("{scratch}", str(scratch)) for arg in args))


def made(build: Callable[[Path], object], then: Callable[[Path], list[str]]) -> Callable[[Path], list[str]]:
    """`then`'s command, after `build` has prepared the scratch folder."""

    def command(scratch: Path) -> list[str]:
        build(scratch)
        return then(scratch)

    return command


def read_only(folder: Path) -> None:
    folder.mkdir()
    folder.chmod(0o555)


def exported_into_a_full_folder(scratch: Path) -> list[str]:
    (scratch / "model").mkdir()
    (scratch / "model" / "config.json").write_text("{}")
    (scratch / "out").mkdir()
    (scratch / "out" / "keep.txt").write_text("results of an earlier export")
    return [str(EXPORTER), str(scratch / "model"), "--output_folder", str(scratch / "out")]


def flip_bytes(relative: str) -> Callable[[Path], None]:
    """64 bytes in the middle of a file of the copied run, inverted: its size stays, its content does not."""

    def flip(scratch: Path) -> None:
        path = scratch / "run" / relative
        data = bytearray(path.read_bytes())
        middle = len(data) // 2
        data[middle : middle + 64] = bytes(255 - b for b in data[middle : middle + 64])
        path.write_bytes(bytes(data))

    return flip


def on_run(*args: str) -> Callable[[Path], list[str]]:
    """The tiny run's command line on the copied run folder, with `args`."""
    return lambda scratch: trainer(f"output_dir={scratch / 'run'}", "max_steps=10", *args)


def export_run(*args: str) -> Callable[[Path], list[str]]:
    return lambda scratch: [str(EXPORTER), str(scratch / "run"), "--output_folder", str(scratch / "out"), *args]


def config_file_in(folder: str) -> Callable[[Path], list[str]]:
    """The tiny run's sections copied into scratch/`folder`/config.yaml, read with --config_file and trained into
    output_dir=scratch/`folder`: the run's merged config.yaml would replace the user's file."""

    def command(scratch: Path) -> list[str]:
        sections = {name: section for name, (section, _) in read_config_folder().items() if name in TINY}
        (scratch / folder).mkdir()
        (scratch / folder / "config.yaml").write_text(yaml.safe_dump(sections))
        return [str(TRAINER), "--config_file", str(scratch / folder / "config.yaml"), *TINY,
                f"output_dir={scratch / folder}", "max_steps=1"]

    return command


def held_by_another_node(scratch: Path) -> list[str]:
    """A lock of a run on another node (a requeued job's first copy, say) in output_dir."""
    (scratch / "run").mkdir()
    (scratch / "run" / ".run.lock").write_text(json.dumps({"host": "node-17", "pid": 4242, "started": 1.8e9,
                                                           "slurm_job": "977"}))
    return trainer(f"output_dir={scratch / 'run'}", "max_steps=1", "--no-deepspeed")


CHECKPOINT_8 = "checkpoint-000008/global_step8"

RUN_FAULTS = [
    Fault("a new run into a finished run's folder", on_run("learning_rate=1e-3"),
          r"key 'output_dir' is '\S+/run', which holds an earlier run \(checkpoint-000004, checkpoint-000008, latest, "
          r"metrics\.jsonl\); resume it with --resume_from_checkpoint, .* or set overwrite_output_dir=true",
          on_a_run=True),
    Fault("resume a DeepSpeed run without DeepSpeed", on_run("--no-deepspeed", "--resume_from_checkpoint"),
          r"cannot resume from \S+/checkpoint-000008: it was saved by a run on DeepSpeed, whose engine state this run "
          r"cannot load; resume it with deepspeed=true", on_a_run=True),
    Fault("resume and overwrite at once", on_run("overwrite_output_dir=true", "--resume_from_checkpoint"),
          r"set either 'resume_from_checkpoint' .* or 'overwrite_output_dir' .*, not both", on_a_run=True),
    pytest.param(
        Fault("resume from a checkpoint whose model states changed",
              made(flip_bytes(f"{CHECKPOINT_8}/mp_rank_00_model_states.pt"), on_run("--resume_from_checkpoint")),
              r"cannot resume from \S+/checkpoint-000008: Checkpoint \S+ is damaged: "
              r"global_step8/mp_rank_00_model_states\.pt does not match its xxh3_128 \(changed after the save\)",
              ranks=2, on_a_run=True),
        marks=pytest.mark.slow,
    ),
    pytest.param(
        Fault("resume on other data", on_run("--resume_from_checkpoint", "max_length=32"),
              r"cannot resume from \S+/checkpoint-000008: the training data or its order differs", ranks=2,
              on_a_run=True),
        marks=pytest.mark.slow,
    ),
    pytest.param(
        # Found once the ranks have the data, before the model is built or anything written (data_cache_dir=null: the
        # tokenized stores would be new files in the scratch folder).
        Fault("a validation set that keeps no reply token", overrides(
                  "max_length=3", "random_offset_probability=0", "data_cache_dir=null", "output_dir={scratch}/run"),
              r"^error: key 'max_length' is 3: the validation set 'oasst_export' keeps no token of an assistant's "
              r"reply once each sample is cut to that length", ranks=2),
        marks=pytest.mark.slow,
    ),
    pytest.param(
        Fault("a launch that fails once the ranks run", lambda scratch: trainer(
                  f"output_dir={scratch / 'new-run'}", "peft.type=lora", "deepspeed_config=configs/zero3_config.json"),
              r"LoRA runs on ZeRO-2, not ZeRO-3", ranks=2),
        marks=pytest.mark.slow,
    ),
    Fault("export of a checkpoint whose optimizer shard changed",
          made(flip_bytes(f"{CHECKPOINT_8}/zero_pp_rank_0_mp_rank_00_optim_states.pt"), export_run()),
          r"^export_model\.py: error: the newest checkpoint of \S+/run, checkpoint-000008, is unusable: Checkpoint "
          r"\S+/checkpoint-000008 is damaged: global_step8/zero_pp_rank_0_mp_rank_00_optim_states\.pt does not match "
          r"its xxh3_128 .*pass --allow_older", on_a_run=True),
    Fault("export of a run whose newest checkpoint is damaged",
          made(lambda scratch: (scratch / "run" / "checkpoint-000008" / "manifest.json").write_text("{ torn"),
               export_run()),
          r"^export_model\.py: error: the newest checkpoint of \S+/run, checkpoint-000008, is unusable: .*pass "
          r"--allow_older", on_a_run=True),
    # Nothing of a run's own overwritten, one run per folder (issue 29).
    pytest.param(
        Fault("resume with max_steps below the checkpoint's step", on_run("--resume_from_checkpoint", "max_steps=4"),
              r"key 'max_steps' is 4, which ends the schedule at step 4, but \S+/checkpoint-000008 is at step 8; set "
              r"max_steps to more than 8", ranks=2, on_a_run=True),
        marks=pytest.mark.slow,
    ),
    pytest.param(
        Fault("resume a ZeRO-2 checkpoint under ZeRO-3",
              on_run("--resume_from_checkpoint", "deepspeed_config=configs/zero3_config.json"),
              r"cannot resume from \S+/checkpoint-000008: it was saved under ZeRO-1/2, and deepspeed_config "
              r"'configs/zero3_config\.json' asks for ZeRO-3, whose engine state DeepSpeed keeps in other files; "
              r"resume it with a ZeRO-1/2 deepspeed_config", ranks=2, on_a_run=True),
        marks=pytest.mark.slow,
    ),
    pytest.param(
        Fault("resume an fp32 run with dtype=bf16", on_run("--resume_from_checkpoint", "dtype=bf16"),
              r"cannot resume from \S+/checkpoint-000008: it was saved by a run with dtype fp32, and this one has "
              r"dtype bf16: .*resume it with dtype=fp32", ranks=2, on_a_run=True),
        marks=pytest.mark.slow,
    ),
    Fault("export into one of the run's own checkpoints",
          lambda scratch: [str(EXPORTER), str(scratch / "run"), "--output_folder",
                           str(scratch / "run" / "checkpoint-000004"), "--overwrite"],
          r"^export_model\.py: error: the output folder \S+/run/checkpoint-000004 is a training run, one of its "
          r"checkpoints or a file of the run \S+/run the export reads; choose a folder of its own", on_a_run=True),
    Fault("export into the run folder it reads",
          lambda scratch: [str(EXPORTER), str(scratch / "run"), "--output_folder", str(scratch / "run"), "--overwrite"],
          r"the output folder \S+/run is a training run", on_a_run=True),
    Fault("export into a full folder of a damaged run: the folder is checked first, before minutes of hashing",
          made(flip_bytes(f"{CHECKPOINT_8}/zero_pp_rank_0_mp_rank_00_optim_states.pt"),
               made(lambda s: (s / "out").mkdir() or (s / "out" / "keep.txt").write_text("mine"), export_run())),
          r"^export_model\.py: error: the output folder \S+/out exists and is not empty; pass --overwrite",
          on_a_run=True),
]


CHAT_OK = json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]})
CHAT_CUT = CHAT_OK[:47]  # a line cut short: the decoder stops past its last character
OASST_TAB = '{"message_tree_id": "t", "prompt": {"text": "a\tb"}}'  # a raw tab inside a JSON string
TAB_COLUMN = OASST_TAB.index("\t") + 1

def reward_model(*args: str) -> Callable[[Path], list[str]]:
    """trainer_rm.py on the tiny model with `args`, where {scratch} is the scratch folder."""
    return lambda scratch: [str(REPO / "trainer_rm.py"), "--configs", "defaults-rm", "tiny-falcon",
                            *(arg.replace("{scratch}", str(scratch)) for arg in args)]


def ppo(*args: str) -> Callable[[Path], list[str]]:
    """trainer_rl.py's tiny section from {scratch}/sft (a run folder as the config sees one) with `args`."""

    def command(scratch: Path) -> list[str]:
        (scratch / "sft").mkdir()
        (scratch / "sft" / "latest").write_text("checkpoint-000001\n")
        return [str(REPO / "trainer_rl.py"), "--configs", "defaults", "tiny-falcon", "oasst-sample", "tiny-ppo",
                f"model_name={scratch / 'sft'}", f"output_dir={scratch / 'out'}",
                *(arg.replace("{scratch}", str(scratch)) for arg in args)]

    return command


FAULTS = [
    Fault("PPO without a reward model", ppo("ppo.reward_model=null"),
          r"key 'ppo\.reward_model' is not set; trainer_rl\.py needs a reward model"),
    Fault("PPO's rollouts in uneven micro-batches",
          ppo("ppo.reward_model={scratch}/sft", "ppo.value_steps_per_epoch=3"),
          r"each rank's 16 rollouts per step do not split into 'ppo\.value_steps_per_epoch' \(3\) optimizer steps"),
    Fault("a reward-model section run by trainer_sft.py",
          lambda scratch: [str(TRAINER), "--configs", "defaults-rm", "tiny-falcon", "preference-sample",
                           "--show_config"],
          r"key 'stage' is 'rm': this config trains with trainer_rm\.py, not trainer_sft\.py"),
    Fault("a preference record with one reply",
          made(lambda s: (s / "prefs.jsonl").write_bytes(lines('{"prompt": "Hi", "chosen": "Yo", "rejected": "No"}',
                                                               '{"prompt": "Hey", "chosen": "Yo"}')),
               reward_model("datasets=[{preference_jsonl: {input_file_path: {scratch}/prefs.jsonl}}]",
                            "--show_dataset_stats")),
          r"prefs\.jsonl, line 2: missing field 'rejected'"),
    Fault("a conversation source for the reward model",
          reward_model("datasets=[{dolly15k: {input_file_path: dolly_sample.jsonl}}]", "--show_dataset_stats"),
          r"datasets\[0\]\.dolly15k has no ranked replies for the rm stage; sources that have them: oasst_export"),
    Fault("oasst_export not gzip", with_dataset("oasst_export", "export.jsonl.gz", b"plain text, not gzip\n"),
          r"export\.jsonl\.gz, line 1: not gzip data; expected a gzip-compressed file"),
    Fault("oasst_export gzip cut short", with_dataset("oasst_export", "export.jsonl.gz",
                                                      first_half("oasst_sample.jsonl.gz")),
          r"export\.jsonl\.gz, line \d+: the gzip data ends early or is damaged .*; expected a whole \.gz file"),
    Fault("hh_rlhf not gzip", with_dataset("hh_rlhf", "hh.jsonl.gz", b"plain text, not gzip\n"),
          r"hh\.jsonl\.gz, line 1: not gzip data; expected a gzip-compressed file"),
    Fault("hh_rlhf gzip cut short", with_dataset("hh_rlhf", "hh.jsonl.gz", first_half("hh_rlhf_sample.jsonl.gz")),
          r"hh\.jsonl\.gz, line \d+: the gzip data ends early or is damaged .*; expected a whole \.gz file"),
    Fault("tokenizer folder with a typo", overrides("tokenizer_name=data/tokenizr", "--show_config"),
          r"key 'tokenizer_name' is the local path 'data/tokenizr', but the folder \S+/data/tokenizr does not exist; "
          r"expected a folder saved by save_pretrained, or a hub id"),
    Fault("tokenizer folder that is empty", made(lambda s: (s / "tokenizer").mkdir(),
                                                 overrides("tokenizer_name={scratch}/tokenizer", "--show_config")),
          r"key 'tokenizer_name': the folder \S+/tokenizer holds no tokenizer; expected one of tokenizer\.json, "),
    Fault("model folder that does not exist",
          lambda scratch: [str(TRAINER), "--configs", "defaults", "falcon-7b", "oasst-sample",
                           f"model_name={scratch / 'falcon-7b'}", "--show_config"],
          r"key 'model_name' is the local path '\S+/falcon-7b', but the folder \S+ does not exist"),
    Fault("unknown model type", overrides("model_config.model_type=falconx", "--show_config"),
          r"key 'model_config\.model_type' is 'falconx', which transformers does not know .*did you mean 'falcon'"),
    Fault("output_dir below a file", made(lambda s: (s / "results").write_text("a file"),
                                          overrides("output_dir={scratch}/results/run", "max_steps=1")),
          r"key 'output_dir' is '\S+/results/run', but \S+/results is a file; expected a folder"),
    pytest.param(
        Fault("output_dir read-only", made(lambda s: read_only(s / "runs"),
                                           overrides("output_dir={scratch}/runs", "max_steps=1")),
              r"key 'output_dir' is '\S+/runs', but \S+/runs cannot be written \(Permission denied\); expected a "
              r"folder this user can write"),
        marks=pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders"),
    ),
    pytest.param(
        Fault("output_dir below a file, 2 ranks", made(lambda s: (s / "results").write_text("a file"),
                                                       overrides("output_dir={scratch}/results/run", "max_steps=1")),
              r"^error: key 'output_dir' is '\S+/results/run', but \S+/results is a file", ranks=2),
        marks=pytest.mark.slow,
    ),
    Fault("hub dataset while offline", overrides("datasets=[{dolly15k: {input_file_path: nobody-here/no-dataset}}]",
                                                 "--show_dataset_stats"),
          r"dataset 'nobody-here/no-dataset' \(set by datasets\[0\]\.dolly15k\.input_file_path\) is a hub id, but the "
          r"hub is offline \(HF_HUB_OFFLINE is set\).*point input_file_path at a local copy"),
    Fault("dataset option guessed", overrides("datasets=[{chat_jsonl: {path: {scratch}/chat.jsonl}}]", "--show_config"),
          r"unknown key 'path' of dataset 'chat_jsonl' in datasets\[0\]; valid keys: "
          r"input_file_path, val_split, .*, lang$"),
    Fault("override that is broken YAML", overrides("datasets=[{oasst_export: {lang: de}", "--show_config"),
          r"command-line override 'datasets=\[\{oasst_export: \{lang: de\}' is not valid YAML: expected ',' or '\}', "
          r"but got '<stream end>' at column 36 of the override"),
    Fault("alpaca file that is a JSON object",
          with_dataset("alpaca", "alpaca.json", json.dumps({"data": [{"instruction": "a", "output": "b"}]},
                                                           indent=2).encode()),
          r"alpaca\.json, line 1: the file is a single JSON object \(keys 'data'\), not records .*expected a JSON "
          r"list of records or JSON Lines"),
    Fault("chat_jsonl line cut short", with_dataset("chat_jsonl", "chat.jsonl", lines(CHAT_OK, CHAT_CUT, CHAT_OK)),
          rf"chat\.jsonl, line 2: invalid JSON \(Expecting ',' delimiter at column {len(CHAT_CUT) + 1}\)"),
    Fault("oasst_export line with a raw tab", with_dataset("oasst_export", "export.jsonl", lines(OASST_TAB)),
          rf"export\.jsonl, line 1: invalid JSON \(Invalid control character at column {TAB_COLUMN}\)"),
    Fault("ZeRO-3 without DeepSpeed", overrides("--no-deepspeed", "deepspeed_config=configs/zero3_config.json",
                                                "--show_config"),
          r"deepspeed=false keeps the whole model and optimizer on every rank, but 'deepspeed_config' "
          r"\(configs/zero3_config\.json\) asks for ZeRO-3"),
    Fault("natural_instructions task file without a definition",
          with_dataset("natural_instructions", "task1_capitals.json", json.dumps({"Instances": []}).encode()),
          r"task1_capitals\.json: missing field 'Definition'$"),
    Fault("DeepSpeed config that does not exist", overrides("deepspeed_config=configs/nope.json", "--show_config"),
          r"key 'deepspeed_config': the DeepSpeed config \S+/configs/nope\.json does not exist; expected a JSON file"),
    Fault("DeepSpeed config that is not JSON", made(lambda s: (s / "ds.json").write_text("{\"zero_optimization\": "),
                                                    overrides("deepspeed_config={scratch}/ds.json", "--show_config")),
          r"key 'deepspeed_config': \S+/ds\.json is not valid JSON \(Expecting value: line 1 column \d+"),
    Fault("export into a folder that is not empty", exported_into_a_full_folder,
          r"^export_model\.py: error: the output folder \S+/out exists and is not empty; pass --overwrite"),
    # Nothing of the user's overwritten, one run per folder (issue 29).
    Fault("a config file where the run writes its merged config", config_file_in("exp"),
          r"--config_file is '\S+/exp/config\.yaml', which lies in output_dir '\S+/exp' where the run writes its "
          r"config\.yaml; move the file out of output_dir, or choose another output_dir"),
    Fault("a samples.md of the user's where the run writes its samples",
          made(lambda s: (s / "run").mkdir() or (s / "run" / "samples.md").write_text("my notes"),
               overrides("output_dir={scratch}/run", "generate_samples=[Hi]", "max_steps=1")),
          r"key 'output_dir' is '\S+/run', which holds samples\.md that no run wrote; the run would write its own "
          r"there: move them, or choose another output_dir"),
    Fault("a dataset file inside a checkpoint folder of output_dir",
          made(lambda s: (s / "run" / "checkpoint-000004").mkdir(parents=True) or shutil.copy(
                   DATA / "dolly_sample.jsonl", s / "run" / "checkpoint-000004" / "dolly.jsonl"),
               overrides("output_dir={scratch}/run",
                         "datasets=[{dolly15k: {input_file_path: {scratch}/run/checkpoint-000004/dolly.jsonl}}]",
                         "overwrite_output_dir=true", "max_steps=1")),
          r"datasets \(dolly15k\) input_file_path is '\S+/checkpoint-000004/dolly\.jsonl', which lies in output_dir "
          r"'\S+/run' where the run writes its checkpoint-000004"),
    Fault("a launch into a folder a run on another node holds", held_by_another_node,
          r"key 'output_dir' is '\S+/run', which a running run holds \(host node-17, pid 4242, started 2027-01-15 "
          r"08:00:00 UTC, SLURM job 977\); wait for it to end, or choose another output_dir; if that run is gone "
          r"\(a node that crashed\), remove \S+/run/\.run\.lock"),
]


def deepspeed_json(edit: Callable[[dict], object]) -> Callable[[Path], list[str]]:
    """A training run on configs/zero_config.json as `edit` changed it, saved to scratch/ds.json."""

    def command(scratch: Path) -> list[str]:
        ds = json.loads((REPO / "configs" / "zero_config.json").read_text())
        edit(ds)
        (scratch / "ds.json").write_text(json.dumps(ds))
        return trainer(f"deepspeed_config={scratch / 'ds.json'}", f"output_dir={scratch / 'run'}", "max_steps=1")

    return command


# Issue 29: values and inputs that reached torch, transformers, DeepSpeed or pyarrow, refused before any rank starts.
VALIDATION_FAULTS = [
    Fault("a negative warmup", overrides("warmup_steps=-5", "output_dir={scratch}/run", "max_steps=1"),
          r"^error: key 'warmup_steps' must be at least 0, got -5$"),
    Fault("a negative learning rate", overrides("learning_rate=-3e-3", "output_dir={scratch}/run", "max_steps=1"),
          r"^error: key 'learning_rate' must be at least 0, got -0\.003$"),
    Fault("a learning rate that is not a number", overrides("learning_rate=.nan", "output_dir={scratch}/run",
                                                          "max_steps=1"),
          r"^error: key 'learning_rate' must be at least 0, got nan$"),
    Fault("adam_beta2 above 1", overrides("adam_beta2=1.5", "output_dir={scratch}/run", "max_steps=1"),
          r"^error: key 'adam_beta2' must be in \[0, 1\), got 1\.5$"),
    Fault("a sample length of one token", overrides("max_length=1", "output_dir={scratch}/run", "max_steps=1"),
          r"^error: key 'max_length' must be at least 2, got 1$"),
    Fault("a misspelled DeepSpeed section",
          deepspeed_json(lambda ds: ds.update(zero_optimisation=ds.pop("zero_optimization"))),
          r"key 'deepspeed_config': \S+/ds\.json has the key 'zero_optimisation', which DeepSpeed does not read \(it "
          r"would be ignored\); did you mean 'zero_optimization'\?$"),
    Fault("a ZeRO stage DeepSpeed does not have", deepspeed_json(lambda ds: ds["zero_optimization"].update(stage=7)),
          r"key 'deepspeed_config': \S+/ds\.json sets 'zero_optimization\.stage' to 7; expected: Input should be 0, 1, "
          r"2, 3"),
    pytest.param(
        Fault("a ZeRO stage DeepSpeed does not have, 2 ranks",
              deepspeed_json(lambda ds: ds["zero_optimization"].update(stage=7)),
              r"^error: key 'deepspeed_config': \S+/ds\.json sets 'zero_optimization\.stage' to 7", ranks=2),
        marks=pytest.mark.slow,
    ),
    Fault("a hidden size the heads do not divide",
          overrides("model_config.hidden_size=66", "output_dir={scratch}/run", "max_steps=1"),
          r"^error: key 'model_config': 'hidden_size' \(66\) is not a multiple of 'num_attention_heads' \(4\)"),
    Fault("a chat record with a lone surrogate",
          with_dataset("chat_jsonl", "chat.jsonl", lines(CHAT_OK, CHAT_OK.replace("Hello", "Hel\\ud800lo"))),
          r"chat\.jsonl, line 2: field 'messages\[1\]\.content' holds a lone surrogate \(\\ud800\) at character 4; "
          r"expected text that UTF-8 can encode"),
    Fault("an OASST message with a lone surrogate",
          with_dataset("oasst_export", "export.jsonl", lines(OASST_TAB.replace("\t", "\\udfff"))),
          r"export\.jsonl, line 1: field 'prompt\.text' holds a lone surrogate \(\\udfff\) at character 2; "),
    Fault("a dolly15k .parquet that is a text file",
          with_dataset("dolly15k", "dolly.parquet", b"instruction,response\n"),
          r"dolly\.parquet: not a readable Parquet file \(Parquet magic bytes not found .*\); expected a whole "
          r"\.parquet file"),
    Fault("a negative shard size", lambda scratch: [*exported_into_a_full_folder(scratch), "--overwrite",
                                                    "--max_shard_size", "-5GB"],
          r"^export_model\.py: error: --max_shard_size: the size '-5GB' is negative; expected a positive size"),
    Fault("--configs without a section", lambda scratch: [str(TRAINER), "--configs", "max_steps=3", "--show_config"],
          r"^error: no config section given; --configs takes section names first .*: defaults, falcon-7b, "),
    Fault("an empty PPO prompt file",
          made(lambda s: (s / "prompts.jsonl").write_bytes(b""),
               ppo("ppo.reward_model={scratch}/sft", "ppo.prompt_file={scratch}/prompts.jsonl",
                   "tokenizer_name=data/tokenizer", "--show_dataset_stats")),
          r"^error: key 'ppo\.prompt_file': \S+/prompts\.jsonl holds no prompt; expected one JSON object a line"),
]


def run(command: list[str], ranks: int, **env: str) -> tuple[int, str]:
    """(exit status, what the command wrote to stderr); under the launcher, every rank's output but the
    launcher's own lines."""
    script, *args = command
    if ranks > 1:
        result = run_deepspeed(args, nproc=ranks, script=Path(script), timeout=300, **env)
        return result.returncode, "\n".join(line for line in result.stdout.splitlines() if not LAUNCHER_LOG.match(line))
    result = subprocess.run(
        [sys.executable, script, *args], cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=300
    )
    return result.returncode, result.stderr


@pytest.mark.parametrize("fault", FAULTS + VALIDATION_FAULTS + RUN_FAULTS, ids=lambda fault: fault.name)
def test_a_mistake_exits_2_with_one_line_and_changes_nothing(
    fault: Fault, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    if fault.on_a_run:
        shutil.copytree(request.getfixturevalue("zero2_run"), scratch / "run")
    command = fault.command(scratch)
    folders = [scratch, *fault.protect]
    before = snapshot(folders)
    status, stderr = run(command, fault.ranks)
    errors = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert status == 2, stderr[-4000:]
    assert "Traceback" not in stderr, stderr[-4000:]
    assert len(errors) == 1, stderr[-4000:]
    assert errors[0] == stderr.strip().splitlines()[-1], "the error is the last thing the command says"
    assert re.search(fault.expected, errors[0]), errors[0]
    assert snapshot(folders) == before


@pytest.mark.slow
def test_ranks_that_find_a_mistake_seconds_apart_leave_together(zero2_run: Path, tmp_path: Path) -> None:
    """The row `resume on other data` with rank 1's data preparation 5 s behind rank 0's: rank 0 finds the mistake
    first, says it, and waits for rank 1 to find it too, rather than exit and have the launcher kill rank 1's
    preparation under it (a traceback after the one line, as a full suite once showed by chance)."""
    shutil.copytree(zero2_run, tmp_path / "run")
    on_new_stores = on_run("--resume_from_checkpoint", "max_length=32", f"data_cache_dir={tmp_path / 'cache'}")
    command = [str(FAULT_WORKER), *on_new_stores(tmp_path)[1:]]
    status, stderr = run(command, ranks=2, FAULT_SLOW_PREPARATION="5")
    assert status == 2, stderr[-4000:]
    assert "Traceback" not in stderr and "received SIGTERM" not in stderr, stderr[-4000:]
    errors = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert errors == [stderr.strip().splitlines()[-1]], stderr[-4000:]
    assert "the training data or its order differs" in errors[0]


def test_ranks_other_than_0_exit_2_without_a_line(tmp_path: Path) -> None:
    """What the launched row cannot tell apart: rank 1 exits 2 by itself (and says nothing, rank 0 does) rather
    than being killed by the launcher once rank 0 has failed."""
    (tmp_path / "results").write_text("a file")
    result = subprocess.run(
        [sys.executable, str(TRAINER), *TINY, f"output_dir={tmp_path / 'results' / 'run'}"],
        # A rank that went on would wait for rank 0 in the rendezvous until this timeout.
        cwd=REPO, env=cpu_env(RANK="1", WORLD_SIZE="2"), capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr == ""


def test_dataset_stats_count_the_threads_the_oasst_language_filter_drops(tmp_path: Path) -> None:
    """The OASST loader drops other languages itself, by tree; the stats count those threads as read and as
    other_language, as the filter of every other source counts its records."""
    command = trainer(f"data_cache_dir={tmp_path}", "--show_dataset_stats")  # the sample: lang en of en/de/es/fr
    result = subprocess.run([sys.executable, *command], cwd=REPO, env=cpu_env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    splits, removed = result.stdout.split("\n\nremoved by filters\n")
    threads = sum(int(row.split()[2]) for row in splits.splitlines()[1:])
    header, row = removed.splitlines()
    counts = dict(zip(header.split()[1:], map(int, row.split()[1:])))
    assert counts["other_language"] > 0
    assert counts["records"] == threads + counts["other_language"] + counts["duplicates"]


def test_allow_older_passes_over_a_newest_checkpoint_whose_hashes_fail(zero2_run: Path, tmp_path: Path) -> None:
    """--allow_older: a newest checkpoint whose files changed after the save is skipped with a line naming it and
    why, and the newest whole one is exported."""
    shutil.copytree(zero2_run, tmp_path / "run")
    flip_bytes(f"{CHECKPOINT_8}/zero_pp_rank_0_mp_rank_00_optim_states.pt")(tmp_path)
    status, stderr = run(export_run("--allow_older", "--dtype", "fp32")(tmp_path), ranks=1)
    assert status == 0, stderr[-3000:]
    assert re.search(r"skipping checkpoint checkpoint-000008: Checkpoint \S+ is damaged: "
                     r"global_step8/zero_pp_rank_0_mp_rank_00_optim_states\.pt does not match its xxh3_128", stderr)
    assert "exporting checkpoint " + str(tmp_path / "run" / "checkpoint-000004") in stderr
    assert (tmp_path / "out" / "config.json").is_file()


def test_an_overwrite_keeps_a_file_of_the_users(zero2_run: Path, tmp_path: Path) -> None:
    """overwrite_output_dir removes what the earlier run wrote (its .run-files, checkpoints, metrics), not a
    samples.md the user keeps there."""
    shutil.copytree(zero2_run, tmp_path / "run")
    (tmp_path / "run" / "samples.md").write_text("my own notes")
    status, stderr = run(trainer(f"output_dir={tmp_path / 'run'}", "overwrite_output_dir=true", "max_steps=1",
                                 "--no-deepspeed"), ranks=1)
    assert status == 0, stderr[-3000:]
    assert (tmp_path / "run" / "samples.md").read_text() == "my own notes"
    assert not (tmp_path / "run" / "checkpoint-000008").exists()
    assert [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [1]


@pytest.mark.slow
def test_a_resume_drops_a_torn_metrics_line_and_says_each_changed_setting(zero2_run: Path, tmp_path: Path) -> None:
    """A metrics.jsonl cut in its last line (a kill mid-write) is cut back to its last whole line, said in one line,
    before the resume appends; the schedule's and the step's changed settings are said each in one line."""
    from model_training.training.plot import plot_run

    run_dir = tmp_path / "run"
    shutil.copytree(zero2_run, run_dir)
    whole = (run_dir / "metrics.jsonl").read_text()
    torn = '{"epoch": 0.5, "loss": 4.1'
    (run_dir / "metrics.jsonl").write_text(whole + torn)
    result = run_deepspeed([*TINY, f"output_dir={run_dir}", "--resume_from_checkpoint", "max_steps=9",
                            "logging_steps=1", "max_grad_norm=1.0", "lr_scheduler_type=linear"], timeout=300)
    assert result.returncode == 0, result.stdout[-4000:]
    assert re.search(rf"metrics\.jsonl ended in a line cut short \({len(torn)} bytes without a newline, a run killed "
                     r"while writing it\): dropped it before appending", result.stdout), result.stdout[-4000:]
    assert "max_grad_norm changed on resume: 2.0 -> 1.0" in result.stdout
    assert "lr_scheduler_type changed on resume: cosine -> linear" in result.stdout
    records = (run_dir / "metrics.jsonl").read_text()
    assert records.startswith(whole) and json.loads(records.splitlines()[-1])["step"] == 9
    assert plot_run(run_dir).is_file()
