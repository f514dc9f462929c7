"""`tailor train`: the same run as `python train.py` in one process and as `torchrun ... train.py` on 2 ranks
(gloo, CPU), from any folder, with the same exit codes; its own options checked before anything starts."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from launching import REPO, records, subprocess_env, torchrun
from safetensors.torch import load_file

from finetune import exit_codes
from finetune.cli import main as tailor
from finetune.training.distributed import DistInfo
from finetune.training.run_lock import lock_run_dir

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def run(command: list[str], cwd) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=300)


def tailor_train(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "finetune", "train", *arguments]


def outcome(run_dir) -> tuple[list[float], dict]:
    """The train losses of metrics.jsonl and the adapters of the last checkpoint."""
    checkpoint = sorted((run_dir / "checkpoints").iterdir())[-1]
    return [r["loss"] for r in records(run_dir, "train")], load_file(checkpoint / "lora.safetensors")


def assert_same_run(a, b) -> None:
    (losses_a, lora_a), (losses_b, lora_b) = outcome(a), outcome(b)
    assert len(losses_a) == 4 and losses_a == losses_b
    assert lora_a.keys() == lora_b.keys()
    for name in lora_a:
        torch.testing.assert_close(lora_a[name], lora_b[name], rtol=0, atol=0)


def test_tailor_train_in_one_process_is_python_train_py_from_any_folder(write_config, tmp_path):
    config = write_config(max_steps=4, eval__freq=2, checkpoint__freq=4)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()  # no train.py here: the entry comes from the package
    by_tailor = run(tailor_train(str(config), f"run_dir={tmp_path / 'a'}"), cwd=elsewhere)
    by_script = run([sys.executable, "train.py", str(config), f"run_dir={tmp_path / 'b'}"], cwd=REPO)
    assert (by_tailor.returncode, by_script.returncode) == (0, 0), by_tailor.stderr + by_script.stderr
    assert_same_run(tmp_path / "a", tmp_path / "b")
    assert json.loads((tmp_path / "a" / "run.lock").read_text())["command"].startswith(f"tailor train {config}")
    assert json.loads((tmp_path / "a" / "status.json").read_text())["state"] == "finished"

    # A mistake in the config: the same line and exit code either way.
    bad = [str(config), "lora.rnak=4"]
    by_tailor, by_script = run(tailor_train(*bad), cwd=elsewhere), run([sys.executable, "train.py", *bad], cwd=REPO)
    assert by_tailor.returncode == by_script.returncode == exit_codes.USAGE
    assert by_tailor.stderr == by_script.stderr and by_tailor.stderr.startswith("error: ")


@pytest.mark.slow
def test_tailor_train_on_2_ranks_is_the_torchrun_command_it_prints(write_config, tmp_path):
    config = write_config(max_steps=4, eval__freq=2, checkpoint__freq=4)
    by_tailor = run(tailor_train(str(config), f"run_dir={tmp_path / 'a'}", "--gpus", "2"), cwd=tmp_path)
    by_torchrun = run(torchrun(config, f"run_dir={tmp_path / 'b'}"), cwd=REPO)
    assert (by_tailor.returncode, by_torchrun.returncode) == (0, 0), by_tailor.stderr + by_torchrun.stderr
    printed = by_tailor.stdout.splitlines()[0]
    assert printed == (
        f"torchrun --standalone --nproc-per-node 2 -m finetune.training.entry {config} run_dir={tmp_path / 'a'}"
    )
    assert_same_run(tmp_path / "a", tmp_path / "b")

    # Another run holding the folder: every rank exits 3, and torchrun says so with its own exit code, the same one.
    with lock_run_dir(tmp_path / "a", CPU, command="train.py other.yaml"):
        by_tailor = run(tailor_train(str(config), f"run_dir={tmp_path / 'a'}", "--gpus", "2"), cwd=tmp_path)
        by_torchrun = run(torchrun(config, f"run_dir={tmp_path / 'a'}"), cwd=REPO)
    assert by_tailor.returncode == by_torchrun.returncode != 0
    assert f"error: run_dir {tmp_path / 'a'} is in use by another run" in by_tailor.stderr


@pytest.mark.slow
def test_ctrl_c_under_tailor_train_on_2_ranks_saves_every_rank_and_exits_0(write_config, tmp_path):
    """Ctrl-C reaches `tailor train` alone (torchrun has a session of its own): it goes on to rank 0, every rank
    saves after the same step, and the command exits 0 with no traceback (torchrun signalled itself raises)."""
    config = write_config(max_steps=1000, eval__enabled=False, checkpoint__freq=1000)
    run_dir = tmp_path / "run"
    process = subprocess.Popen(
        tailor_train(str(config), "--gpus", "2"),
        cwd=tmp_path,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        while not records(run_dir, "train"):
            assert process.poll() is None, process.communicate()
            time.sleep(0.1)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 0, err[-3000:]
    assert "Traceback" not in out + err
    step = records(run_dir, "train")[-1]["step"]
    checkpoint = run_dir / "checkpoints" / f"checkpoint_{step:06d}"
    assert step < 1000 and f"stopped at step {step} (SIGINT): saved {checkpoint}" in out
    assert sorted(p.name for p in (checkpoint / "state").glob("tensors_rank_*")) == [
        "tensors_rank_0.safetensors",
        "tensors_rank_1.safetensors",
    ]
    assert json.loads((run_dir / "status.json").read_text())["state"] == "stopped"


@pytest.mark.parametrize(
    ("options", "error"),
    [
        (["--gpus", "0"], "error: --gpus must be at least 1, got 0"),
        (["--nnodes", "2"], "error: --nnodes above 1 needs --rdzv-endpoint HOST:PORT"),
        (
            ["--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint", "n0:29500"],
            "error: --node-rank must be from 0 to 1",
        ),
        (["--nnodes", "2", "--rdzv-endpoint", "n0"], "error: --rdzv-endpoint must be HOST:PORT, e.g. node0:29500"),
        (["lora.rnak=4", "--gpus", "2"], "error: "),  # the config's mistake, said before torchrun starts
    ],
)
def test_launch_mistakes_end_before_anything_starts(write_config, tmp_path, capsys, options, error):
    config = write_config()
    assert tailor(["train", str(config), *options]) == exit_codes.USAGE
    output = capsys.readouterr()
    assert output.err.startswith(error) and len(output.err.splitlines()) == 1
    assert "torchrun" not in output.out
    assert not (tmp_path / "run").exists()


def test_overrides_may_follow_the_options(write_config, capsys):
    """KEY=VALUE after an option is an override, as before it: `tailor validate c.yaml --max-per-kind 1 seq_len=64`."""
    config = write_config()
    assert tailor(["validate", str(config), "--max-per-kind", "1", "seq_len=64"]) == 0
    assert "> seq_len 64" in capsys.readouterr().out
    assert tailor(["validate", str(config), "--max-per-kind", "1", "lora.rnak=4"]) == exit_codes.USAGE
    assert capsys.readouterr().err.startswith("error: ")
    with pytest.raises(SystemExit):  # an unknown option is still argparse's usage error
        tailor(["validate", str(config), "--max-per-kind", "1", "--nope"])
    assert "unrecognized arguments: --nope" in capsys.readouterr().err
