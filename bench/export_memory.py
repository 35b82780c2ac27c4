"""Peak memory and time of export_model.py on a ~1B-parameter Falcon checkpoint (or any checkpoint you name).

    DS_ACCELERATOR=cpu python bench/export_memory.py --workdir /tmp/export-bench            # ZeRO-2 and ZeRO-3
    DS_ACCELERATOR=cpu python bench/export_memory.py --measure RUN_OR_CHECKPOINT --workdir /tmp/export-bench

Without --measure, for each --stage: a 1-rank DeepSpeed engine of a random-weight Falcon (hidden 2048, 32
heads, multi-query, parallel attention, vocabulary 65024, --layers decoder layers: 21 gives 1.02B
parameters) trained in bf16 saves one checkpoint through the trainer's own save_checkpoint (no step taken:
the optimizer shards hold the fp32 masters, DeepSpeed creates the Adam moments at the first step, and the
moments would need 8 GB more RAM here). Then the export runs in a fresh process, which reports its own peak
RSS (getrusage: anonymous and file-backed pages) and its wall time, next to the size of the bf16 weights
written. Needs about 12 GB of free RAM and 10 GB of disk per stage; a watchdog stops a child when the
machine's available memory falls under 1.5 GB, so that a shared machine is not pushed into the OOM killer.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MIN_AVAILABLE_KB = 1_500_000


def fabricate(stage: int, layers: int, out: Path) -> None:
    """Run under the deepspeed launcher (1 rank): build the model, wrap it, save one committed checkpoint."""
    import deepspeed
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from model_training.data.formatting import prepare_tokenizer
    from model_training.layout import MODEL_CONFIG_DIR, TOKENIZER_DIR
    from model_training.training.checkpoint import save_checkpoint

    deepspeed.init_distributed()
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(REPO / "data" / "tokenizer"))
    config = AutoConfig.for_model(
        "falcon", hidden_size=2048, num_hidden_layers=layers, num_attention_heads=32, multi_query=True,
        parallel_attn=True, new_decoder_architecture=False, bias=False, alibi=False, vocab_size=65024,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e9:.3f}B parameters", flush=True)
    ds_config = {
        "train_micro_batch_size_per_gpu": 1,
        "bf16": {"enabled": True},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-5, "weight_decay": 0.0}},
        # Small buckets and sub-groups: the transient buffers of engine setup stay far below the model size.
        "zero_optimization": {"stage": stage, "reduce_bucket_size": 5e7, "allgather_bucket_size": 5e7,
                              "sub_group_size": 1e8},
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)

    def write_extra(folder: Path) -> None:
        tokenizer.save_pretrained(folder / TOKENIZER_DIR)
        engine.module.config.save_pretrained(folder / MODEL_CONFIG_DIR)
        engine.module.generation_config.save_pretrained(folder / MODEL_CONFIG_DIR)

    save_checkpoint(engine, out, step=0, trainer_state={}, save_total_limit=None, write_extra=write_extra)


def measure(checkpoint: Path, output: Path, max_shard_size: str) -> dict:
    """Export ``checkpoint`` to bf16 in this process; peak RSS before (imports) and after, wall time."""
    import deepspeed  # noqa: F401  (imported before the baseline, as unpickling the shards imports it)
    import transformers  # noqa: F401

    from model_training.export.cli import main_export

    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    status = main_export([str(checkpoint), "--output_folder", str(output), "--dtype", "bf16",
                          "--max_shard_size", max_shard_size, "--overwrite"])
    seconds = time.perf_counter() - start
    weights = sum(p.stat().st_size for p in output.glob("*.safetensors")) if status == 0 else 0
    return {
        "status": status,
        "seconds": round(seconds, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**20, 1),
        "rss_after_imports_mib": round(baseline / 2**20, 1),
        "bf16_weights_mib": round(weights / 2**20, 1),
        "checkpoint_files_mib": round(sum(p.stat().st_size for p in checkpoint.rglob("*.pt")) / 2**20, 1),
    }


def _available_kb() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))


def _run_guarded(cmd: list[str], capture: bool = True) -> str | None:
    """Run ``cmd``; stop it if the machine runs short of memory. Returns its stdout when ``capture``."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"),
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    stdout = subprocess.PIPE if capture else None
    with subprocess.Popen(cmd, cwd=REPO, env=env, stdout=stdout, text=True, start_new_session=True) as child:
        while child.poll() is None:
            if _available_kb() < MIN_AVAILABLE_KB:
                os.killpg(child.pid, 9)
                raise SystemExit(f"stopped {cmd[:4]}: less than {MIN_AVAILABLE_KB // 1000} MB of RAM left")
            time.sleep(0.2)
        output = child.stdout.read() if capture else None
    if child.returncode != 0:
        raise SystemExit(f"{cmd[:4]} failed with status {child.returncode}")
    return output


def _measure_in_child(checkpoint: Path, output: Path, max_shard_size: str) -> dict:
    stdout = _run_guarded([sys.executable, __file__, "--measure", str(checkpoint), "--output", str(output),
                           "--max_shard_size", max_shard_size, "--json"])
    return json.loads(stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/export-bench"))
    parser.add_argument("--stage", type=int, nargs="+", default=[2, 3], choices=[1, 2, 3])
    parser.add_argument("--layers", type=int, default=21)
    parser.add_argument("--max_shard_size", default="2GB")
    parser.add_argument("--keep", action="store_true", help="keep the fabricated checkpoints and exports")
    parser.add_argument("--measure", type=Path, help="only export this run or checkpoint folder and report")
    parser.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--fabricate", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.fabricate is not None:  # the launcher's child
        fabricate(args.stage[0], args.layers, args.fabricate)
        return
    if args.json:  # the measuring child: one JSON line last
        print(json.dumps(measure(args.measure, args.output, args.max_shard_size)))
        return
    if args.measure is not None:
        print(json.dumps(_measure_in_child(args.measure, args.workdir / "export", args.max_shard_size), indent=2))
        return

    deepspeed_launcher = str(Path(sys.executable).parent / "deepspeed")
    for stage in args.stage:
        run = args.workdir / f"zero{stage}-run"
        shutil.rmtree(run, ignore_errors=True)
        started = time.perf_counter()
        _run_guarded([deepspeed_launcher, "--num_gpus", "1", __file__, "--fabricate", str(run), "--stage", str(stage),
                      "--layers", str(args.layers)], capture=False)
        print(f"ZeRO-{stage} checkpoint saved in {time.perf_counter() - started:.0f} s")
        result = _measure_in_child(run, args.workdir / f"zero{stage}-export", args.max_shard_size)
        print(json.dumps({"stage": stage, **result}), flush=True)
        if not args.keep:
            shutil.rmtree(run)
            shutil.rmtree(args.workdir / f"zero{stage}-export", ignore_errors=True)


if __name__ == "__main__":
    main()
