"""A checkpoint's manifest.json: the size and sha256 of every other file in its folder, written last.

Verifying a folder against it catches what renaming the folder into place cannot: a file that a disk, a copy or a
hand damaged later, one missing, one added. It guards against damage, not against whoever writes the folder (they
can write the manifest too): reading a checkpoint is safe whatever its bytes for other reasons (docs/safety.md).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from finetune.atomic_files import atomic_write, fsync_path

MANIFEST = "manifest.json"


def write_manifest(folder: Path) -> None:
    """Describe every file under `folder`, each made durable first, in folder/manifest.json."""
    files = {}
    for path in _files_under(folder):
        fsync_path(path)
        files[path.relative_to(folder).as_posix()] = _describe(path)
    with atomic_write(folder / MANIFEST, "w", encoding="utf-8") as f:
        json.dump({"files": files}, f, indent=1)


def verify_checkpoint(folder: Path) -> str | None:
    """None when every file the manifest lists is there with its size and checksum; else what is wrong, in words."""
    folder = Path(folder)
    if not folder.is_dir():
        return "not a folder"
    try:
        files = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))["files"]
    except FileNotFoundError:
        return f"no {MANIFEST} (written by a save cut short, or by an older tailor)"
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return f"{MANIFEST} is unreadable"
    if not isinstance(files, dict) or not all(
        isinstance(e, dict) and type(e.get("bytes")) is int and isinstance(e.get("sha256"), str) for e in files.values()
    ):
        return f"{MANIFEST} is not a list of files with their bytes and sha256"
    if not files:
        return f"{MANIFEST} lists no files"
    present = {p.relative_to(folder).as_posix() for p in _files_under(folder)} - {MANIFEST}
    if present - set(files):
        return f"{MANIFEST} does not list {', '.join(sorted(present - set(files))[:3])}"
    for name, expected in files.items():
        path = folder / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            return f"{MANIFEST} names a file outside the checkpoint: {name}"
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {expected['bytes']}"
    for name, expected in files.items():  # the slow part, once every file is known to be there
        if _describe(folder / name)["sha256"] != expected["sha256"]:
            return f"{name} checksum mismatch"
    return None


def _files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def _describe(path: Path) -> dict:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}
