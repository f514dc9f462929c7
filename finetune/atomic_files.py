"""Files and folders that appear whole or not at all: written aside under one temporary name, made durable, then
renamed into place. Every file tailor writes atomically goes through here.

The temporary of `NAME` is `.NAME.tmp-PID` in the same folder: hidden, on the same file system (so the rename is
atomic), and per process, so two processes writing the same file (two ranks recording one digest) never share one.
A process killed while writing leaves its temporary behind; `clear_leftovers` removes them where one process is known
to be the only writer.

The one fsync rule: the bytes are made durable before the rename (every file and folder, for a folder) and the folder
that holds the target after it, so a crash leaves the old target or the new one, whole, and the new one survives a
power loss once the call returns. An exception leaves the target as it was and no temporary.

Standard library only: checkpoints/, data/, training/ and after/ all import it.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

_TEMPORARY_NAME = re.compile(r"\.(.+)\.tmp-\d+")


def temporary_path(target: str | Path) -> Path:
    """Where `target` is written before it is renamed into place: `.NAME.tmp-PID` beside it."""
    target = Path(target)
    return target.with_name(f".{target.name}.tmp-{os.getpid()}")


def is_temporary(path: str | Path) -> bool:
    """Whether `path` is named as a temporary of this module, by any process."""
    return _TEMPORARY_NAME.fullmatch(Path(path).name) is not None


def clear_leftovers(target: str | Path) -> None:
    """Remove the temporaries of `target` (files or folders) left by writers killed mid-write.

    Only for a writer that knows it is the only one (it holds a lock, or owns the output): another process's write in
    progress goes too.
    """
    target = Path(target)
    if not target.parent.is_dir():
        return
    for path in target.parent.iterdir():
        if is_temporary(path) and _TEMPORARY_NAME.fullmatch(path.name).group(1) == target.name:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """The temporary path to write `target` into, for writers that want a file name (safetensors, GGUF, YAML).

    It is renamed to `target` when the block ends without error, removed when it raises.
    """
    target = Path(target)
    staging = temporary_path(target)
    try:
        yield staging
        fsync_path(staging)
        os.replace(staging, target)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    fsync_path(target.parent)


@contextmanager
def atomic_write(target: str | Path, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """A file object open on `target`'s temporary, renamed to `target` when the block ends without error.

    The temporary is removed when the block raises.

    Args:
        mode: "wb" or "w".
    """
    with atomic_path(target) as staging, open(staging, mode, encoding=encoding) as f:
        yield f


def atomic_write_bytes(target: str | Path, data: bytes) -> None:
    """`data`, whole or not at all."""
    with atomic_write(target) as f:
        f.write(data)


def atomic_write_text(target: str | Path, text: str) -> None:
    """`text` in UTF-8, whole or not at all."""
    with atomic_write(target, "w", encoding="utf-8") as f:
        f.write(text)


@contextmanager
def atomic_folder(target: str | Path) -> Iterator[Path]:
    """An empty folder to write into, renamed to `target` when the block ends without error.

    Every file and folder in it is made durable first; `target` must be absent, or an empty folder. The folder is
    removed with what it holds when the block raises.
    """
    target = Path(target)
    staging = temporary_path(target)
    staging.mkdir(parents=True)
    try:
        yield staging
        for path in [*sorted(staging.rglob("*")), staging]:
            if not path.is_symlink():
                fsync_path(path)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_path(target.parent)


def fsync_path(path: str | Path) -> None:
    """Make durable what was written to a file (through any file object), or a folder's entries.

    A folder's entries are the files created, renamed or removed in it.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
