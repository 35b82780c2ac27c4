"""Process-group setup under the `deepspeed` launcher, `torchrun` or SLURM `srun`.

The deepspeed launcher and torchrun export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT.
`srun` exports SLURM_PROCID, SLURM_NTASKS and SLURM_LOCALID instead; they are mapped to the same names
(MASTER_ADDR/MASTER_PORT come from the sbatch script, see scripts/slurm/). Without any of these, a single
process trains alone, on a free port. Under DeepSpeed's launcher on one node a port in use is no failure: no other
node needs to know the port, so rank 0 takes a free one and tells the node's ranks (`_one_node_port`). Elsewhere a
group that cannot start (a port in use, a rank that cannot reach rank 0) is one line naming the rank, the cause and
the fix (`LaunchError`). A run on DeepSpeed starts the group through
DeepSpeed; one without (`deepspeed=false`) through torch.distributed: NCCL on GPUs, gloo on CPUs, and an in-memory
store for a process alone.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import deepspeed
import psutil
import torch
import torch.distributed as dist

from model_training.ports import free_port


class LaunchError(RuntimeError):
    """The process group did not start; the message is one line: the rank, the cause and the fix."""


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _adopt_slurm_environment() -> None:
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")


def init_distributed(local_rank_arg: int = -1, through_deepspeed: bool = True) -> DistInfo:
    """Initialize torch.distributed, through DeepSpeed (NCCL on GPUs, gloo/ccl on CPUs) or without it, and say
    who we are."""
    _adopt_slurm_environment()
    alone = "RANK" not in os.environ
    if alone:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK=str(max(local_rank_arg, 0)))
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        # Another job may hold the launchers' 29500; a process alone has no one to agree a port with.
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    # A second call (the run lock's, then the recipe's) finds the group started: its port is settled.
    note = None if dist.is_initialized() else _one_node_port()
    local_rank = int(os.environ.get("LOCAL_RANK", max(local_rank_arg, 0)))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    try:
        if through_deepspeed:
            # DeepSpeed prints "DeepSpeed ... shm_comm_op built successfully" on every CPU rank: rank 0 says it.
            quiet = contextlib.redirect_stdout(io.StringIO()) if os.environ["RANK"] != "0" else contextlib.nullcontext()
            with quiet:
                deepspeed.init_distributed(dist_init_required=not dist.is_initialized())
        elif not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if alone:  # no rendezvous, so no port: single processes side by side never collide
                dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
            else:
                dist.init_process_group(backend)
    except dist.DistError as err:
        raise LaunchError(describe_failed_start(err)) from None
    info = DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank)
    if through_deepspeed:
        _unlink_cpu_allreduce_buffer(info.rank)
    if note is not None:
        dist.barrier()  # every rank of the node has read it
        if info.rank == 0:
            note.unlink(missing_ok=True)
    global _parting_group
    if _parting_group is None and info.world_size > 1:  # made here, where every rank is, in the same order
        _parting_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=PARTING_TIMEOUT_S))
    return info


PARTING_TIMEOUT_S = 60.0
"""How long a rank that found a user mistake waits for the other ranks to find it too, before it exits anyway."""
_parting_group: dist.ProcessGroup | None = None


def part_together() -> None:
    """Wait until every rank is here, for up to PARTING_TIMEOUT_S: after a user mistake that every rank finds alike
    but not at the same instant (one still waits for the data preparation another finished). A rank that exited
    first would have its launcher stop the others mid-way, and their stop (or a preparation killed under them) would
    be reported after rank 0's one line."""
    if _parting_group is None or not dist.is_initialized():
        return
    try:
        dist.barrier(group=_parting_group)
    except (RuntimeError, dist.DistError):  # a rank that never came: it failed on its own, and says so itself
        pass


PORT_NOTE_WAIT_S = 120
"""How long the other ranks of a node wait for rank 0 to write the port it took (it starts within seconds)."""


def _one_node_port() -> Path | None:
    """Under DeepSpeed's launcher on one node (CROSS_SIZE 1), the port the ranks meet on: MASTER_PORT, or a free one
    when another process holds it. Rank 0 decides and writes it to a file named after the launcher (their parent),
    which the other ranks read; returns that file (rank 0 removes it once every rank has joined), or None elsewhere."""
    if os.environ.get("CROSS_SIZE") != "1" or "MASTER_PORT" not in os.environ:
        return None
    try:
        launcher = psutil.Process(os.getppid())
        started = int(launcher.create_time() * 1000)  # a recycled pid makes another name
    except psutil.Error:
        return None
    note = Path(tempfile.gettempdir()) / f"model_training-port-{os.getuid()}-{launcher.pid}-{started}"
    rank, port = os.environ["RANK"], int(os.environ["MASTER_PORT"])
    if rank == "0":
        if _in_use(port):
            taken, port = port, free_port()
            print(f"port {taken} is in use by another process: the ranks of this one-node run meet on port {port} "
                  "instead", file=sys.stderr)
        staged = note.with_name(note.name + ".tmp")
        staged.write_text(str(port))
        staged.replace(note)  # whole or not at all for the readers
    else:
        deadline = time.monotonic() + PORT_NOTE_WAIT_S
        while not note.exists():
            if time.monotonic() > deadline:
                raise LaunchError(f"rank {rank}: rank 0 of this node did not say its port within {PORT_NOTE_WAIT_S} s; "
                                  "its own error comes first")
            time.sleep(0.05)
        port = int(note.read_text())
    os.environ["MASTER_PORT"] = str(port)
    return note


def _in_use(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("", port))
        except OSError as err:
            return err.errno == errno.EADDRINUSE
    return False


def describe_failed_start(err: Exception) -> str:
    """The one line of a process group that did not start: which rank, why, and what to do."""
    rank, addr, port = os.environ.get("RANK", "0"), os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if "EADDRINUSE" in str(err):
        return (f"rank {rank}: port {port} on {addr} is in use by another process; choose a free one: --master_port=N "
                "for deepspeed or torchrun, MASTER_PORT=N for srun")
    cause = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return (f"rank {rank}: could not join the process group at {addr}:{port} ({cause}); rank 0 must be running "
            "there: check its own error, and that MASTER_ADDR and --master_port name it")


def _unlink_cpu_allreduce_buffer(rank: int) -> None:
    """Remove the name of DeepSpeed's CPU shared-memory all-reduce buffer once every rank has mapped it.

    On CPU ranks DeepSpeed creates /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank> (66 MB
    each) and never unlinks it, so every run, finished or crashed, leaves its buffers in RAM. Each rank
    opens the others' buffers during init; after the barrier all mappings exist and the names can go (the
    memory lives on until the processes exit).
    """
    path = Path("/dev/shm") / (
        f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR')}_{os.environ.get('MASTER_PORT')}"
        f"_{rank}"
    )
    dist.barrier()  # on every rank, whether or not a buffer exists (there is none on GPUs)
    path.unlink(missing_ok=True)
