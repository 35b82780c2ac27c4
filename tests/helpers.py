"""Helpers for tests: the real entry points (DeepSpeed's launcher, torchrun or a process alone, on the CPU),
the metrics of a finished run, tiny models.

Importable as `helpers` from every test module (tests/ is on sys.path through tests/conftest.py)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from model_training.ports import free_port

if TYPE_CHECKING:  # imported where used: the launcher tests need no torch in this process
    import torch
    from transformers import PreTrainedModel

REPO = Path(__file__).resolve().parent.parent
TRAINER = REPO / "trainer_sft.py"
FAULT_WORKER = REPO / "tests" / "training" / "fault_worker.py"
"""trainer_sft.py with faults injected from the environment (see its docstring)."""
VOCAB_ROWS = 2032
"""The tiny model's embedding rows: the bundled tokenizer (2023) + 3 chat tokens, padded to a multiple of 16."""
TINY = ["--configs", "defaults", "tiny-falcon", "oasst-sample"]
TINY_RUN = [*TINY, "max_steps=8", "save_steps=4", "logging_steps=1", "eval_steps=4"]
"""The short run the session fixtures train: 8 steps, checkpoints at 4 and 8, metrics every step."""
RESUME_RUN = [*TINY, "max_steps=80", "save_steps=20", "save_total_limit=null", "logging_steps=1"]
"""5 epochs of 16 steps, a checkpoint every 20: resumed at 20, 60 steps over 3 epoch boundaries and 2 evaluations
(the session fixture `run_80` is it, uninterrupted)."""
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")
USER_HOME = Path.home()
"""The home folder the suite started with; every test runs with a home of the session's own (conftest.py)."""


PLANTED_MARKER = "kindly"
"""The word that makes a reply better in `write_planted_preferences`' data."""
_WORDS = ("river forest city water light music green quiet market bridge garden winter summer travel story animal "
          "history people mountain ocean bread stone north window").split()


def write_planted_preferences(path: Path, count: int, seed: int = 0) -> Path:
    """`count` preference_jsonl records whose chosen reply holds PLANTED_MARKER among random words and whose rejected
    reply does not: a preference a tiny model can learn, and nothing else tells the replies apart."""
    import random

    rng = random.Random(seed)

    def words() -> list[str]:
        return rng.choices(_WORDS, k=rng.randint(5, 9))

    rows = []
    for _ in range(count):
        chosen = words()
        chosen.insert(rng.randrange(len(chosen) + 1), PLANTED_MARKER)
        rows.append({"prompt": f"Say something about the {rng.choice(_WORDS)}.", "chosen": " ".join(chosen) + ".",
                     "rejected": " ".join(words()) + "."})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_planted_chats(path: Path, count: int, seed: int = 0) -> Path:
    """`count` chat_jsonl conversations in the form of `write_planted_preferences`' data, one reply each, half of the
    replies with PLANTED_MARKER: an SFT policy trained on them says the marker about half the time."""
    import random

    rng = random.Random(seed)
    rows = []
    for index in range(count):
        reply = rng.choices(_WORDS, k=rng.randint(5, 9))
        if index % 2:
            reply.insert(rng.randrange(len(reply) + 1), PLANTED_MARKER)
        rows.append({"messages": [{"role": "user", "content": f"Say something about the {rng.choice(_WORDS)}."},
                                  {"role": "assistant", "content": " ".join(reply) + "."}]})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def cpu_env(**extra: str) -> dict[str, str]:
    """The environment of a CPU DeepSpeed run: one thread per rank (2 cores here), offline hub."""
    env = dict(os.environ)
    env.update(
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        HF_HUB_OFFLINE="1",
        WANDB_MODE="offline",
        TOKENIZERS_PARALLELISM="false",
    )
    env.update(extra)
    # A script in tests/ must import this checkout's package, whichever checkout an editable install points at.
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def _run(cmd: list[str], timeout: int, env: dict[str, str]) -> subprocess.CompletedProcess:
    """`cmd` in the repository with the CPU environment and `env`; the result holds stdout+stderr in `.stdout`."""
    return subprocess.run(cmd, cwd=REPO, env=cpu_env(**env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout)


def run_deepspeed(
    args: list[str], nproc: int = 2, script: Path = TRAINER, timeout: int = 900, **env: str
) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus nproc script args` on the CPU; the result holds stdout+stderr in `.stdout`."""
    port = free_port()
    cmd = [DEEPSPEED, "--num_gpus", str(nproc), "--master_port", str(port), str(script), *args]
    try:
        return _run(cmd, timeout, env)
    finally:
        # Scripts other than the trainer (test workers) leave DeepSpeed's 66 MB CPU all-reduce buffers behind.
        for leftover in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
            leftover.unlink(missing_ok=True)


def run_torchrun(
    args: list[str], nproc: int = 2, script: Path = TRAINER, timeout: int = 900, **env: str
) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node nproc script args` on the CPU, or with nproc 1 `python script args`, a process
    alone without a launcher; the result holds stdout+stderr in `.stdout`."""
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(free_port())]
    return _run([sys.executable, *(launcher if nproc > 1 else []), str(script), *args], timeout, env)


def check_ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit status {result.returncode}; output tail:\n{result.stdout[-6000:]}"
    return result


def read_metrics(output_dir: Path) -> list[dict]:
    with open(output_dir / "metrics.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


TIMINGS = ("tokens_per_s", "data_time")
"""Metrics of the machine rather than of the training: left out where two runs are compared."""


def metrics_by_step(output_dir: Path) -> dict[int, dict]:
    """Each step's metrics but the timings; a run resumed in its own folder appends, so a later line wins."""
    return {r["step"]: {k: v for k, v in r.items() if k not in TIMINGS} for r in read_metrics(output_dir)}


def step_losses(output_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(output_dir) if "loss" in r}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    differ = {name: (a[name] - b[name]).abs().max().item() for name in a if not a[name].equal(b[name])}
    assert not differ, f"{len(differ)} of {len(a)} tensors differ, by up to {max(differ.values(), default=0):.3g}"


def snapshot(folders: list[Path]) -> dict[str, str]:
    """Every file (its sha256) and folder under `folders`: a change, a deletion and a new file all show."""
    state = {}
    for folder in folders:
        for path in [folder, *folder.rglob("*")]:
            state[str(path)] = "folder" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return state


VOCAB = 128
"""The vocabulary of the tiny models of `tiny_model`."""
MODELS = {
    # Falcon-7B: parallel attention, one key/value head for all query heads (a class swap: no AttentionInterface).
    "falcon-7b": {"model_type": "falcon", "new_decoder_architecture": False, "multi_query": True,
                  "parallel_attn": True, "bias": False, "alibi": False},
    # Falcon-40B: the new decoder architecture, grouped key/value heads (2 groups of 2 query heads here).
    "falcon-40b": {"model_type": "falcon", "new_decoder_architecture": True, "num_kv_heads": 2, "bias": False,
                   "alibi": False},
    # The families that dispatch through transformers' AttentionInterface, each with grouped key/value heads
    # (left grouped by our kernels) but GPT-NeoX, which has none.
    "llama": {"model_type": "llama", "num_key_value_heads": 2, "intermediate_size": 96},
    # A sliding window of 3 tokens, shorter than the samples the packing tests pack (4 to 13 tokens): each token
    # sees only the last 3 of its own sample, and must never see one of the sample before.
    "mistral": {"model_type": "mistral", "num_key_value_heads": 2, "intermediate_size": 96, "sliding_window": 3},
    # Qwen2's q/k/v projections carry biases.
    "qwen2": {"model_type": "qwen2", "num_key_value_heads": 2, "intermediate_size": 96},
    # Pythia's layout: parallel residual, rotary on a quarter of each head.
    "gpt_neox": {"model_type": "gpt_neox", "intermediate_size": 96, "rotary_pct": 0.25, "use_parallel_residual": True},
}
"""A tiny model of every supported family (model_training/models/families.py), both Falcon layouts."""


def tiny_model(name: str, hidden: int = 64, heads: int = 4, seed: int = 0) -> PreTrainedModel:
    """A 2-layer causal LM of `MODELS[name]`, fp32, random weights from `seed`; no dropout of its own."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    options = dict(MODELS[name])
    config = AutoConfig.for_model(
        options.pop("model_type"), vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=2,
        num_attention_heads=heads, use_cache=False, **options,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).float()
