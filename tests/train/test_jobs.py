"""`tailor runs` and `tailor stop`: run folders read as jobs, whatever their files hold, and a run stopped as Ctrl-C
stops it (checkpoint, exit 0) in one process and on 2 ranks; `tailor validate --price`."""

import errno
import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest
import torch
from launching import REPO, records, subprocess_env

import train
from finetune import exit_codes
from finetune.checkpoints import folders
from finetune.cli import main as tailor
from finetune.training.distributed import DistInfo
from finetune.training.run_lock import LOCK_FILE, lock_run_dir

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def start(config, *arguments: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "finetune", "train", str(config), *arguments],
        cwd=REPO,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_step(process: subprocess.Popen, run_dir, step: int) -> None:
    while not [r for r in records(run_dir, "train") if r["step"] >= step]:
        assert process.poll() is None, process.communicate()
        time.sleep(0.1)


def stop_while_running(process, run_dir, capsys) -> str:
    """`tailor runs` names the running process, `tailor stop` stops it: returns what `tailor stop` printed."""
    try:
        wait_for_step(process, run_dir, 2)
        assert tailor(["runs", str(run_dir.parent)]) == 0
        listing = capsys.readouterr().out
        holder = json.loads((run_dir / LOCK_FILE).read_text())
        assert f"running (pid {holder['pid']} on {socket.gethostname()})" in listing
        assert tailor(["stop", str(run_dir)]) == 0  # returns once the run has let go of its folder
        return capsys.readouterr().out
    except BaseException:
        process.kill()
        raise


def assert_stopped(process, run_dir, said: str) -> None:
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    step = records(run_dir, "train")[-1]["step"]
    assert 2 <= step < 1000
    assert f"stopped at step {step} (SIGTERM)" in out
    assert re.search(r"resume with: (the same command \()?tailor train ", out)
    assert json.loads((run_dir / "status.json").read_text())["state"] == "stopped"
    assert f"run: stopped at step {step}" in said.replace(str(run_dir), "run")
    assert f"newest intact checkpoint: {run_dir / 'checkpoints' / f'checkpoint_{step:06d}'}" in said


def test_stop_checkpoints_a_run_that_exits_0(write_config, tmp_path, capsys):
    config = write_config(max_steps=1000, eval__enabled=False, checkpoint__freq=1000)
    process = start(config)
    said = stop_while_running(process, tmp_path / "run", capsys)
    assert_stopped(process, tmp_path / "run", said)


@pytest.mark.slow
def test_stop_checkpoints_every_rank_under_torchrun(write_config, tmp_path, capsys):
    """The lock's holder is rank 0: signalled, the ranks agree on the step, each saves, and torchrun exits 0."""
    config = write_config(max_steps=1000, eval__enabled=False, checkpoint__freq=1000)
    process = start(config, "--gpus", "2")
    said = stop_while_running(process, tmp_path / "run", capsys)
    assert_stopped(process, tmp_path / "run", said)
    checkpoint = sorted((tmp_path / "run" / "checkpoints").iterdir())[-1]
    assert sorted(p.name for p in (checkpoint / "state").glob("tensors_rank_*")) == [
        "tensors_rank_0.safetensors",
        "tensors_rank_1.safetensors",
    ]


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_runs_lists_finished_and_failed_runs_and_shows_one(write_config, tmp_path, capsys, monkeypatch):
    config = write_config(max_steps=4, eval__freq=2, checkpoint__freq=2)
    assert train.run([str(config)]) == 0
    refused = train.run([str(config), f"run_dir={tmp_path / 'refused'}", f"resume={tmp_path / 'nowhere'}"])
    assert refused == exit_codes.USAGE and not (tmp_path / "refused").exists()  # a refused launch leaves nothing
    capsys.readouterr()
    with monkeypatch.context() as patch:  # a run accepted, then its first save fails on a full disk
        patch.setattr(folders, "save_weights", disk_full)
        assert train.run([str(config), f"run_dir={tmp_path / 'failed'}"]) == exit_codes.WRITE_FAILED
    error = capsys.readouterr().err
    (tmp_path / "run" / "eval_generations.jsonl").write_text(
        json.dumps({"step": 2, "prompt": "old", "generation": "early"})
        + "\n"
        + json.dumps({"step": 4, "prompt": "Hello?", "generation": "Hi there."})
        + "\n"
    )

    assert tailor(["runs", str(tmp_path)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == "run status step loss eval loss tokens/s ETA newest intact checkpoint".split()
    failed, finished = table[1].split(), table[2].split()
    assert failed[:2] == ["failed", "failed"]  # the run folder named "failed", and its status
    assert "could not be written" in error and error.removeprefix("error: ")[:60] in table[1]  # shortened there
    last, last_eval = records(tmp_path / "run", "train")[-1], records(tmp_path / "run", "eval")[-1]
    assert finished[:5] == ["run", "finished", "4/4", f"{last['loss']:.4f}", f"{last_eval['eval_loss']:.4f}"]
    assert finished[-1] == "checkpoint_000004"

    assert tailor(["runs", str(tmp_path / "run")]) == 0
    detail = capsys.readouterr().out
    assert "status: finished" in detail and "step 4 of 4" in detail
    assert "  lora.rank 64 -> 8\n" in detail and "  max_steps 100 -> 4\n" in detail and "run_dir" not in detail
    assert re.search(r"data train \S*train.jsonl: 1 file\(s\), 400 lines, 400 samples", detail)
    assert "eval generations at step 4" in detail and "  generation: Hi there." in detail and "early" not in detail


def test_runs_reads_hostile_run_folders_without_a_traceback(tmp_path, capsys):
    runs = tmp_path / "runs"
    fifo, garbage, huge = runs / "fifo", runs / "garbage", runs / "huge"
    for folder in (fifo, garbage, huge):
        folder.mkdir(parents=True)
    os.mkfifo(fifo / "metrics.jsonl")
    os.mkfifo(fifo / "status.json")
    (garbage / "metrics.jsonl").write_bytes(b'{"kind": "train", "step": 3, "loss": "x"}\n\xff\xfe[1, 2\n[]\n')
    (garbage / "status.json").write_bytes(b"{not json")
    (garbage / "config.yaml").write_text("a: [")
    (huge / "config.yaml").write_text("x: 1\n" * 300_000)
    (huge / "status.json").write_text(json.dumps({"state": "failed", "error": "boom\nsecond line"}))
    assert tailor(["runs", str(runs)]) == 0
    out = capsys.readouterr().out
    assert f"note: {fifo / 'metrics.jsonl'}: not a regular file" in out
    assert f"note: {fifo / 'status.json'}: not a regular file" in out
    assert f"note: {garbage / 'metrics.jsonl'}: 2 line(s) not JSON records, left out" in out
    assert f"note: {garbage / 'status.json'}: not valid JSON" in out
    assert re.search(r"\ngarbage +unknown +3/- +- ", out)
    assert re.search(r"\nhuge +failed \(boom\) +-/-", out)
    assert tailor(["runs", str(garbage)]) == 0
    assert f"config: {garbage / 'config.yaml'}: not valid YAML" in capsys.readouterr().out
    assert tailor(["runs", str(huge)]) == 0
    assert "bytes, more than a run writes there" in capsys.readouterr().out


def test_stop_says_why_it_cannot(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    assert tailor(["stop", str(run_dir)]) == exit_codes.USAGE
    assert (
        capsys.readouterr().err
        == f"error: {run_dir}: no run holds it (its run.lock is free or absent): nothing to stop\n"
    )
    with lock_run_dir(run_dir, CPU, command="train.py x.yaml") as lock:
        holder = {"pid": 4242, "host": "gpu-node-7", "command": "train.py x.yaml", "started": "now"}
        os.pwrite(lock.fd, (json.dumps(holder) + " " * 200).encode(), 0)
        assert tailor(["stop", str(run_dir)]) == exit_codes.USAGE
        assert capsys.readouterr().err == (
            f"error: {run_dir}: the run is on host gpu-node-7 (pid 4242); run `tailor stop {run_dir}` there\n"
        )


def test_validate_prices_the_eta(write_config, capsys):
    config = write_config(max_steps=1_000_000_000)
    tailor(["validate", str(config), "--device", "h100", "--gpus", "4", "--price", "2.5"])
    out = capsys.readouterr().out
    total = int(re.search(r"= ([\d,]+) tokens", out).group(1).replace(",", ""))
    rate = float(re.search(r"at ([\d,]+) tokens/s per GPU", out).group(1).replace(",", ""))
    gpu_hours = total / (rate * 4) / 3600 * 4
    assert f"cost: {gpu_hours * 2.5:,.2f} ({gpu_hours:,.2f} GPU-hours at 2.5 per GPU-hour)" in out
    assert tailor(["validate", str(config), "--price", "-1"]) == exit_codes.USAGE
    assert capsys.readouterr().err == "error: --price must be a price per GPU-hour of 0 or more, got -1.0\n"
