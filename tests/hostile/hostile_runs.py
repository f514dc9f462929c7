"""What the hostile checkpoint and file-system tests share: a tiny model, a config, a trained run to damage, and
ways to run tailor that check an ending: an exit code, `error: ...` naming where, and never a traceback."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 600


def write_config(folder: Path, model_dir: Path, **overrides) -> Path:
    """A YAML config of a short run over the demo data in folder/run; `a__b=value` sets cfg[a][b]."""
    cfg = {
        "run_dir": str(folder / "run"),
        "seed": 0,
        "seq_len": 64,
        "batch_size": 1,
        "max_steps": 2,
        "model": {"path": str(model_dir), "dtype": "fp32", "attention": "sdpa"},
        "data": {"train": str(REPO / "data/demo/train.jsonl"), "num_workers": 0, "cache_dir": str(folder / "cache")},
        "lora": {"rank": 4, "alpha": 8, "targets": ["wq", "wv"]},
        "optim": {"lr": 1e-3, "weight_decay": 0.0, "warmup_steps": 1},
        "eval": {"enabled": False},
        "checkpoint": {"freq": 1, "keep": 2},
        "logging": {"freq": 1},
    }
    for key, value in overrides.items():
        *parents, leaf = key.split("__")
        node = cfg
        for part in parents:
            node = node[part]
        node[leaf] = value
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def environment(**extra: str) -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **extra)


def run_command(command: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO, env=env or environment(), capture_output=True, text=True, timeout=TIMEOUT)


def train(config: Path, *overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_command([sys.executable, "train.py", str(config), *overrides], env)


def tailor(*args: str) -> subprocess.CompletedProcess:
    return run_command([sys.executable, "-m", "finetune", *map(str, args)])


def assert_refused(result: subprocess.CompletedProcess, code: int, *named: object) -> str:
    """The run ended with `code`, its stderr says `error: ...` naming each of `named`, and shows no traceback.
    Returns the error message."""
    assert "Traceback" not in result.stderr + result.stdout, result.stderr[-3000:]
    assert result.returncode == code, f"exit {result.returncode}:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors, result.stderr[-2000:]
    message = result.stderr[result.stderr.index("error: ") :]
    for name in named:
        assert str(name) in message, f"{name} not in: {message}"
    return message


def error_ending(code: int, capsys, expected: int, *named: object) -> str:
    """The run returned `expected` with `error: ...` on stderr naming each of `named`; returns the message."""
    out, err = capsys.readouterr()
    assert code == expected, f"exit {code}:\n{out[-2000:]}\n{err[-2000:]}"
    assert "error: " in err, err
    message = err[err.index("error: ") :]
    for name in named:
        assert str(name) in message, f"{name} not in: {message}"
    return message


def clean_ending(code: int, capsys, expected: int, *named: object) -> str:
    """The command returned `expected` (no exception escaped: that would be the traceback), and its output holds
    each of `named`. Returns stdout and stderr together."""
    captured = capsys.readouterr()
    output = captured.out + captured.err
    assert "Traceback" not in output, output[-3000:]
    assert code == expected, f"exit {code}:\n{output[-3000:]}"
    for name in named:
        assert str(name) in output, f"{name!r} not in:\n{output[-3000:]}"
    return output


def rewrite_manifest(folder: Path) -> None:
    """What whoever edits a checkpoint can do: make its manifest match the files as they are now."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "manifest.json"):
        files[path.relative_to(folder).as_posix()] = {
            "bytes": path.stat().st_size,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        }
    (folder / "manifest.json").write_text(json.dumps({"files": files}))


def copy_run(source: Path, folder: Path) -> Path:
    """A fresh copy of a trained run_dir at folder/run (where write_config's config points)."""
    run_dir = folder / "run"
    shutil.copytree(source, run_dir)
    return run_dir
