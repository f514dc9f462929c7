"""One run per run_dir: an OS lock on run_dir/run.lock, held by rank 0 for the whole run.

The lock is `flock` on the open file, so the kernel releases it when the process ends, however it ends: a `kill -9`
leaves nothing stale to clear, and the file itself (which says who holds it) may stay. A second run in the same
run_dir stops before it changes anything there, with exit code 3 and the holder's pid, host, command and
start time. Two runs in one folder would interleave metrics.jsonl and delete each other's checkpoints.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

import torch.distributed as dist

from finetune import exit_codes
from finetune.training.distributed import DistInfo, is_initialized

LOCK_FILE = "run.lock"


class RunLockedError(RuntimeError):
    """Another process holds the run folder; the message names it."""

    exit_code = exit_codes.RUN_LOCKED


class RunLock:
    """The held lock (rank 0's file; None on other ranks), freed at the end of a `with` block or of the process."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the file releases the flock
            self.fd = None


def lock_run_dir(run_dir: Path, dist_info: DistInfo, command: str) -> RunLock:
    """Take run_dir's lock on rank 0 (creating run_dir), and tell every rank whether it could.

    Rank 0's lock stands for the run: only rank 0 writes metrics and renames checkpoints.

    Args:
        command: the command line that started the run, which the lock file records for a second run to name.

    Returns:
        The held lock, to use in a `with` block (holding nothing on the other ranks).

    Raises:
        RunLockedError: on every rank, when another process holds the lock, naming it.
    """
    lock, refusal = RunLock(None), None
    if dist_info.is_main:
        try:
            lock = RunLock(_take(Path(run_dir), command))
        except RunLockedError as error:
            refusal = str(error)
    if is_initialized():
        box = [refusal]
        dist.broadcast_object_list(box, src=0)
        refusal = box[0]
    if refusal is not None:
        raise RunLockedError(refusal)
    return lock


def _take(run_dir: Path, command: str) -> int:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # never truncated before the lock is ours
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunLockedError(
            f"run_dir {run_dir} is in use by another run ({_holder(path)}): one run per run_dir. Wait for it to end "
            f"or stop it, or choose another run_dir (e.g. run_dir={run_dir}-2 on the command line)"
        ) from None
    holder = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": command,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
    return fd


def _holder(path: Path) -> str:
    """Who holds the lock, as its file says; it may not have written it yet."""
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
        return f"pid {holder['pid']} on {holder['host']}, started {holder['started']}: {holder['command']}"
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return "a process that has not said who it is yet"
