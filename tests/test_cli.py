"""`trainer_sft.py` as a user runs it: modes that exit early, OpenAssistant flags, and error messages."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import REPO, TINY, cpu_env

from model_training.cli import parse_train_args, resolve_auto_resume
from model_training.config import ConfigError


def run_cli(*args: str, cwd: Path = REPO, script: str = "trainer_sft.py") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / script), *args],
        cwd=cwd, env=cpu_env(), capture_output=True, text=True, timeout=300,
    )


def test_show_config_prints_the_merged_yaml_and_exits_0() -> None:
    result = run_cli("--configs", "defaults", "falcon-7b", "oasst-top1", "warmup_steps=7", "--show_config")
    assert result.returncode == 0, result.stderr
    merged = yaml.safe_load(result.stdout)
    assert merged["model_name"] == "tiiuae/falcon-7b"
    assert merged["warmup_steps"] == 7
    assert merged["datasets"][0]["oasst_export"]["val_split"] == 0.05


def test_show_config_touches_no_model_data_or_deepspeed() -> None:
    code = (
        "import sys; from model_training.cli import main_train;"
        "rc = main_train(['--configs', 'defaults', 'falcon-40b', 'oasst-top1', '--show_config']);"
        "assert rc == 0; assert 'deepspeed' not in sys.modules and 'transformers' not in sys.modules, 'imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--configs", "defaults", "falcon-7bb"], "unknown config section 'falcon-7bb' in configs/*.yaml; "
         "did you mean 'falcon-7b'?"),
        ([*TINY, "learning_rat=1e-5"], "unknown key 'learning_rat' on the command line; did you mean 'learning_rate'?"),
        ([*TINY, "--learning_rat", "1e-5"], "unknown option '--learning_rat' on the command line; did you mean"),
        ([*TINY, "max_steps=many"], "bad value for key 'max_steps' on the command line"),
        ([*TINY, "--rng_seed", "1", "stray"], "unexpected argument 'stray'"),
    ],
)
def test_user_mistakes_exit_2_with_one_clear_line(args: list[str], message: str) -> None:
    result = run_cli(*args, "--show_config")
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_openassistant_flags_map_to_config_keys() -> None:
    args = parse_train_args(
        [*TINY, "--deepspeed", "--local_rank=1", "--resume_from_checkpoint", "--wandb-entity", "team",
         "--rng_seed", "7", "--show_dataset_stats"]
    )
    cfg = args.config
    assert (cfg.deepspeed, cfg.local_rank, cfg.resume_from_checkpoint) == (True, 1, "latest")
    assert (cfg.wandb_entity, cfg.rng_seed, cfg.show_dataset_stats) == ("team", 7, True)
    assert parse_train_args([*TINY, "--resume_from_checkpoint", "/runs/x/checkpoint-000080"]).config \
        .resume_from_checkpoint == "/runs/x/checkpoint-000080"
    # OpenAssistant's --no-deepspeed: plain PyTorch on the same loop; the key works as well.
    assert parse_train_args([*TINY, "--no-deepspeed"]).config.deepspeed is False
    assert parse_train_args([*TINY, "deepspeed=false"]).config.deepspeed is False
    assert parse_train_args(TINY).config.deepspeed is True


def test_an_override_after_a_bare_resume_flag_stays_an_override() -> None:
    cfg = parse_train_args([*TINY, "--resume_from_checkpoint", "max_length=32"]).config
    assert (cfg.resume_from_checkpoint, cfg.max_length) == ("latest", 32)
    folder_with_equals = "/runs/lr=1e-5/checkpoint-000080"
    assert parse_train_args([*TINY, "--resume_from_checkpoint", folder_with_equals]).config \
        .resume_from_checkpoint == folder_with_equals


def test_any_key_works_as_a_double_dash_option_and_inside_configs() -> None:
    cfg = parse_train_args(["--configs", "defaults", "tiny-falcon", "oasst-sample", "max_steps=3",
                            "--warmup-steps", "2", "--learning_rate=0.5"]).config
    assert (cfg.max_steps, cfg.warmup_steps, cfg.learning_rate) == (3, 2, 0.5)
    with pytest.raises(ConfigError, match="needs a value"):
        parse_train_args([*TINY, "--warmup_steps"])


def test_show_dataset_stats_from_another_working_directory(tmp_path: Path) -> None:
    # Relative paths in the config (tokenizer, data_dir) must not depend on where the command runs.
    result = run_cli(*TINY, "--show_dataset_stats", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    splits, removed = result.stdout.strip().split("\n\nremoved by filters\n")
    header, *rows = splits.splitlines()
    assert header.split() == ["dataset", "split", "threads", "turns", "samples", "tokens", "p50", "p90", "p99",
                              "max", "supervised%", "truncated", "dropped"]
    assert [row.split()[:2] for row in rows] == [["oasst_export", "train"], ["oasst_export", "val"]]
    train = rows[0].split()
    assert int(train[2]) > 100 and 0 < float(train[10]) < 100
    filters_header, oasst = removed.splitlines()
    assert filters_header.split() == ["dataset", "records", "other_language", "duplicates", "too_short", "too_long",
                                      "per_epoch"]
    assert int(oasst.split()[-1]) == int(train[4])  # an epoch draws every training sample by default


@pytest.mark.slow
def test_dataset_stats_of_a_stage_that_starts_from_a_training_run_read_its_checkpoints_tokenizer(
    zero2_run: Path,
) -> None:
    """No export for statistics: the tokenizer comes from the newest checkpoint's tokenizer/ folder."""
    start = [f"model_name={zero2_run}", "model_config=null", "tokenizer_name=null", "--show_dataset_stats"]
    dpo = run_cli("--configs", "defaults-dpo", "tiny-falcon", "preference-sample", *start, script="trainer_dpo.py")
    assert dpo.returncode == 0, dpo.stderr
    assert [line.split()[:2] for line in dpo.stdout.splitlines()[1:3]] == [["oasst_export", "train"],
                                                                           ["oasst_export", "val"]]
    ppo = run_cli("--configs", "defaults", "tiny-falcon", "oasst-sample", "tiny-ppo", f"ppo.reward_model={zero2_run}",
                  *start, script="trainer_rl.py")
    assert ppo.returncode == 0, ppo.stderr
    assert ppo.stdout.startswith("prompts ") and "(limit 256)" in ppo.stdout
    assert not (zero2_run / "start_model").exists()


def test_mixture_sections_report_each_source_and_its_draw() -> None:
    result = run_cli("--configs", "defaults", "tiny-falcon", "falcon-40b-instruct-mix", "--show_dataset_stats")
    assert result.returncode == 0, result.stderr
    removed = result.stdout.split("removed by filters\n")[1].splitlines()[1:]
    per_epoch = {line.split()[0]: int(line.split()[-1]) for line in removed}
    assert set(per_epoch) == {"chat_jsonl", "oasst_export", "alpaca", "text"}
    others = per_epoch["chat_jsonl"] + per_epoch["oasst_export"] + per_epoch["alpaca"]
    assert abs(per_epoch["text"] / (others + per_epoch["text"]) - 0.05) < 1 / others


def test_truncation_is_counted_in_the_stats() -> None:
    result = run_cli(*TINY, "max_length=24", "--show_dataset_stats")
    assert result.returncode == 0, result.stderr
    train = result.stdout.strip().splitlines()[1].split()
    assert int(train[11]) > 0  # truncated
    assert int(train[9]) <= 24  # max


def test_the_model_card_command_finds_the_export_in_cache_dir(tmp_path: Path) -> None:
    """`deepspeed trainer_sft.py --configs defaults falcon-7b oasst-top1 --cache_dir <data_cache_dir> ...`, the
    published command, with the export in <data_cache_dir> as the OpenAssistant trainer expects it; the tiny model
    stands in for Falcon-7B."""
    data = tmp_path / "data_cache_dir"
    data.mkdir()
    shutil.copy(REPO / "data" / "oasst_sample.jsonl.gz", data / "2023-06-02_oasst_all_labels.jsonl.gz")
    command = ["--configs", "defaults", "tiny-falcon", "oasst-top1", "--cache_dir", str(data), "--output_dir",
               str(tmp_path / "out"), "--deepspeed", f"data_cache_dir={tmp_path / 'tokenized'}"]
    result = run_cli(*command, "--show_dataset_stats")
    assert result.returncode == 0, result.stderr
    assert "oasst_export" in result.stdout

    (data / "2023-06-02_oasst_all_labels.jsonl.gz").unlink()
    result = run_cli(*command, "--show_dataset_stats")
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    tried = [data / "2023-06-02_oasst_all_labels.jsonl.gz", REPO / "data" / "2023-06-02_oasst_all_labels.jsonl.gz"]
    assert line == (
        "error: dataset file '2023-06-02_oasst_all_labels.jsonl.gz' (set by datasets[0].oasst_export.input_file_path) "
        f"not found: tried {tried[0]} or {tried[1]}; a relative path is looked up in cache_dir (when set), then in "
        "data_dir"
    )


def test_empty_dataset_after_filters_is_an_error() -> None:
    result = run_cli(*TINY, "datasets=[{oasst_export: {lang: xx}}]", "--show_dataset_stats")
    assert result.returncode == 2
    assert "datasets[0].oasst_export has no training samples after its filters" in result.stderr
    assert "lang='xx'" in result.stderr


def test_prepare_only_fills_the_token_stores_then_finds_them(tmp_path: Path) -> None:
    args = ["--configs", "defaults", "tiny-falcon", "falcon-40b-instruct-mix", f"data_cache_dir={tmp_path}",
            "--prepare_only"]
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    lines = first.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines[:-1]] == ["chat_jsonl", "oasst_export", "alpaca", "text"]
    assert all(" prepared " in line and str(tmp_path) in line and "bytes a token" in line for line in lines[:-1])
    assert lines[-1].startswith(f"4 token stores in {tmp_path}")
    second = run_cli(*args)
    assert second.stdout.count(" found ") == 4 and " prepared " not in second.stdout
    groups = run_cli("--configs", "defaults-dpo", "tiny-falcon", "preference-sample", f"data_cache_dir={tmp_path}",
                     "--prepare_only", script="trainer_dpo.py")
    assert groups.returncode == 0 and groups.stdout.count(" prepared ") == 3 and " validation groups, " in groups.stdout
    uncached = run_cli(*args[:-2], "data_cache_dir=null", "--prepare_only")
    assert uncached.returncode == 2 and "key 'data_cache_dir' is null" in uncached.stderr


def committed_checkpoint(run: Path, step: int) -> Path:
    """The smallest folder the resolver takes for a committed checkpoint: a file and a manifest that lists it."""
    folder = run / f"checkpoint-{step:06d}"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text("{}")
    manifest = {"format_version": 2, "step": step, "world_size": 1, "deepspeed_tag": f"global_step{step}",
                "files": {"trainer_state.json": {"size": 2, "xxh3_128": "unused by this check"}}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_resume_auto_starts_a_new_run_resumes_one_or_refuses_what_else_the_folder_holds(tmp_path: Path) -> None:
    """`resume_from_checkpoint=auto`, the requeued job's unchanged command: an empty (or missing) output_dir starts a
    run, one with a complete checkpoint resumes the newest, one with an earlier run but no such checkpoint is refused
    as a new run would be."""
    def resolved(folder: Path) -> str | None:
        cfg = parse_train_args([*TINY, f"output_dir={folder}", "--resume_from_checkpoint", "auto"]).config
        resolve_auto_resume(cfg)
        return cfg.resume_from_checkpoint

    assert resolved(tmp_path / "new") is None
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "config.yaml").write_text("{}")  # a start that stopped before its first step
    assert resolved(tmp_path / "new") is None
    committed_checkpoint(tmp_path / "run", 20)
    assert resolved(tmp_path / "run") == "latest"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(ConfigError, match=r"key 'resume_from_checkpoint' is auto, but output_dir '\S+other' holds an "
                                          r"earlier run \(metrics.jsonl\) and no checkpoint to resume: No usable"):
        resolved(tmp_path / "other")
