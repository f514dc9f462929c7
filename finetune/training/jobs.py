"""`tailor runs` and `tailor stop`: run folders as jobs, listed, shown in detail, and stopped as Ctrl-C stops them.

A run folder's state is read from what the run leaves there: run.lock (held while it runs, naming its pid and
host), status.json (how it ended), metrics.jsonl, config.yaml and its checkpoints. Those files may come from anywhere
(a copy, another version, a hand): each is read only if it is a regular file of a bounded size, and whatever its
bytes, what cannot be read is one line saying so, never a traceback.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import signal
import socket
import stat
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from finetune import exit_codes
from finetune.checkpoints.folders import list_checkpoints
from finetune.checkpoints.manifest import MANIFEST, verify_checkpoint
from finetune.config import TrainConfig, config_to_dict
from finetune.data.data_report import DataReport
from finetune.planning.eta import format_eta
from finetune.training.config_record import CONFIG_FILE, setting_changes
from finetune.training.monitoring import METRICS_FILE
from finetune.training.run_lock import LOCK_FILE
from finetune.training.run_status import FAILED, STATUS_FILE

EVAL_GENERATIONS_FILE = "eval_generations.jsonl"
SMALL_FILE_BYTES = 1 << 20  # run.lock, status.json, config.yaml: anything larger is not tailor's
METRICS_TAIL_BYTES = 4 << 20  # the end of metrics.jsonl that is read: the last records are all a listing needs
RUN_FILES = (
    LOCK_FILE,
    METRICS_FILE,
    STATUS_FILE,
)  # a folder with one of these is a run folder (a config.yaml alone is not)
POLL_SECONDS = 0.5


@dataclass
class RunState:
    """What a run folder says of its run; None where it does not say."""

    folder: Path
    state: str = "unknown"  # running, finished, stopped, failed, or not started
    detail: str = ""  # running: pid and host; failed: the error's first line
    pid: int | None = None
    host: str | None = None
    step: int | None = None
    max_steps: int | None = None
    loss: float | None = None
    eval_loss: float | None = None
    tokens_per_s: float | None = None
    eta_s: float | None = None
    checkpoint: Path | None = None
    records: dict = field(default_factory=dict)  # the last metrics.jsonl record of each kind
    notes: list[str] = field(default_factory=list)  # what could not be read, in words


# ---------------------------------------------------------------------------------------------------
# Reading a run folder's files, trusting none of them


class UnreadableError(ValueError):
    """A run's file that is not what tailor writes there; the message says what it is instead."""


def read_bounded(path: Path, limit: int, tail: bool = False) -> bytes:
    """The bytes of a regular file, at most `limit` of them.

    Args:
        tail: read the file's last `limit` bytes; else a larger file is refused.

    Raises:
        UnreadableError: naming the file: it cannot be opened, is a FIFO, a device or a folder (refused without
            waiting on it), or is larger than `limit` without `tail`.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as error:
        raise UnreadableError(f"{path}: cannot be read ({error.strerror or error})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UnreadableError(f"{path}: not a regular file")
        if info.st_size > limit and not tail:
            raise UnreadableError(f"{path}: {info.st_size:,} bytes, more than a run writes there")
        start = max(0, info.st_size - limit)
        return os.pread(fd, limit, start)
    except OSError as error:
        raise UnreadableError(f"{path}: cannot be read ({error.strerror or error})") from None
    finally:
        os.close(fd)


def read_json_record(path: Path) -> dict:
    """A small JSON file holding one object.

    Raises:
        UnreadableError: naming the file and what it holds instead (not readable, too large, not JSON, not an object).
    """
    data = read_bounded(path, SMALL_FILE_BYTES)
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):
        raise UnreadableError(f"{path}: not valid JSON") from None
    if not isinstance(value, dict):
        raise UnreadableError(f"{path}: not a JSON object")
    return value


def tail_records(path: Path, limit: int = METRICS_TAIL_BYTES) -> tuple[list[dict], int]:
    """The JSON objects of the last `limit` bytes of a JSON Lines file.

    Returns:
        The objects (the first, maybe cut, line left out when the file is longer), and how many lines were not JSON
        objects.

    Raises:
        UnreadableError: the file cannot be read, or is not a regular file.
    """
    data = read_bounded(path, limit, tail=True)
    lines = data.split(b"\n")
    if len(data) == limit:
        lines = lines[1:]
    records, bad = [], 0
    for line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            bad += 1
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            bad += 1
    return records, bad


def lock_is_held(path: Path) -> bool:
    """Whether a process holds run.lock's flock now (tried shared, released at once: the holder keeps it)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing the file releases a lock taken here


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _whole(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def read_run(folder: Path, metrics_tail: int = METRICS_TAIL_BYTES) -> RunState:
    """What a run folder says of its run: state, last records, ETA, newest intact checkpoint; the unreadable, noted.

    Args:
        metrics_tail: the bytes read from the end of metrics.jsonl.
    """
    run = RunState(folder)
    _read_metrics(run, metrics_tail)
    _read_state(run)
    if run.state == "running" and None not in (run.step, run.max_steps) and run.step:
        elapsed = _number(run.records.get("train", {}).get("elapsed_s"))
        if elapsed is not None:
            run.eta_s = elapsed / run.step * max(run.max_steps - run.step, 0)
    run.checkpoint = newest_intact_checkpoint(folder, run.notes)
    return run


def _read_state(run: RunState) -> None:
    lock = run.folder / LOCK_FILE
    if lock_is_held(lock):
        run.state = "running"
        try:
            holder = read_json_record(lock)
            run.pid, run.host = _whole(holder.get("pid")), holder.get("host")
            run.host = run.host if isinstance(run.host, str) else None
            run.detail = f"pid {run.pid} on {run.host}" if run.pid and run.host else "its holder has not said who it is"
        except UnreadableError as error:
            run.detail = "its holder has not said who it is"
            run.notes.append(str(error))
        return
    if not (run.folder / STATUS_FILE).exists():
        started = run.records or (run.folder / CONFIG_FILE).exists()
        run.state = "stopped" if started else "not started"
        run.detail = "no status.json: killed, or its machine lost" if started else ""
        return
    try:
        status = read_json_record(run.folder / STATUS_FILE)
    except UnreadableError as error:
        run.notes.append(str(error))
        return
    state = status.get("state")
    run.state = state if state in ("finished", "stopped", FAILED) else "unknown"
    error = status.get("error")
    if run.state == FAILED and isinstance(error, str):
        run.detail = error.splitlines()[0][:300] if error.strip() else ""


def _read_metrics(run: RunState, tail: int) -> None:
    path = run.folder / METRICS_FILE
    if not path.exists():
        return
    try:
        records, bad = tail_records(path, tail)
    except UnreadableError as error:
        run.notes.append(str(error))
        return
    if bad:
        run.notes.append(f"{path}: {bad} line(s) not JSON records, left out")
    for record in records:
        run.records[str(record.get("kind", "train"))] = record
    train, eval_ = run.records.get("train", {}), run.records.get("eval", {})
    run.step, run.max_steps = _whole(train.get("step")), _whole(train.get("max_steps"))
    run.loss, run.tokens_per_s = _number(train.get("loss")), _number(train.get("tokens_per_s"))
    run.eval_loss = _number(eval_.get("eval_loss"))


def newest_intact_checkpoint(run_dir: Path, notes: list[str]) -> Path | None:
    """The newest checkpoint whose manifest verifies (resume's choice), damaged ones noted."""
    try:
        found = list_checkpoints(run_dir)
    except OSError as error:
        notes.append(f"{run_dir / 'checkpoints'}: cannot be listed ({error.strerror or error})")
        return None
    for folder in reversed(found):
        manifest = folder / MANIFEST
        fault = (
            verify_checkpoint(folder)
            if manifest.is_file() and manifest.stat().st_size <= SMALL_FILE_BYTES
            else f"{MANIFEST} is missing or not tailor's"
        )
        if fault is None:
            return folder
        notes.append(f"{folder}: not intact ({fault})")
    return None


def run_folders(root: Path) -> list[Path]:
    """The run folders directly under root, by name."""
    return sorted(p for p in root.iterdir() if p.is_dir() and is_run_folder(p))


def is_run_folder(folder: Path) -> bool:
    """Whether a folder holds a run's run.lock, metrics.jsonl or status.json (a config.yaml alone is not a run)."""
    return any((folder / name).exists() for name in RUN_FILES)


# ---------------------------------------------------------------------------------------------------
# tailor runs


def add_runs_arguments(p: argparse.ArgumentParser) -> None:
    """Add `tailor runs`' argument: a folder of run folders, or one run folder."""
    p.add_argument(
        "root",
        nargs="?",
        type=Path,
        default=Path("runs"),
        help="a folder of run folders (default runs/), or one run folder to show in detail",
    )


def run_runs(args: argparse.Namespace) -> int:
    """Run `tailor runs`: a table of the run folders under root, or one run folder in detail.

    Returns:
        The exit code: OK, or USAGE when root is not a folder.
    """
    root: Path = args.root
    if not root.is_dir():
        print(f"error: {root} is not a folder", file=sys.stderr)
        return exit_codes.USAGE
    if is_run_folder(root):
        print("\n".join(describe_run_folder(read_run(root, metrics_tail=8 * METRICS_TAIL_BYTES))))
        return exit_codes.OK
    folders = run_folders(root)
    if not folders:
        print(f"no run folders in {root} (a run folder holds {', '.join(RUN_FILES)})")
        return exit_codes.OK
    runs = [read_run(folder) for folder in folders]
    print("\n".join(runs_table(runs)))
    for run in runs:
        for note in run.notes:
            print(f"note: {note}")
    return exit_codes.OK


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def runs_table(runs: list[RunState]) -> list[str]:
    """The listing's lines: a header, then per run its status, step, losses, tokens/s, ETA and checkpoint."""
    header = ("run", "status", "step", "loss", "eval loss", "tokens/s", "ETA", "newest intact checkpoint")
    rows = [header]
    for run in runs:
        status = f"{run.state} ({run.detail})" if run.detail else run.state
        rows.append(
            (
                run.folder.name,
                status,
                f"{_fmt(run.step, 'd')}/{_fmt(run.max_steps, 'd')}",
                _fmt(run.loss, ".4f"),
                _fmt(run.eval_loss, ".4f"),
                _fmt(run.tokens_per_s, ",.0f"),
                "-" if run.eta_s is None else format_eta(run.eta_s),
                run.checkpoint.name if run.checkpoint else "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]


def describe_run_folder(run: RunState) -> list[str]:
    """The lines of `tailor runs RUN_DIR`.

    They hold the listing's numbers, the config's changes from the defaults, the data report and the last eval
    generations.
    """
    lines = [f"run {run.folder}", f"  status: {run.state}" + (f" ({run.detail})" if run.detail else "")]
    lines.append(f"  step {_fmt(run.step, 'd')} of {_fmt(run.max_steps, 'd')}")
    lines.append(f"  last loss {_fmt(run.loss, '.4f')}, last eval loss {_fmt(run.eval_loss, '.4f')}")
    lines.append(f"  tokens/s {_fmt(run.tokens_per_s, ',.0f')}")
    if run.eta_s is not None:
        lines.append(f"  ETA {format_eta(run.eta_s)}")
    lines.append(f"  newest intact checkpoint: {run.checkpoint or 'none'}")
    lines += _config_changes(run.folder / CONFIG_FILE)
    lines += _data_report(run.records.get("data"))
    lines += _eval_generations(run.folder / EVAL_GENERATIONS_FILE)
    lines += [f"note: {note}" for note in run.notes]
    return lines


def _config_changes(path: Path) -> list[str]:
    if not path.exists():
        return [f"config: no {CONFIG_FILE} yet"]
    try:
        recorded = yaml.safe_load(read_bounded(path, SMALL_FILE_BYTES))
    except UnreadableError as error:
        return [f"config: {error}"]
    except (yaml.YAMLError, ValueError, RecursionError):
        return [f"config: {path}: not valid YAML"]
    if not isinstance(recorded, dict):
        return [f"config: {path}: not a mapping of settings"]
    defaults = yaml.safe_load(yaml.safe_dump(config_to_dict(TrainConfig())))
    changes = setting_changes(defaults, recorded)
    return [f"config ({path}), changed from the defaults:", *(f"  {change}" for change in changes)]


def _data_report(record: dict | None) -> list[str]:
    if record is None:
        return ["data: no data report in metrics.jsonl's last records"]
    try:
        report = DataReport.from_record(record)
        return ["data (as reported before step 1):", *(f"  {line}" for line in report.lines())]
    except (KeyError, TypeError, ValueError, AttributeError):
        return ["data: metrics.jsonl's data report cannot be read"]


def _eval_generations(path: Path) -> list[str]:
    if not path.exists():
        return []
    try:
        records, bad = tail_records(path)
    except UnreadableError as error:
        return [f"eval generations: {error}"]
    steps = [step for r in records if (step := _whole(r.get("step"))) is not None]
    if not steps:
        return [f"eval generations: {path} holds no record with a step" + (f" ({bad} bad lines)" if bad else "")]
    last = max(steps)
    lines = [f"eval generations at step {last} ({path}):"]
    for record in (r for r in records if r.get("step") == last):
        for key, value in record.items():
            if key != "step":
                text = value if isinstance(value, str) else json.dumps(value)
                lines.append(f"  {key}: {text[:500]}" + (" ..." if len(text) > 500 else ""))
        lines.append("")
    return lines


# ---------------------------------------------------------------------------------------------------
# tailor stop


def add_stop_arguments(p: argparse.ArgumentParser) -> None:
    """Add `tailor stop`'s arguments: the run folder, and how long to wait."""
    p.add_argument("run_dir", type=Path, help="the run folder of the run to stop")
    p.add_argument(
        "--timeout",
        type=float,
        metavar="S",
        help="give up waiting after S seconds (the run still stops); default: wait until it has",
    )


def run_stop(args: argparse.Namespace) -> int:
    """Run `tailor stop`: SIGTERM to the process holding the run's lock, then wait until the lock is free.

    Under torchrun that process is rank 0: the ranks agree on the step to stop after, each checkpoints, and torchrun
    exits 0.

    Returns:
        The exit code: OK once the run has stopped; USAGE when no run holds the folder, its holder cannot be told or
        signalled from here, or it still runs after --timeout.
    """
    run_dir: Path = args.run_dir
    lock = run_dir / LOCK_FILE
    if not lock_is_held(lock):
        print(
            f"error: {run_dir}: no run holds it (its {LOCK_FILE} is free or absent): nothing to stop", file=sys.stderr
        )
        return exit_codes.USAGE
    try:
        holder = read_json_record(lock)
    except UnreadableError as error:
        print(f"error: {error}: cannot tell which process to stop", file=sys.stderr)
        return exit_codes.USAGE
    pid, host = _whole(holder.get("pid")), holder.get("host")
    if pid is None or pid <= 1 or not isinstance(host, str):
        print(f"error: {lock}: names no process to stop (pid {pid!r}, host {host!r})", file=sys.stderr)
        return exit_codes.USAGE
    if host != socket.gethostname():
        print(
            f"error: {run_dir}: the run is on host {host} (pid {pid}); run `tailor stop {run_dir}` there",
            file=sys.stderr,
        )
        return exit_codes.USAGE
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        print(f"error: {run_dir}: pid {pid} holds its lock but is not a process here", file=sys.stderr)
        return exit_codes.USAGE
    except PermissionError:
        print(f"error: {run_dir}: pid {pid} is another user's process; it cannot be stopped from here", file=sys.stderr)
        return exit_codes.USAGE
    print(
        f"asked pid {pid} on {host} to stop (SIGTERM): it finishes its step, saves a checkpoint and exits", flush=True
    )
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    while lock_is_held(lock):
        if deadline is not None and time.monotonic() > deadline:
            print(f"error: {run_dir}: still running after {args.timeout:g} s; it was asked to stop", file=sys.stderr)
            return exit_codes.USAGE
        time.sleep(POLL_SECONDS)
    run = read_run(run_dir)
    print(f"{run_dir}: {run.state}" + (f" ({run.detail})" if run.detail else "") + f" at step {_fmt(run.step, 'd')}")
    if run.checkpoint:
        print(f"newest intact checkpoint: {run.checkpoint}")
    return exit_codes.OK
