"""One dataset prepared into its token store once, by every process that needs it working together.

`build_store(job)` runs in every process that wants the dataset (each rank of a job; a prepare command):
  1. a store that verifies is already in `job.folder`: it is opened (store.py); a damaged one is set aside, with a
     warning, and prepared again;
  2. otherwise the process forks a *preparer* and waits for it. All the preparing happens in processes forked for
     it, so a rank keeps nothing of it: its heap is what it was, and the prepared tokens reach it only through the
     mapped store. The preparer reads the input's first chunk (an unreadable input is refused before anything is
     written), then forks `job.workers` workers. The workers of every rank meet in the work folder beside the store,
     `.work-<key>` (claims.py): each cuts the dataset into the same chunks (`job.chunks`: a stream's lines, or the
     records the preparer read through the source's `load`, shared with the workers by the fork), claims the chunks
     nobody holds, tokenizes them (`job.encode`) and renames each one's arrays into place as `part-<n>.npz`. Nobody
     repeats another's chunk, and a worker is a whole process: no GIL is shared;
  3. when every part is there, one preparer claims the merge: it chooses the samples (`job.choose`: the split,
     dedupe and length rules), writes the store into a staging folder and renames it into place. The others wait
     for it.

Waiting is on files, with a progress line every `PROGRESS_EVERY` seconds (records, tokens, tokens/s, ETA) and a
timeout of its own: `job.wait_timeout` seconds in which no chunk finished. No process group is involved, so no
collective is held open however long the preparation takes. A work folder left by a job that died is picked up where
it stopped: its finished parts stay valid (same key, same inputs), its claims go stale.

A chunk whose records are malformed leaves `part-<n>.error` (the exception, pickled); once every chunk is done, the
error of the first such chunk is raised, so that the first bad record of the file is reported, as a whole-file load
reports it, and nothing of the preparation is kept. What a forked process raises reaches the process that forked it;
a preparer that a stop signal ended (a preemption) is `PreparationStopped` there, not a failure.
"""

from __future__ import annotations

import gc
import logging
import os
import pickle
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from model_training.config import ConfigError
from model_training.data.claims import ClaimBoard
from model_training.data.sources.stream import ChunkRecords
from model_training.data.store import META, StoreDamaged, TokenStore, open_store, write_meta
from model_training.folders import discard_folder, hidden_sibling
from model_training.hosts import STOP_SIGNALS

logger = logging.getLogger(__name__)

PROGRESS_EVERY = 10.0
"""Seconds between progress lines while a dataset is prepared or waited for."""
_POLL = 0.5
MERGE = "merge"
COUNT = "chunks"
"""A file in the work folder: how many chunks the dataset has (every worker finds the same)."""


class PreparationStalled(ConfigError):
    """No progress for `data_wait_timeout` seconds: a process that holds a piece of the work is gone or stuck."""


@dataclass(frozen=True)
class Chunk:
    """One chunk of a dataset: its number, how far into the dataset it ends (0..1), and how to read its records."""

    number: int
    fraction: float
    records: Callable[[], ChunkRecords]


@dataclass(frozen=True)
class RecordTable:
    """Every part's arrays but the tokens (`columns`: per record, or per sequence; encode.py), end to end in the
    dataset's order, and where each record's tokens begin in the store (from the per-record column `tokens`)."""

    columns: dict[str, np.ndarray]
    starts: np.ndarray
    skipped: int
    """Invalid records skipped (`skip_invalid`)."""


@dataclass(frozen=True)
class Chosen:
    """What `StoreJob.choose` makes of the records: the arrays that say which tokens make which sample (saved by name,
    store.py), and the counts the store keeps for `--show_dataset_stats`."""

    arrays: dict[str, np.ndarray]
    counts: dict[str, Any]


@dataclass(frozen=True)
class StoreJob:
    """Everything `build_store` needs to prepare one dataset."""

    folder: Path
    key: str
    name: str
    """The dataset as the config names it, for messages."""
    chunks: Callable[[], Iterable[Chunk]]
    """The dataset's chunks in order, the same in every process."""
    encode: Callable[[ChunkRecords], dict[str, np.ndarray]]
    choose: Callable[[RecordTable], Chosen]
    token_dtype: np.dtype
    workers: int
    """Worker processes that tokenize, per process that prepares."""
    wait_timeout: float


class PreparationStopped(Exception):
    """The preparation ended on a stop signal (its name is the message), which is not a failure: the chunks it
    finished stay for the next start, which picks them up."""


def build_store(job: StoreJob) -> tuple[TokenStore, bool]:
    """The dataset's store, prepared first when there is none; and whether it was there already."""
    store = _open_or_discard(job)
    if store is not None:
        return store, True
    in_child(partial(_prepare, job))
    return open_store(job.folder, job.key), False


def in_child(work: Callable[[], None]) -> None:
    """Run `work` in a forked process and wait for it; raise what it raised there. The child leaves with os._exit:
    nothing of the parent's (a process group, CUDA, open files) is torn down by it."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.close(read)
        # A stop signal (a preemption) ends the preparation at once: it has nothing to save, and what it finished
        # stays for the next try. The parent's handlers (a training run's) are not the child's.
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_DFL)
        status = 0
        try:
            work()
        except BaseException as err:  # noqa: BLE001 - whatever it is, the parent raises it
            status = 1
            with os.fdopen(write, "wb") as channel:
                channel.write(_portable(err))
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
    os.close(write)
    with os.fdopen(read, "rb") as channel:
        raised = channel.read()  # until the child exits
    _, status = os.waitpid(pid, 0)
    if raised:
        raise pickle.loads(raised)
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) in STOP_SIGNALS:
        raise PreparationStopped(signal.Signals(os.WTERMSIG(status)).name)
    if status:
        raise RuntimeError(f"the data preparation process {pid} ended with wait status {status} (killed?)")


def _portable(err: BaseException) -> bytes:
    """`err` pickled for another process; one that will not travel as it is goes as a RuntimeError with its message. An
    error that is not the input's fault prints its traceback here, where it is known."""
    if not isinstance(err, ValueError | ConfigError | KeyboardInterrupt):
        traceback.print_exception(err)
    try:
        pickled = pickle.dumps(err)
        pickle.loads(pickled)
        return pickled
    except Exception:  # noqa: BLE001 - an exception class whose arguments do not round-trip
        return pickle.dumps(RuntimeError(f"{type(err).__name__}: {err}"))


def _open_or_discard(job: StoreJob) -> TokenStore | None:
    try:
        return open_store(job.folder, job.key)
    except FileNotFoundError:
        return None
    except StoreDamaged as err:
        logger.warning("%s: the token store %s is damaged (%s); preparing it again", job.name, job.folder, err)
        try:
            discard_folder(job.folder, hidden_sibling(job.folder, "damaged"))
        except FileNotFoundError:  # another process set it aside first
            pass
        return None


def _prepare(job: StoreJob) -> None:
    """The preparer (a forked process): workers tokenize every chunk, then the parts are merged into the store."""
    work = job.folder.parent / f".work-{job.folder.name}"
    # The input is opened (and an unreadable one refused) before anything is written; the records a source reads
    # whole are read here, once, and shared with the workers by the fork.
    next(iter(job.chunks()), None)
    created = not work.parent.exists()
    work.mkdir(parents=True, exist_ok=True)
    board = ClaimBoard(work)
    progress = _Progress(job, work)
    try:
        while not _committed(job):
            pending = _tokenize(job, work, progress)
            if pending:
                _wait_for_chunks(job, work, board, pending, progress)
            elif work.exists():  # else another process met a fault of the input: the next pass meets it too
                _raise_first_error(work)
                _merge_or_wait(job, work, board, progress)
    except PreparationStalled:
        raise  # the work done so far stays for the next try
    except (ValueError, ConfigError):
        # The input's fault, found by every process alike: nothing of it is kept. A process still working finds the
        # folder gone, starts over, and meets the same fault.
        shutil.rmtree(work, ignore_errors=True)
        if created:
            _remove_if_empty(work.parent)
        raise
    finally:
        board.close()


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:  # not empty (or gone): another dataset's store, or another process's work
        pass


def _part(work: Path, number: int) -> Path:
    return work / f"part-{number:06d}.npz"


def _error(work: Path, number: int) -> Path:
    return work / f"part-{number:06d}.error"


def _finished(work: Path, number: int) -> bool:
    return _part(work, number).exists() or _error(work, number).exists()


def _committed(job: StoreJob) -> bool:
    return (job.folder / META).exists()


def _tokenize(job: StoreJob, work: Path, progress: _Progress) -> list[int]:
    """Fork the workers and wait for them; the numbers of the chunks still unfinished (held by other processes)."""
    workers = [_start_worker(job, work) for _ in range(job.workers)]
    failed = []
    while workers:
        for pid in list(workers):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                workers.remove(pid)
                failed += [pid] if status else []
        progress.maybe_log()
        time.sleep(_POLL / 10 if workers else 0)
    for pid in failed:  # not a fault of a record (those are in error files): a full disk, memory, a kill
        raised = work / f"failed-{pid}"
        raise pickle.loads(raised.read_bytes()) if raised.exists() else RuntimeError(
            f"a data preparation worker ({pid}) was killed; see above")
    if _committed(job) or not work.exists():
        return []  # merged by the others; or stopped by an input fault, which the next pass meets again
    progress.chunks = int((work / COUNT).read_text())
    return [n for n in range(progress.chunks) if not _finished(work, n)]


def _start_worker(job: StoreJob, work: Path) -> int:
    """The pid of a new worker."""
    pid = os.fork()
    if pid == 0:
        _worker(job, work)  # never returns
    return pid


def _worker(job: StoreJob, work: Path) -> None:
    """A worker (a forked process): tokenize every chunk nobody holds, one at a time, then leave."""
    status = 0
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already: no threads of the tokenizer's own
    # A worker lives for one preparation and makes no reference cycles worth collecting: the collector's passes over
    # millions of short-lived objects would only cost time (about 5% here).
    gc.disable()
    board = ClaimBoard(work)
    try:
        count = 0
        for chunk in job.chunks():
            if _committed(job):
                break  # merged meanwhile by the others: the work folder is gone
            count = chunk.number + 1
            work.mkdir(parents=True, exist_ok=True)  # removed by a process that met a fault of the input: start over
            if _take(work, board, chunk.number):
                _run_chunk(job, work, board, chunk)
        else:
            _save_bytes(work / COUNT, str(count).encode())
    except BaseException as err:  # noqa: BLE001 - told to the preparer, through a file
        status = 1
        _save_bytes(work / f"failed-{os.getpid()}", _portable(err))
    finally:
        board.close()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def _take(work: Path, board: ClaimBoard, number: int) -> bool:
    """Claim chunk `number` if it is unfinished; True when this process now holds it. Its owner renames a chunk's
    result into place before releasing its claim, so the look after the claim sees a chunk finished between the first
    look and the claim, which would otherwise be tokenized twice."""
    piece = f"part-{number:06d}"
    if _finished(work, number) or not board.claim(piece):
        return False
    if _finished(work, number):
        board.release(piece)
        return False
    return True


def _run_chunk(job: StoreJob, work: Path, board: ClaimBoard, chunk: Chunk) -> None:
    """Tokenize one claimed chunk into its part file; a fault of its records into its error file."""
    try:
        try:
            records = chunk.records()
            arrays = {**job.encode(records), "skipped": np.array(records.skipped, dtype=np.int64),
                      "fraction": np.array(chunk.fraction)}
        except (ValueError, ConfigError) as err:  # FileFormatError, a record the formatter refuses
            _save_bytes(_error(work, chunk.number), _portable(err))
            return
        _write_atomically(_part(work, chunk.number), lambda f: np.savez(f, **arrays))
    except FileNotFoundError:  # the work folder is gone: a fault of the input stopped the preparation
        pass
    finally:
        board.release(f"part-{chunk.number:06d}")


def _write_atomically(path: Path, write: Callable[[Any], Any]) -> None:
    """`write(binary file)` into a temporary file beside `path`, then renamed to it: a reader sees all or nothing."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _save_bytes(path: Path, data: bytes) -> None:
    _write_atomically(path, lambda f: f.write(data))


def _wait_for_chunks(job: StoreJob, work: Path, board: ClaimBoard, pending: list[int], progress: _Progress) -> None:
    """Wait until the chunks other processes hold are finished, or one of them is abandoned (then return, and the next
    pass takes it); PreparationStalled after `job.wait_timeout` seconds in which no chunk finished."""
    last_change, left = time.monotonic(), len(pending)
    while True:
        pending = [n for n in pending if not _finished(work, n)]
        if not pending or _committed(job) or not work.exists():
            return
        if any(board.take_if_stale(f"part-{n:06d}") for n in pending):
            return
        if len(pending) < left:
            last_change, left = time.monotonic(), len(pending)
        elif time.monotonic() - last_change > job.wait_timeout:
            owner = board.owner(f"part-{pending[0]:06d}") or "nobody"
            raise PreparationStalled(
                f"{job.name}: no chunk of the data preparation in {work} finished for {job.wait_timeout:.0f} s; "
                f"chunk {pending[0]} is held by {owner} (host pid). If that process is gone, run again; "
                "raise 'data_wait_timeout' if it is only slow"
            )
        progress.maybe_log()
        time.sleep(_POLL)


def _raise_first_error(work: Path) -> None:
    errors = sorted(work.glob("part-*.error"))
    if errors:
        raise pickle.loads(errors[0].read_bytes())


def _merge_or_wait(job: StoreJob, work: Path, board: ClaimBoard, progress: _Progress) -> None:
    """The store committed: merged here when this preparer wins the merge claim, else waited for."""
    last_seen = time.monotonic()
    while not _committed(job) and work.exists():
        if board.claim(MERGE):
            try:
                _merge(job, work, progress)
            finally:
                board.release(MERGE)
            shutil.rmtree(work, ignore_errors=True)
        elif not board.take_if_stale(MERGE):
            if time.monotonic() - last_seen > job.wait_timeout:
                raise PreparationStalled(
                    f"{job.name}: the merge of {work} into {job.folder} did not finish within {job.wait_timeout:.0f} "
                    f"s ('data_wait_timeout'); held by {board.owner(MERGE)}")
            progress.maybe_log()
            time.sleep(_POLL)


def _merge(job: StoreJob, work: Path, progress: _Progress) -> None:
    """Write the store from the parts into a staging folder, then rename it into place."""
    if _committed(job):
        return  # another process merged between our look and our claim
    parts = [_part(work, n) for n in range(progress.chunks)]
    table = _record_table(parts)
    chosen = job.choose(table)
    staging = hidden_sibling(job.folder, "staging")
    staging.mkdir(parents=True)
    try:
        tokens = _write_tokens(parts, staging, job.token_dtype)
        for name, values in chosen.arrays.items():
            np.save(staging / f"{name}.npy", values)
        write_meta(staging, job.key, chosen.counts)
        try:
            staging.rename(job.folder)
        except OSError:
            if not _committed(job):  # else two processes merged (a merge claim taken for stale): theirs stands
                raise
            shutil.rmtree(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("%s: token store written to %s (%.1f MB, %d tokens)", job.name, job.folder,
                sum(p.stat().st_size for p in job.folder.iterdir()) / 1e6, tokens)


def _record_table(parts: list[Path]) -> RecordTable:
    columns: dict[str, list[np.ndarray]] = {}
    skipped = 0
    for path in parts:
        with np.load(path, allow_pickle=False) as part:
            for name in part.files:
                if name not in ("ids", "mask", "skipped", "fraction"):
                    columns.setdefault(name, []).append(part[name])
            skipped += int(part["skipped"])
    merged = {name: np.concatenate(values) for name, values in columns.items()}
    tokens = merged["tokens"]
    return RecordTable(merged, starts=np.cumsum(tokens) - tokens, skipped=skipped)


def _write_tokens(parts: list[Path], staging: Path, dtype: np.dtype) -> int:
    """ids.npy and mask.npy, written part by part (memory is bounded by a part, not by the dataset); their length."""
    total = 0
    for path in parts:
        with np.load(path, allow_pickle=False) as part:
            total += len(part["mask"])
    with open(staging / "ids.npy", "wb") as ids, open(staging / "mask.npy", "wb") as mask:
        for f, kind in ((ids, dtype), (mask, np.dtype(np.uint8))):
            header = {"descr": np.lib.format.dtype_to_descr(kind), "fortran_order": False, "shape": (total,)}
            np.lib.format.write_array_header_1_0(f, header)
        for path in parts:
            with np.load(path, allow_pickle=False) as part:
                ids.write(part["ids"].astype(dtype).tobytes())
                mask.write(part["mask"].astype(np.uint8).tobytes())
    return total


@dataclass
class _Progress:
    """Progress of one dataset's preparation, from the part files of every process, logged now and then."""

    job: StoreJob
    work: Path
    chunks: int = 0
    _counted: dict[str, tuple[int, int, float]] = field(default_factory=dict)
    _start: float = field(default_factory=time.monotonic)
    _last_log: float = field(default_factory=time.monotonic)

    def maybe_log(self) -> None:
        now = time.monotonic()
        if now - self._last_log < PROGRESS_EVERY:
            return
        self._last_log = now
        for path in self.work.glob("part-*.npz"):
            if path.name not in self._counted:
                try:
                    with np.load(path, allow_pickle=False) as part:
                        self._counted[path.name] = (len(part["tokens"]), len(part["ids"]), float(part["fraction"]))
                except (OSError, ValueError):  # merged and removed meanwhile
                    continue
        records = sum(r for r, _, _ in self._counted.values())
        tokens = sum(t for _, t, _ in self._counted.values())
        rate = tokens / max(now - self._start, 1e-9)
        # Until the chunks are counted, the furthest chunk done says how far into the dataset the work has come.
        done = len(self._counted) / self.chunks if self.chunks else max((f for *_, f in self._counted.values()),
                                                                         default=0.0)
        eta = f", ETA {(now - self._start) * (1 - done) / done:.0f} s" if done else ""
        logger.info("%s: preparing: %.0f%% done, %d records, %d tokens, %.0f tokens/s%s", self.job.name, 100 * done,
                    records, tokens, rate, eta)
