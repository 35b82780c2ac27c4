import copy
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import xxhash
from deepspeed.accelerator import get_accelerator
from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam
from helpers import cpu_env, free_port

from model_training.checkpoints.read import (
    CheckpointError,
    NewestCheckpointUnusable,
    checkpoint_bytes,
    resolve_checkpoint,
    verify_checkpoint,
    verify_hashes_on_ranks,
)
from model_training.layout import checkpoint_name
from model_training.training.checkpoint import replay_cpu_adam_steps, rotate_checkpoints

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("ckpt_worker.py")
LAUNCH_TIMEOUT_S = 300


# --- checkpoints fabricated without DeepSpeed -------------------------------------------------------------


def make_checkpoint(
    run_dir: Path, step: int, committed: bool = True, name: str | None = None, hash_kind: str = "sha256"
) -> Path:
    """A checkpoint folder with two small files and, when ``committed``, a valid manifest (format 1 records
    sha256, format 2 xxh3_128)."""
    folder = run_dir / (name or checkpoint_name(step))
    (folder / "global_step").mkdir(parents=True)
    contents = {"trainer_state.json": b'{"step": %d}' % step, "global_step/model.pt": b"weights" * step}
    for relative, data in contents.items():
        (folder / relative).write_bytes(data)
    if committed:
        digest = {"sha256": lambda data: hashlib.sha256(data).hexdigest(),
                  "xxh3_128": lambda data: xxhash.xxh3_128(data).hexdigest()}[hash_kind]
        manifest = {
            "format_version": 1 if hash_kind == "sha256" else 2,
            "step": step,
            "world_size": 2,
            "deepspeed_tag": f"global_step{step}",
            "zero_stage": 2,
            "files": {
                relative: {"size": len(data), hash_kind: digest(data)} for relative, data in contents.items()
            },
        }
        (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def point_latest(run_dir: Path, step: int) -> None:
    (run_dir / "latest").write_text(checkpoint_name(step) + "\n")


def test_checkpoint_name_is_zero_padded():
    assert checkpoint_name(80) == "checkpoint-000080"
    assert checkpoint_name(1234567) == "checkpoint-1234567"


def test_resolver_skips_folders_without_a_committed_manifest(tmp_path):
    complete = make_checkpoint(tmp_path, 3)
    make_checkpoint(tmp_path, 5, committed=False)
    # A save that crashed after its manifest but before the rename.
    make_checkpoint(tmp_path, 7, name=".staging-checkpoint-000007")
    assert resolve_checkpoint("latest", tmp_path) == complete
    assert resolve_checkpoint(tmp_path, tmp_path / "elsewhere") == complete


def test_resolver_follows_the_pointer_even_to_an_older_step(tmp_path):
    older = make_checkpoint(tmp_path, 2)
    make_checkpoint(tmp_path, 4)
    point_latest(tmp_path, 2)
    assert resolve_checkpoint("latest", tmp_path) == older


def test_pointer_to_an_uncommitted_folder_falls_back_to_the_highest_committed_step(tmp_path):
    make_checkpoint(tmp_path, 2)
    newest = make_checkpoint(tmp_path, 10)
    make_checkpoint(tmp_path, 12, committed=False)
    point_latest(tmp_path, 12)
    # Steps compare as numbers, not as names.
    make_checkpoint(tmp_path, 9)
    assert resolve_checkpoint("latest", tmp_path) == newest
    # A pointer is only ever followed to a checkpoint of its own run folder.
    outside = make_checkpoint(tmp_path / "elsewhere", 20)
    (tmp_path / "latest").write_text("elsewhere/checkpoint-000020\n")
    assert outside.is_dir() and resolve_checkpoint("latest", tmp_path) == newest


def test_a_checkpoint_path_must_be_committed(tmp_path):
    complete = make_checkpoint(tmp_path, 3)
    uncommitted = make_checkpoint(tmp_path, 5, committed=False)
    staging = make_checkpoint(tmp_path, 7, name=".staging-checkpoint-000007")
    assert resolve_checkpoint(complete, tmp_path) == complete
    assert resolve_checkpoint("checkpoint-000003", tmp_path) == complete
    for path in (uncommitted, staging):
        with pytest.raises(CheckpointError, match="not a committed checkpoint"):
            resolve_checkpoint(path, tmp_path)


def test_nothing_committed_names_what_was_searched(tmp_path):
    make_checkpoint(tmp_path, 5, committed=False)
    with pytest.raises(CheckpointError, match=re.escape(f"No usable committed checkpoint in {tmp_path}")):
        resolve_checkpoint("latest", tmp_path)
    with pytest.raises(CheckpointError, match="No checkpoint or run folder"):
        resolve_checkpoint("no-such-run", tmp_path)


def test_a_damaged_checkpoint_fails_verification_and_is_skipped(tmp_path):
    older = make_checkpoint(tmp_path, 2)
    damaged = make_checkpoint(tmp_path, 4)
    (damaged / "global_step/model.pt").write_bytes(b"torn")
    with pytest.raises(CheckpointError, match="model.pt has 4 bytes"):
        verify_checkpoint(damaged)
    assert resolve_checkpoint("latest", tmp_path) == older
    with pytest.raises(CheckpointError, match="damaged"):
        resolve_checkpoint(damaged, tmp_path)


@pytest.mark.parametrize("hash_kind", ["sha256", "xxh3_128"])
def test_verification_checks_hashes_on_request(tmp_path, hash_kind):
    """Flipped bytes keep a file's size: only its hash shows them. Both manifest formats verify."""
    folder = make_checkpoint(tmp_path, 2, hash_kind=hash_kind)
    assert verify_checkpoint(folder, check_hashes=True, threads=2)["step"] == 2
    assert verify_hashes_on_ranks(folder) >= 0  # one process: it hashes every file itself
    (folder / "global_step/model.pt").write_bytes(b"WEIGHTS" * 2)
    assert verify_checkpoint(folder)["step"] == 2
    expected = rf"{folder} is damaged: global_step/model.pt does not match its {hash_kind} \(changed after the save\)"
    with pytest.raises(CheckpointError, match=expected):
        verify_checkpoint(folder, check_hashes=True)
    with pytest.raises(CheckpointError, match=expected):
        verify_hashes_on_ranks(folder)


def test_a_damaged_newest_checkpoint_is_refused_unless_older_ones_are_allowed(tmp_path, caplog):
    older = make_checkpoint(tmp_path, 2)
    newest = make_checkpoint(tmp_path, 4)
    (newest / "manifest.json").write_text("{ torn")
    point_latest(tmp_path, 4)
    with pytest.raises(NewestCheckpointUnusable, match=r"the newest checkpoint of \S+, checkpoint-000004, is unusable"):
        resolve_checkpoint(tmp_path, tmp_path, allow_older=False)
    assert resolve_checkpoint(tmp_path, tmp_path, allow_older=True) == older
    assert "skipping checkpoint checkpoint-000004: " in caplog.text


def test_rotation_keeps_the_newest_and_ignores_folders_that_are_not_committed_checkpoints(tmp_path):
    for step in (1, 2, 3, 4):
        make_checkpoint(tmp_path, step)
    uncommitted = make_checkpoint(tmp_path, 9, committed=False)
    foreign = [tmp_path / "checkpoint-best", tmp_path / "logs"]
    for path in foreign:
        path.mkdir()
    point_latest(tmp_path, 4)
    deleted = rotate_checkpoints(tmp_path, 2)
    assert deleted == [tmp_path / checkpoint_name(1), tmp_path / checkpoint_name(2)]
    remaining = sorted(p.name for p in tmp_path.iterdir())
    assert remaining == [
        "checkpoint-000003",
        "checkpoint-000004",
        uncommitted.name,
        "checkpoint-best",
        "latest",
        "logs",
    ]


def test_rotation_never_deletes_the_only_or_the_pointed_checkpoint(tmp_path):
    only = make_checkpoint(tmp_path, 5)
    make_checkpoint(tmp_path, 6, committed=False)
    assert rotate_checkpoints(tmp_path, 1) == []
    assert only.is_dir()
    # After a resume from step 5, the newer step 8 of the abandoned attempt is the highest, yet the
    # pointer's checkpoint stays.
    make_checkpoint(tmp_path, 8)
    point_latest(tmp_path, 5)
    assert rotate_checkpoints(tmp_path, 1) == []


# --- DeepSpeed's C++ CPU Adam after a load ----------------------------------------------------------------


def cpu_adam(params: list[torch.Tensor]) -> torch.optim.Optimizer:
    return DeepSpeedCPUAdam(params, lr=3e-3, betas=(0.9, 0.95))


def fused_adam_on_cpu(params: list[torch.Tensor]) -> torch.optim.Optimizer:
    if get_accelerator().device_name() != "cpu":
        pytest.skip("FusedAdam runs DeepSpeed's C++ CPU Adam only on the CPU accelerator")
    return FusedAdam(params, lr=3e-3, betas=(0.9, 0.95))


@pytest.mark.slow
@pytest.mark.parametrize(
    "make_optimizer",
    # FusedAdam on the CPU is DeepSpeed's C++ Adam again, behind a JIT build of its own (minutes on 2 cores)
    # that nothing else in the suite needs: heavy.
    [cpu_adam, pytest.param(fused_adam_on_cpu, marks=pytest.mark.heavy)],
    ids=["DeepSpeedCPUAdam", "FusedAdam"],
)
def test_cpu_adam_loaded_at_step_20_continues_bit_for_bit(make_optimizer):
    """The C++ op keeps beta^t outside the state dict (see replay_cpu_adam_steps): without the replay, a fresh
    optimizer given the state of step 20 updates differently at steps 34, 41, 59 and 63 of these 80."""
    generator = torch.Generator().manual_seed(0)
    start = torch.randn(4096, generator=generator) * 0.02
    grads = torch.randn(80, 4096, generator=generator) * 1e-3

    def train(optimizer: torch.optim.Optimizer, param: torch.Tensor, steps: range) -> None:
        for step in steps:
            param.grad = grads[step].clone()
            optimizer.step()

    reference = torch.nn.Parameter(start.clone())
    optimizer = make_optimizer([reference])
    train(optimizer, reference, range(20))
    saved_state, saved_weights = copy.deepcopy(optimizer.state_dict()), reference.detach().clone()
    train(optimizer, reference, range(20, 80))

    resumed = torch.nn.Parameter(saved_weights)
    optimizer = make_optimizer([resumed])
    optimizer.load_state_dict(saved_state)
    replay_cpu_adam_steps(optimizer)
    train(optimizer, resumed, range(20, 80))
    assert torch.equal(resumed, reference), f"{(resumed != reference).sum()} of 4096 weights differ"


# --- real DeepSpeed runs: 2 CPU ranks ---------------------------------------------------------------------


def launch(ranks: int, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ckpt_worker.py under the DeepSpeed launcher; kill the whole process group if it hangs."""
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks)]
    command += ["--master_port", str(free_port()), "--no_local_rank", str(WORKER), *args]
    # The worker lives outside the package: make model_training importable whether or not it is installed.
    python_path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    process = subprocess.Popen(
        command,
        env=cpu_env(PYTHONPATH=python_path, **(env or {})),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail(f"{args} did not finish in {LAUNCH_TIMEOUT_S} s: a rank hangs")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def run_ok(ranks: int, *args: str, env: dict | None = None) -> None:
    result = launch(ranks, *args, env=env)
    assert result.returncode == 0, result.stderr[-5000:]


def reports(prefix: Path, ranks: int = 2) -> list[dict]:
    return [json.loads(Path(f"{prefix}-rank{rank}.json").read_text()) for rank in range(ranks)]


def committed_names(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir() if (p / "manifest.json").exists())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Train 5 steps with 2 ranks, saving at steps 2, 3 and 5 and keeping 2 checkpoints; one run per stage."""
    runs = {}

    def get(stage: int) -> Path:
        if stage not in runs:
            root = tmp_path_factory.mktemp(f"stage{stage}")
            run_ok(
                2,
                "train",
                "--out",
                str(root / "run"),
                "--result",
                str(root / "train"),
                "--stage",
                str(stage),
                "--steps",
                "5",
                "--save-at",
                "2",
                "3",
                "5",
                "--limit",
                "2",
            )
            runs[stage] = root
        return runs[stage]

    return get


@pytest.mark.slow
# ZeRO-2's resume is also compared bit for bit over 60 steps by tests/training/test_train_e2e.py: heavy here.
@pytest.mark.parametrize("stage", [pytest.param(2, marks=pytest.mark.heavy), 3])
def test_resume_continues_bit_identically(trained, stage):
    root = trained(stage)
    run_dir = root / "run"
    assert committed_names(run_dir) == ["checkpoint-000003", "checkpoint-000005"]
    assert (run_dir / "latest").read_text().strip() == "checkpoint-000005"
    manifest = verify_checkpoint(run_dir / "checkpoint-000005", check_hashes=True)
    assert manifest["world_size"] == 2 and manifest["zero_stage"] == stage
    assert {"config.json", "trainer_state.json", "rng/rank-00000.pt", "rng/rank-00001.pt"} <= manifest[
        "files"
    ].keys()
    replaced_inode = (run_dir / "checkpoint-000005").stat().st_ino

    # Resume from step 3 and save step 5 again, over the one the first run saved.
    run_ok(
        2,
        "resume",
        "--out",
        str(run_dir),
        "--result",
        str(root / "resume"),
        "--stage",
        str(stage),
        "--steps",
        "5",
        "--resume",
        "checkpoint-000003",
        "--save-at",
        "5",
        "--limit",
        "2",
    )
    for before, after in zip(reports(root / "train"), reports(root / "resume")):
        assert after["trainer_state"] == {"step": 3}
        # Same losses and learning rates: weights, optimizer moments and scheduler were all restored.
        assert after["steps"] == before["steps"][3:]
        # Each rank draws what it drew right after the save.
        assert after["draws"]["3"] == before["draws"]["3"]
    train0, train1 = reports(root / "train")
    assert train0["draws"]["3"] != train1["draws"]["3"]

    resaved = run_dir / "checkpoint-000005"
    assert resaved.stat().st_ino != replaced_inode
    assert committed_names(run_dir) == ["checkpoint-000003", "checkpoint-000005"]
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".")]
    # The resumed run reached the very same state: every file of the checkpoint is identical.
    assert verify_checkpoint(resaved, check_hashes=True)["files"] == manifest["files"]


@pytest.mark.slow
def test_a_failed_write_on_one_rank_fails_every_rank_and_commits_nothing(tmp_path):
    run_dir = tmp_path / "run"
    result = launch(
        2,
        "train",
        "--out",
        str(run_dir),
        "--result",
        str(tmp_path / "train"),
        "--stage",
        "2",
        "--steps",
        "5",
        "--save-at",
        "3",
        "5",
        "--limit",
        "1",
        env={"CKPT_TEST_FAIL_RANK": "1", "CKPT_TEST_FAIL_SAVE": "2"},
    )
    assert result.returncode != 0
    message = (
        f"CheckpointError: Saving checkpoint of step 5 to {run_dir / 'checkpoint-000005'} failed while "
        "writing; earlier checkpoints and the latest pointer are untouched "
        "(rank 1: OSError: [Errno 28] No space left on device); the disk of "
        f"{run_dir} is full: "
    )
    needed = checkpoint_bytes(run_dir / "checkpoint-000003")
    needs = (f"GB) free once the partial checkpoint was removed, and a checkpoint of this run needs about {needed} "
             f"bytes ({needed / 1e9:.2f} GB), as checkpoint-000003 did: free space there, or keep fewer checkpoints "
             "(save_total_limit)")
    assert needs in result.stderr
    # Both ranks raise it, the healthy one included.
    assert f"[rank0]: model_training.checkpoints.read.{message}" in result.stderr
    assert f"[rank1]: model_training.checkpoints.read.{message}" in result.stderr

    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint-000003", "latest"]
    assert (run_dir / "latest").read_text().strip() == "checkpoint-000003"
    assert resolve_checkpoint("latest", run_dir) == run_dir / "checkpoint-000003"
    run_ok(
        2,
        "resume",
        "--out",
        str(run_dir),
        "--result",
        str(tmp_path / "resume"),
        "--stage",
        "2",
        "--steps",
        "4",
    )
    assert [r["trainer_state"] for r in reports(tmp_path / "resume")] == [{"step": 3}, {"step": 3}]


@pytest.mark.slow
def test_loading_on_a_different_number_of_ranks_without_the_conversion_is_refused(trained, tmp_path):
    """The ZeRO shards are cut for 2 ranks: 1 rank loads them only through the universal conversion (reshard.py, which
    the trainer makes when it resumes; tests/training/test_reshard.py)."""
    result = launch(
        1,
        "resume",
        "--out",
        str(trained(2) / "run"),
        "--result",
        str(tmp_path / "resume"),
        "--stage",
        "2",
        "--steps",
        "6",
    )
    assert result.returncode != 0
    assert "was saved by 2 ranks and this run has 1" in result.stderr
    assert "optimizer state is cut per rank, so it loads only through its universal conversion" in result.stderr
