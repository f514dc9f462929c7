"""`tailor train`: a training run from any folder, in this process on one device, under torchrun on several.

With `--gpus 1` on one node the run is finetune/training/entry.py's in this process, as `python train.py` runs
it. Otherwise this process prints the torchrun command and runs it, with the entry as a module (`-m`), so that no
checkout's train.py is needed, and exits with torchrun's exit code. torchrun runs in a session of its own, and this
process passes the user's Ctrl-C or SIGTERM to rank 0 (the holder of run_dir/run.lock) alone: rank 0 tells the other
ranks, every rank saves, and torchrun exits 0. torchrun signalled itself would end in its own traceback.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

from finetune import exit_codes
from finetune.training.jobs import UnreadableError, lock_is_held, read_json_record
from finetune.training.run_lock import LOCK_FILE

ENTRY_MODULE = "finetune.training.entry"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add `tailor train`'s arguments: the config, its overrides, and torchrun's GPUs, nodes and meeting point."""
    p.add_argument("config", help="the training YAML file")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. max_steps=200")
    p.add_argument("--gpus", type=int, default=1, metavar="N", help="processes (GPUs) on this node (default 1)")
    p.add_argument("--nnodes", type=int, default=1, metavar="N", help="nodes of the run (default 1)")
    p.add_argument("--node-rank", type=int, default=0, metavar="R", help="this node's rank, 0 to nnodes-1")
    p.add_argument(
        "--rdzv-endpoint",
        metavar="HOST:PORT",
        help="where the nodes meet (node 0's host and a free port): required with --nnodes above 1",
    )


def run(args: argparse.Namespace) -> int:
    """Run `tailor train`: in this process on one device, else under torchrun.

    Returns:
        The exit code: the run's, torchrun's, or USAGE for wrong launch options; a config's error is printed once
        here, with its code, before any rank starts.
    """
    if error := launch_error(args):
        print(f"error: {error}", file=sys.stderr)
        return exit_codes.USAGE
    if args.gpus == 1 and args.nnodes == 1:
        from finetune.training.entry import run as train

        return train([args.config, *args.overrides], ["tailor", "train"])
    from finetune.config import ConfigError, load_config
    from finetune.training.model_hub import resolve_hub_model
    from finetune.training.preflight import PreflightError

    try:  # the config's mistakes said once, here, rather than by every rank; a hub model downloaded once
        config = load_config(args.config, args.overrides)
        resolve_hub_model(config)
    except (ConfigError, PreflightError) as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    command = torchrun_arguments(args)
    print("torchrun " + " ".join(shlex.quote(word) for word in command), flush=True)
    sys.stderr.flush()
    return run_torchrun(command, Path(config.run_dir) / LOCK_FILE)


def run_torchrun(command: list[str], lock: Path) -> int:
    """Run torchrun in its own session, passing the user's SIGINT and SIGTERM to rank 0.

    Args:
        command: torchrun's arguments (torchrun_arguments).
        lock: the run's run.lock; until rank 0 holds it, a signal goes to torchrun.

    Returns:
        torchrun's exit code; 128 + the signal's number where a signal ended it, as a shell says.
    """
    torchrun: subprocess.Popen | None = None
    pending: list[int] = []

    def forward(number: int, frame) -> None:
        if torchrun is None:
            pending.append(number)
        else:
            _signal(stop_target(torchrun.pid, lock), number)

    previous = {number: signal.signal(number, forward) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        torchrun = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *command], start_new_session=True)
        for number in pending:
            forward(number, None)
        code = torchrun.wait()
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    return 128 - code if code < 0 else code


def stop_target(torchrun_pid: int, lock: Path) -> int:
    """The pid a stop signal goes to: rank 0 when it holds run.lock, else torchrun.

    Rank 0 is the lock's holder when that is torchrun's child on this host; another run's lock, or one not taken yet,
    leaves torchrun.
    """
    if not lock_is_held(lock):
        return torchrun_pid
    try:
        holder = read_json_record(lock)
    except UnreadableError:
        return torchrun_pid
    pid = holder.get("pid")
    if type(pid) is not int or holder.get("host") != socket.gethostname() or _parent(pid) != torchrun_pid:
        return torchrun_pid
    return pid


def _parent(pid: int) -> int | None:
    """The parent pid of a process here (Linux's /proc); None where it cannot be told."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8", errors="replace")
        return int(stat.rpartition(")")[2].split()[1])  # after the name, which may hold spaces: state, ppid
    except (OSError, ValueError, IndexError):
        return None


def _signal(pid: int, number: int) -> None:
    try:
        os.kill(pid, number)
    except ProcessLookupError:  # it has just ended: torchrun's exit code says how
        pass


def launch_error(args: argparse.Namespace) -> str | None:
    """What is wrong with the launch options, in words; None when nothing is."""
    if args.gpus < 1:
        return f"--gpus must be at least 1, got {args.gpus}"
    if args.nnodes < 1:
        return f"--nnodes must be at least 1, got {args.nnodes}"
    if not 0 <= args.node_rank < args.nnodes:
        return f"--node-rank must be from 0 to {args.nnodes - 1} (--nnodes {args.nnodes}), got {args.node_rank}"
    if args.nnodes > 1 and not args.rdzv_endpoint:
        return "--nnodes above 1 needs --rdzv-endpoint HOST:PORT, the same on every node (node 0's host)"
    if args.rdzv_endpoint is not None:
        host, _, port = args.rdzv_endpoint.rpartition(":")
        if not host or not port.isdigit():
            return f"--rdzv-endpoint must be HOST:PORT, e.g. node0:29500, got {args.rdzv_endpoint!r}"
    return None


def torchrun_arguments(args: argparse.Namespace) -> list[str]:
    """torchrun's arguments for the run, the entry run as a module.

    One node alone picks a free port itself (--standalone); several meet at --rdzv-endpoint, as
    `torchrun --nnodes N --node-rank R --rdzv-endpoint HOST:PORT` does.
    """
    if args.nnodes == 1 and args.rdzv_endpoint is None:
        where = ["--standalone"]
    else:
        where = ["--nnodes", str(args.nnodes), "--node-rank", str(args.node_rank)]
        where += ["--rdzv-endpoint", args.rdzv_endpoint]
    return [*where, "--nproc-per-node", str(args.gpus), "-m", ENTRY_MODULE, args.config, *args.overrides]
