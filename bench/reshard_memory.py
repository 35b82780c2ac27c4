"""Peak memory and time of the conversion for another number of ranks (model_training/training/reshard.py) on the
1.95B proxy's ZeRO-2 checkpoint of 2 ranks, on the CPU.

    python bench/reshard_memory.py --workdir /tmp/reshard-bench                       # 50 GB of disk, 5 minutes here
    python bench/reshard_memory.py --workdir /tmp/reshard-bench --layers 2 --deepspeed  # beside ds_to_universal

The proxy is bench/throughput.py's: Falcon-7B cut to 8 layers (hidden 4544, 71 heads, multi-query, parallel
attention, vocabulary 65024: 1.95B parameters; `--layers` cuts it further), bf16, ZeRO-2, 2 ranks. Training it on 2
CPU ranks would need about 40 GB of RAM (bf16 weights, fp32 masters, Adam moments and gradients on each rank), more
than the 23 GB here, so the checkpoint is written in DeepSpeed's layout instead of by DeepSpeed: the files of a real
2-rank ZeRO-2 bf16 checkpoint of the tiny model (trained one step here through trainer_sft.py) are the template, with
every tensor, shape and slice mapping made for the proxy's parameters by DeepSpeed's partitioning rule (the flat group
padded to a multiple of 2 x ranks, cut in equal parts). The script first checks the rule: applied to the tiny model's
shapes it gives the template's mappings and shard sizes exactly. The values are random (the conversion copies them; it
does not look at them): the 3.9 GB of bf16 weights, and per rank 11.7 GB of fp32 masters and moments.

Then 2 processes (a gloo group, as 2 ranks resuming on 1) convert it, each reporting its peak RSS (getrusage: the
anonymous and the file-backed pages it touched) and its wall time, and the size of what they wrote. Every step runs in
a child of a lean parent: Linux keeps a process's peak RSS across exec, so a child forked from a process that held the
fabricated tensors would report that process's peak. With `--deepspeed`, DeepSpeed's own converter then runs on the same
files (our conversion removed first, for the disk) in a process of its own, with one worker (the least memory it can
use); each child is stopped when the machine's available memory falls under 1.5 GB.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import socket
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
MIN_AVAILABLE_KB = 1_500_000
PROXY = {"hidden_size": 4544, "num_hidden_layers": 8, "num_attention_heads": 71, "multi_query": True,
         "parallel_attn": True, "new_decoder_architecture": False, "bias": False, "alibi": False, "vocab_size": 65024}
WORLD = 2
STEP = 1


def train_template(folder: Path) -> Path:
    """A real 2-rank ZeRO-2 bf16 checkpoint of the tiny model, one optimizer step, through the trainer."""
    shutil.rmtree(folder, ignore_errors=True)
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    subprocess.run([deepspeed, "--num_gpus", str(WORLD), "--master_port", str(_free_port()),
                    str(REPO / "trainer_sft.py"), "--configs", "defaults", "tiny-falcon", "oasst-sample", "dtype=bf16",
                    f"max_steps={STEP}", f"save_steps={STEP}", "eval_steps=1000", f"output_dir={folder}"], cwd=REPO,
                   env=env, check=True, stdout=subprocess.DEVNULL)
    return folder / f"checkpoint-{STEP:06d}" / f"global_step{STEP}"


def slice_mappings(shapes: OrderedDict, world: int) -> list[OrderedDict]:
    """DeepSpeed ZeRO-1/2's cut of one param group: the parameters end to end, padded to a multiple of 2 x world,
    in `world` equal partitions; each rank's (numel, start in its partition) of every parameter it holds a piece of."""
    from deepspeed.utils.tensor_fragment import fragment_address

    total = sum(math.prod(shape) for shape in shapes.values())
    size = math.ceil(total / (2 * world)) * 2 * world // world
    mappings = [OrderedDict() for _ in range(world)]
    offset = 0
    for name, shape in shapes.items():
        numel = math.prod(shape)
        for rank in range(world):
            low, high = max(offset, rank * size), min(offset + numel, (rank + 1) * size)
            if low < high:
                mappings[rank][name] = fragment_address(numel=high - low, start=low - rank * size)
        offset += numel
    return mappings


def proxy_shapes(layers: int) -> tuple[OrderedDict, dict]:
    """The proxy's trained parameters in the engine's order, and its state dict's entries (shapes), on no memory."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("falcon", **{**PROXY, "num_hidden_layers": layers})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    shapes = OrderedDict((name, tuple(p.shape)) for name, p in model.named_parameters())
    return shapes, {name: tuple(t.shape) for name, t in model.state_dict().items()}


def fabricate(template: Path, out: Path, layers: int) -> None:
    """The proxy's checkpoint of `layers` layers, committed, in `out` (a tag folder): run in a child process."""
    shapes, entries = proxy_shapes(layers)
    write_layout(template, out, shapes, entries, {"lm_head.weight": "transformer.word_embeddings.weight"})
    commit(out)
    print(json.dumps({"parameters": sum(math.prod(s) for s in shapes.values())}))


def write_layout(template: Path, out: Path, shapes: OrderedDict, entries: dict, shared: dict) -> None:
    """`out` in the template's layout for parameters of `shapes` (module entries `entries`, tied names `shared`)."""
    import torch

    out.mkdir(parents=True)
    model_states = torch.load(template / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    tensors = {}
    for name, shape in entries.items():
        if name not in shared:  # a tied name is saved as its source's storage
            tensors[name] = torch.empty(shape, dtype=torch.bfloat16).uniform_(-0.02, 0.02)
    for alias, source in shared.items():
        tensors[alias] = tensors[source]
    model_states.update(module=tensors, param_shapes=[OrderedDict((n, torch.Size(s)) for n, s in shapes.items())],
                        shared_params=shared)
    torch.save(model_states, out / "mp_rank_00_model_states.pt")
    del tensors, model_states
    mappings = slice_mappings(shapes, WORLD)
    size = math.ceil(sum(math.prod(s) for s in shapes.values()) / (2 * WORLD)) * 2
    for rank in range(WORLD):
        name = f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
        state = torch.load(template / name, map_location="cpu", weights_only=False)
        optim = state["optimizer_state_dict"]
        # File-backed scratch tensors: the 11.7 GB of a rank's shard go through the page cache, not this process.
        flats = [_scratch(out / f".scratch-{key}", size, low) for key, low in (("fp32", -0.02), ("m", -1e-3),
                                                                               ("v", 0.0))]
        optim["single_partition_of_fp32_groups"] = [flats[0]]
        optim["base_optimizer_state"]["state"][0].update(exp_avg=flats[1], exp_avg_sq=flats[2])
        optim["param_slice_mappings"] = [mappings[rank]]
        optim["group_paddings"] = [0 if rank < WORLD - 1 else WORLD * size - sum(math.prod(s) for s in shapes.values())]
        torch.save(state, out / name)
        del state, optim, flats
        for scratch in out.glob(".scratch-*"):
            scratch.unlink()


def _scratch(path: Path, numel: int, low: float) -> object:
    import torch

    tensor = torch.from_file(str(path), shared=True, size=numel, dtype=torch.float32)
    for start in range(0, numel, 1 << 26):
        tensor.narrow(0, start, min(1 << 26, numel - start)).uniform_(low, abs(low) or 1e-6)
    return tensor


def check_layout(template: Path) -> None:
    """The partitioning rule reproduces the template's mappings and shard sizes; SystemExit otherwise."""
    import torch

    model_states = torch.load(template / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    (shapes,) = model_states["param_shapes"]
    ours = slice_mappings(OrderedDict((n, tuple(s)) for n, s in shapes.items()), WORLD)
    for rank in range(WORLD):
        real = torch.load(template / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", map_location="cpu",
                          weights_only=False)["optimizer_state_dict"]
        if dict(real["param_slice_mappings"][0]) != dict(ours[rank]):
            raise SystemExit(f"rank {rank}: the partitioning rule does not give DeepSpeed's slice mappings")
        expected = math.ceil(sum(math.prod(s) for s in shapes.values()) / (2 * WORLD)) * 2
        if real["single_partition_of_fp32_groups"][0].numel() != expected:
            raise SystemExit(f"rank {rank}: DeepSpeed's partition holds {real['single_partition_of_fp32_groups'][0]}")
    print("layout check: the rule gives the template's slice mappings and partition sizes", flush=True)


def commit(tag_dir: Path) -> Path:
    """The fabricated tag folder inside a committed checkpoint (manifest of sizes and hashes), as a save leaves it."""
    from model_training.checkpoints.read import FORMAT_VERSION, file_digest
    from model_training.training.checkpoint import relative_name

    ckpt = tag_dir.parent
    (ckpt / "trainer_state.json").write_text(json.dumps({"optimizer_step": STEP}))
    files = {relative_name(p, ckpt): file_digest(p) for p in sorted(ckpt.rglob("*")) if p.is_file()}
    manifest = {"format_version": FORMAT_VERSION, "step": STEP, "world_size": WORLD, "deepspeed_tag": tag_dir.name,
                "zero_stage": 2, "files": files}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    return ckpt


def convert(rank: int, port: int, ckpt: Path) -> None:
    """One rank of the conversion: its peak RSS and seconds, as one JSON line."""
    import torch.distributed as dist

    from model_training.training.reshard import convert_for_any_ranks

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    start = time.perf_counter()
    convert_for_any_ranks(ckpt, [ckpt], verify_hashes=False)
    seconds = time.perf_counter() - start
    print(json.dumps({"rank": rank, "seconds": round(seconds, 1),
                      "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}))
    dist.destroy_process_group()


def deepspeed_convert(tag_dir: Path, out: Path) -> None:
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    start = time.perf_counter()
    ds_to_universal(argparse.Namespace(input_folder=str(tag_dir), output_folder=str(out), num_extract_workers=1,
                                       num_merge_workers=1, keep_temp_folder=False, strict=True,
                                       inject_missing_state=True))
    print(json.dumps({"seconds": round(time.perf_counter() - start, 1),
                      "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}))


def _guarded(commands: list[list[str]]) -> list[dict]:
    """Run `commands` side by side; their last stdout lines as JSON. Stopped when the machine runs short of memory."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    children = [subprocess.Popen(c, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True, start_new_session=True)
                for c in commands]
    while any(child.poll() is None for child in children):
        if _available_kb() < MIN_AVAILABLE_KB:
            for child in children:
                os.killpg(child.pid, 9)
            raise SystemExit(f"stopped {commands[0][2:4]}: less than {MIN_AVAILABLE_KB // 1000} MB of RAM left")
        time.sleep(0.2)
    if any(child.returncode for child in children):
        raise SystemExit(f"{commands[0][2:4]} failed")
    return [json.loads(child.stdout.read().strip().splitlines()[-1]) for child in children]


def _available_kb() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gib(folder: Path) -> float:
    return round(sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**30, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/reshard-bench"))
    parser.add_argument("--layers", type=int, default=PROXY["num_hidden_layers"])
    parser.add_argument("--deepspeed", action="store_true", help="also run DeepSpeed's ds_to_universal")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint and the conversions")
    parser.add_argument("--fabricate", nargs=2, type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--convert", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--ds", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.fabricate:  # the children
        fabricate(*args.fabricate, args.layers)
        return
    if args.convert:
        convert(int(args.convert[0]), int(args.convert[1]), Path(args.convert[2]))
        return
    if args.ds:
        deepspeed_convert(Path(args.ds[0]), Path(args.ds[1]))
        return

    template = train_template(args.workdir / "template")
    check_layout(template)
    tag_dir = args.workdir / "proxy" / f"checkpoint-{STEP:06d}" / f"global_step{STEP}"
    shutil.rmtree(args.workdir / "proxy", ignore_errors=True)
    started = time.perf_counter()
    (made,) = _guarded([[sys.executable, __file__, "--fabricate", str(template), str(tag_dir), "--layers",
                         str(args.layers)]])
    ckpt = tag_dir.parent
    print(f"{made['parameters'] / 1e9:.3f}B parameters; checkpoint of {_gib(ckpt)} GiB written in "
          f"{time.perf_counter() - started:.0f} s", flush=True)

    port = _free_port()
    ranks = _guarded([[sys.executable, __file__, "--convert", str(rank), str(port), str(ckpt)]
                      for rank in range(WORLD)])
    print(json.dumps({"converter": "ours, 2 ranks", "ranks": ranks, "written_gib": _gib(ckpt / "universal")}),
          flush=True)
    if args.deepspeed:
        shutil.rmtree(ckpt / "universal")
        out = args.workdir / "ds_to_universal" / tag_dir.name
        (result,) = _guarded([[sys.executable, __file__, "--ds", str(tag_dir), str(out)]])
        print(json.dumps({"converter": "ds_to_universal, 1 worker", **result, "written_gib": _gib(out)}), flush=True)
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
