"""What the tests that start train.py or torchrun in other processes share."""

import json
import os
import socket
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def subprocess_env(hook: Path | None = None, **extra: str) -> dict:
    """One thread per process (several share 2 cores) and the repository importable; with `hook` (hook_folder),
    the hook runs first in every Python process started with this environment."""
    path = str(REPO) if hook is None else f"{hook}{os.pathsep}{REPO}"
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path, **extra)


def hook_folder(folder: Path, source: str) -> Path:
    """`folder` with a sitecustomize.py that runs `source` as a process starts: the tests' seam into a train.py (or
    torchrun's ranks) they start, e.g. to wrap a function of tailor. The product holds no switch for tests."""
    folder.mkdir(parents=True)
    (folder / "sitecustomize.py").write_text(source, encoding="utf-8")
    return folder


def torchrun(config: Path, *overrides: str) -> list[str]:
    """The command of a 2-rank run of train.py on this machine."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(free_port()),
        "train.py",
        str(config),
        *overrides,
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def records(run_dir: Path, kind: str | None = None) -> list[dict]:
    """metrics.jsonl, read while it may be written: the last line, if cut short, is left out (any other bad line
    is an error)."""
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    if lines:
        try:
            json.loads(lines[-1])
        except ValueError:
            lines.pop()
    found = [json.loads(line) for line in lines]
    return [r for r in found if kind is None or r["kind"] == kind]
