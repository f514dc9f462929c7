"""One run per run_dir: a second run exits 3 naming the holder at once, and a holder killed with -9 leaves no lock."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from launching import REPO, records, subprocess_env, torchrun

import train
from finetune import exit_codes
from finetune.training.distributed import DistInfo
from finetune.training.run_lock import LOCK_FILE, RunLockedError, lock_run_dir

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def test_a_second_run_in_the_same_run_dir_exits_3_and_a_killed_holder_blocks_nothing(write_config, tmp_path, capsys):
    config = write_config(max_steps=1000, eval__enabled=False, checkpoint__freq=1000)
    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "train.py", str(config)],
        cwd=REPO,
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while not records(run_dir, "train"):
            assert holder.poll() is None, "the first run ended early"
            time.sleep(0.05)
        assert train.run([str(config)]) == exit_codes.RUN_LOCKED
        error = capsys.readouterr().err
        assert error.startswith(f"error: run_dir {run_dir} is in use by another run (pid {holder.pid} on ")
        assert f"on {socket.gethostname()}, started " in error and f"train.py {config}" in error
        assert "one run per run_dir" in error
        assert holder.poll() is None  # the holder runs on, its metrics untouched
        steps = [r["step"] for r in records(run_dir, "train")]
        assert steps == list(range(1, len(steps) + 1))
    finally:
        holder.kill()
    assert holder.wait() == -signal.SIGKILL

    # The kernel released the lock with the process: the same command runs at once (from step 0, as no checkpoint
    # was saved), and says so.
    assert train.run([str(config), "max_steps=2"]) == 0
    assert "no intact checkpoint" in capsys.readouterr().out
    assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] != holder.pid  # the file now names this process
    assert [r["step"] for r in records(run_dir, "train")] == [1, 2]


def test_every_rank_of_a_second_run_exits_3(write_config, tmp_path):
    """Rank 0 finds the run folder held and tells rank 1: both exit 3, before either reads the folder."""
    config = write_config(eval__enabled=False)
    with lock_run_dir(tmp_path / "run", CPU, command="train.py first.yaml"):
        result = subprocess.run(
            torchrun(config), cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300
        )
    assert result.stderr.count(f"error: run_dir {tmp_path / 'run'} is in use by another run (pid {os.getpid()}") == 2
    assert f"exitcode  : {exit_codes.RUN_LOCKED} (pid" in result.stderr, result.stderr[-3000:]  # as torchrun saw it
    assert f'File "{REPO}' not in result.stderr  # torchrun's own report aside, no traceback
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["run.lock"]


def test_the_lock_is_held_until_released(tmp_path: Path):
    with lock_run_dir(tmp_path / "run", CPU, command="train.py a.yaml"):
        with pytest.raises(RunLockedError, match="in use by another run .*: train.py a.yaml\\)"):
            lock_run_dir(tmp_path / "run", CPU, command="train.py b.yaml")
    with lock_run_dir(tmp_path / "run", CPU, command="train.py b.yaml"):
        pass
