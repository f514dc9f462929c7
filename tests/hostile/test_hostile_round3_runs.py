"""Hostile runs, round 3 (issue 27, part A): run folders, checkpoints, model folders and processes that lost work,
hung or traced back before.

Most cases run train.py's entry point in this process (train.run) on a copy of one tiny run trained once for the
module (checkpoint_000001 and checkpoint_000002), or `tailor` through finetune.cli.main, and assert the ending: the
exit code of finetune/exit_codes.py, `error: ...` naming the place, and what is left on disk. The cases about
processes (signals, no arguments) start train.py and assert no traceback in its output.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from hostile_runs import (
    REPO,
    assert_refused,
    copy_run,
    environment,
    error_ending,
    rewrite_manifest,
    run_command,
    write_config,
)
from safetensors.torch import load_file, save_file

import train
from finetune import exit_codes
from finetune.checkpoints.manifest import verify_checkpoint
from finetune.cli import main as tailor
from model.tiny import write_tiny_model


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------------------------------------------
# 1. Rotation never deletes what the run just wrote


def adapters_only(source: Path, target: Path) -> None:
    """What `checkpoint.save_adapters` users keep, or a run with a higher max_steps left: no state/."""
    shutil.copytree(source, target)
    shutil.rmtree(target / "state")
    rewrite_manifest(target)


def test_an_adapters_only_checkpoint_at_a_later_step_never_costs_the_run_its_checkpoints(
    trained, model_dir, tmp_path, capsys
):
    run_dir = copy_run(trained, tmp_path)
    checkpoints = run_dir / "checkpoints"
    adapters_only(checkpoints / "checkpoint_000002", checkpoints / "checkpoint_000010")
    config = write_config(tmp_path, model_dir, max_steps=4, checkpoint__keep=1)
    assert train.run([str(config)]) == 0
    out = capsys.readouterr().out
    assert "skipped" in out and "checkpoint_000010: no training state" in out
    # the run's newest checkpoint is kept, and the one it could not resume from is neither counted nor deleted
    assert names(checkpoints) == ["checkpoint_000004", "checkpoint_000010"]
    assert verify_checkpoint(checkpoints / "checkpoint_000004") is None
    assert f"last checkpoint: {checkpoints / 'checkpoint_000004'}\n" in out
    # killed now, the run resumes where it was
    assert train.run([str(write_config(tmp_path, model_dir, max_steps=5, checkpoint__keep=1))]) == 0
    assert "resuming from" in (out := capsys.readouterr().out) and "checkpoint_000004 (step 4" in out


# ---------------------------------------------------------------------------------------------------
# 5. A checkpoint folder that is a symbolic link


def test_a_checkpoint_that_is_a_symbolic_link_is_never_used_counted_or_deleted(trained, model_dir, tmp_path, capsys):
    run_dir = copy_run(trained, tmp_path)
    checkpoints = run_dir / "checkpoints"
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(checkpoints / "checkpoint_000002", elsewhere)
    (checkpoints / "checkpoint_000010").symlink_to(elsewhere)
    config = write_config(tmp_path, model_dir, max_steps=4, checkpoint__keep=1)
    assert train.run([str(config)]) == 0
    out = capsys.readouterr().out
    assert f"skipped {checkpoints / 'checkpoint_000010'}: a symbolic link (to {elsewhere})" in out
    assert "resuming from" in out and "checkpoint_000002 (step 2" in out
    assert names(checkpoints) == ["checkpoint_000004", "checkpoint_000010"]
    assert (checkpoints / "checkpoint_000010").is_symlink() and verify_checkpoint(elsewhere) is None
    # a link under the name of a step the run saves is set aside, with a word, and what it points to kept
    (checkpoints / "checkpoint_000005").symlink_to(elsewhere)
    assert train.run([str(write_config(tmp_path, model_dir, max_steps=5, checkpoint__keep=1))]) == 0
    assert "a symbolic link, not a checkpoint folder tailor wrote; renamed to checkpoint_000005.damaged" in (
        capsys.readouterr().out
    )
    assert (checkpoints / "checkpoint_000005.damaged").is_symlink() and verify_checkpoint(elsewhere) is None
    assert verify_checkpoint(checkpoints / "checkpoint_000005") is None


# ---------------------------------------------------------------------------------------------------
# 8. Adapters from elsewhere: a mistral-finetune folder, PEFT's legacy pickles and configs


def test_a_mistral_finetune_adapter_whose_scaling_is_a_string_is_refused_by_name(trained, tmp_path, capsys):
    adapter = tmp_path / "mistral-finetune"
    shutil.copytree(trained / "checkpoints" / "checkpoint_000002", adapter)
    (adapter / "manifest.json").unlink()  # mistral-finetune writes none
    params = json.loads((adapter / "params.json").read_text())
    params["lora"] = {"rank": 4, "scaling": "2.0"}
    (adapter / "params.json").write_text(json.dumps(params))
    code = tailor(["export-peft", "--adapter", str(adapter), "--out", str(tmp_path / "peft")])
    error_ending(code, capsys, exit_codes.USAGE, adapter / "params.json", "lora.scaling is '2.0'; expected a number")
    assert not (tmp_path / "peft").exists()


class WritesAFile:
    """A pickle that would create `path` when unpickled by anything that runs code."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def peft_folder(folder: Path, config: object, weights: bytes) -> Path:
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(config))
    (folder / "adapter_model.bin").write_bytes(weights)
    return folder


PEFT_CONFIG = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}


def test_import_peft_of_a_pickle_that_would_run_code_runs_none(model_dir, tmp_path, capsys):
    marker = tmp_path / "ran"
    peft = peft_folder(tmp_path / "peft", PEFT_CONFIG, pickle.dumps({"x": WritesAFile(marker)}))
    code = tailor(["import-peft", "--peft", str(peft), "--base", str(model_dir), "--out", str(tmp_path / "out")])
    message = error_ending(code, capsys, exit_codes.USAGE, peft / "adapter_model.bin")
    assert "without running code" in message
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_import_peft_of_a_config_that_is_a_list_is_refused_by_name(model_dir, tmp_path, capsys):
    peft = peft_folder(tmp_path / "peft", [PEFT_CONFIG], b"")
    code = tailor(["import-peft", "--peft", str(peft), "--base", str(model_dir), "--out", str(tmp_path / "out")])
    error_ending(code, capsys, exit_codes.USAGE, peft / "adapter_config.json", "expected a JSON object")


def test_import_peft_of_a_rank_that_is_a_string_is_refused_by_name(model_dir, tmp_path, capsys):
    peft = peft_folder(tmp_path / "peft", dict(PEFT_CONFIG, r="4"), b"")
    code = tailor(["import-peft", "--peft", str(peft), "--base", str(model_dir), "--out", str(tmp_path / "out")])
    error_ending(code, capsys, exit_codes.USAGE, peft / "adapter_config.json", "r is '4'; expected an integer")


# ---------------------------------------------------------------------------------------------------
# 3. and 4. Model folders: integer weights, and sizes that no model has


def edited_model(model_dir: Path, folder: Path, params: dict | None = None, integer: str | None = None) -> Path:
    """A copy of the tiny model with params.json's keys replaced by `params`, or the tensor `integer` stored as int."""
    shutil.copytree(model_dir, folder)
    if params:
        path = folder / "params.json"
        path.write_text(json.dumps(dict(json.loads(path.read_text()), **params)))
    if integer:
        weights = load_file(folder / "consolidated.safetensors")
        weights[integer] = weights[integer].to(torch.int32)
        save_file(weights, folder / "consolidated.safetensors")
    return folder


def test_integer_weights_are_refused_naming_the_file_and_tensor(model_dir, tmp_path, capsys):
    model = edited_model(model_dir, tmp_path / "model", integer="layers.0.attention.wq.weight")
    code = train.run([str(write_config(tmp_path, model))])
    weights = model / "consolidated.safetensors"
    message = error_ending(code, capsys, exit_codes.USAGE, weights, "'layers.0.attention.wq.weight'")
    assert "is int32, where the model has a float weight" in message
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "params, key",
    [({"n_layers": 1_000_000}, "n_layers"), ({"dim": 2**62}, "dim"), ({"hidden_dim": 2**40}, "hidden_dim")],
    ids=["a million layers", "dim 2^62", "hidden_dim 2^40"],
)
def test_sizes_no_model_has_are_refused_at_once_naming_the_key(params, key, model_dir, tmp_path, capsys):
    model = edited_model(model_dir, tmp_path / "model", params=params)
    with deadline(60):  # it took 40 s and 2 GB before, building a million layers on the meta device
        code = train.run([str(write_config(tmp_path, model))])
    error_ending(code, capsys, exit_codes.USAGE, model / "params.json", f"key '{key}' is {params[key]}, above")


@contextmanager
def deadline(seconds: int):
    """A hang fails the test rather than blocking it."""

    def hung(*_):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ---------------------------------------------------------------------------------------------------
# 4. What the run folder holds that is no regular file


@pytest.mark.parametrize("name", ["metrics.jsonl", "config.yaml", "run.lock"])
def test_a_fifo_in_the_run_folder_is_refused_and_never_read(name, trained, model_dir, tmp_path, capsys):
    run_dir = copy_run(trained, tmp_path)
    (run_dir / name).unlink()
    os.mkfifo(run_dir / name)
    with deadline(60):  # it blocked a resume for ever, holding the run lock
        code = train.run([str(write_config(tmp_path, model_dir, max_steps=3))])
    error_ending(code, capsys, exit_codes.USAGE, f"run_dir: {run_dir / name} is not a regular file")
    assert names(run_dir / "checkpoints") == ["checkpoint_000001", "checkpoint_000002"]


# ---------------------------------------------------------------------------------------------------
# 9. Lines of metrics.jsonl that are not records


BAD_LINES = [b"[1]", b'{"kind": "train", "step": "x"}', b"\xff\xfe not UTF-8"]


def test_bad_lines_of_metrics_are_named_by_plot_and_dropped_with_a_count_by_resume(
    trained, model_dir, tmp_path, capsys
):
    run_dir = copy_run(trained, tmp_path)
    metrics = run_dir / "metrics.jsonl"
    records = metrics.read_bytes().splitlines()
    metrics.write_bytes(b"\n".join([records[0], *BAD_LINES, *records[1:]]) + b"\n")
    error_ending(tailor(["plot", str(run_dir)]), capsys, exit_codes.USAGE, f"{metrics}:2: not a record tailor writes")
    assert train.run([str(write_config(tmp_path, model_dir, max_steps=3))]) == 0
    out = capsys.readouterr().out
    assert f"{metrics}: dropped lines 2, 3, 4 (3), which are not a record tailor writes" in out
    assert [json.loads(line)["step"] for line in metrics.read_bytes().splitlines()][-1] == 3
    assert tailor(["plot", str(run_dir)]) == 0


# ---------------------------------------------------------------------------------------------------
# 6. Every file tailor writes follows the umask


def test_every_file_written_follows_the_umask(model_dir, tmp_path, capsys):
    previous = os.umask(0o027)  # group may read, others nothing: neither 0600 nor 0644
    try:
        write_tiny_model(tmp_path / "tiny", arch="mistral-7b", tokenizer="v3", layout="sharded")
        assert train.run([str(write_config(tmp_path, model_dir))]) == 0
        checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint_000002"
        assert tailor(["export-peft", "--adapter", str(checkpoint), "--out", str(tmp_path / "peft")]) == 0
        peft = ["--peft", str(tmp_path / "peft"), "--base", str(model_dir)]
        assert tailor(["import-peft", *peft, "--out", str(tmp_path / "imported")]) == 0
        merge = ["--base", str(model_dir), "--adapter", str(checkpoint), "--out", str(tmp_path / "merged")]
        assert tailor(["merge", *merge]) == 0
    finally:
        os.umask(previous)
    capsys.readouterr()
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    modes = {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in written}
    weights = [name for name in modes if name.endswith(".safetensors")]
    assert len(weights) >= 6, modes  # the tiny model's two shards, adapters, state, PEFT's, imported, merged
    assert {name: mode for name, mode in modes.items() if mode != "0o640"} == {}


# ---------------------------------------------------------------------------------------------------
# 7. A disk that fills while the tokenizer is copied into a checkpoint


def test_a_full_disk_names_the_file_being_written_and_what_frees_space(model_dir, tmp_path, capsys, monkeypatch):
    real, calls = shutil.copyfile, []

    def fill_the_disk(source, target, *args, **kwargs):
        calls.append(target)
        if len(calls) > 1:  # the second save; shutil's own ENOSPC names the source, then the target
            error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            error.filename, error.filename2 = str(source), str(target)
            raise error
        return real(source, target, *args, **kwargs)

    monkeypatch.setattr(shutil, "copyfile", fill_the_disk)
    code = train.run([str(write_config(tmp_path, model_dir))])
    checkpoints = tmp_path / "run" / "checkpoints"
    message = error_ending(
        code, capsys, exit_codes.WRITE_FAILED, calls[-1], f"Free space on the disk that holds {checkpoints}"
    )
    assert str(model_dir) not in message and "checkpoint.keep" not in message  # read only; rotation frees nothing
    assert names(checkpoints) == ["checkpoint_000001"]


# ---------------------------------------------------------------------------------------------------
# 10. Ctrl-C before the loop, and no arguments

SLOW_MODEL = """
import time
from pathlib import Path
import finetune.training.model_setup as model_setup

real = model_setup.build_training_model

def slow(*args, **kwargs):
    Path({marker!r}).touch()
    time.sleep(120)
    return real(*args, **kwargs)

model_setup.build_training_model = slow
"""


def test_ctrl_c_while_the_model_loads_ends_in_one_line_and_exit_130(model_dir, tmp_path):
    marker = tmp_path / "loading"
    hook = tmp_path / "hook"  # a sitecustomize.py runs first in the process: the test's seam, no switch in tailor
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SLOW_MODEL.format(marker=str(marker)))
    env = dict(environment(), PYTHONPATH=f"{hook}{os.pathsep}{REPO}")
    config = write_config(tmp_path, model_dir)
    process = subprocess.Popen(
        [sys.executable, "train.py", str(config)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    for _ in range(600):  # the data is tokenized by now, and the model about to load
        if marker.exists() or process.poll() is not None:
            break
        time.sleep(0.1)
    assert marker.exists(), process.stderr.read().decode()[-2000:]
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    result = subprocess.CompletedProcess(process.args, process.returncode, out.decode(), err.decode())
    message = assert_refused(result, exit_codes.INTERRUPTED, "interrupted (Ctrl-C) before the first step")
    assert "nothing was trained or saved" in message
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_train_py_without_arguments_shows_its_usage_and_an_error(tmp_path):
    result = run_command([sys.executable, "train.py"])
    assert "python train.py CONFIG.yaml" in result.stdout
    assert_refused(result, exit_codes.USAGE, "no config file")


# ---------------------------------------------------------------------------------------------------
# 2. Resume on another base model


def test_a_resume_on_another_base_of_the_same_shape_is_refused_naming_both(trained, model_dir, tmp_path, capsys):
    run_dir = copy_run(trained, tmp_path)
    other = write_tiny_model(tmp_path / "other", arch="mistral-7b", tokenizer="v3", seed=1)
    code = train.run([str(write_config(tmp_path, other, max_steps=3))])
    message = error_ending(code, capsys, exit_codes.USAGE, model_dir, other, "resume_other_base=true")
    assert "another model of the same shape" in message
    assert names(run_dir / "checkpoints") == ["checkpoint_000001", "checkpoint_000002"]
    # said explicitly, it trains on
    assert train.run([str(write_config(tmp_path, other, max_steps=3, resume_other_base=True))]) == 0
    out = capsys.readouterr().out
    assert f"goes on training on another base model of the same shape, {other}" in out
    record = json.loads((run_dir / "checkpoints" / "checkpoint_000003" / "state" / "base_model.json").read_text())
    assert record["path"] == str(other)


def test_a_copy_of_the_base_elsewhere_is_the_same_base(trained, model_dir, tmp_path, capsys):
    copy_run(trained, tmp_path)
    moved = shutil.copytree(model_dir, tmp_path / "moved")
    assert train.run([str(write_config(tmp_path, moved, max_steps=3))]) == 0
    assert "resuming from" in capsys.readouterr().out


def test_a_checkpoint_of_an_older_tailor_resumes_saying_its_base_cannot_be_checked(
    trained, model_dir, tmp_path, capsys
):
    run_dir = copy_run(trained, tmp_path)
    newest = run_dir / "checkpoints" / "checkpoint_000002"
    (newest / "state" / "base_model.json").unlink()
    rewrite_manifest(newest)
    assert train.run([str(write_config(tmp_path, model_dir, max_steps=3))]) == 0
    out = capsys.readouterr().out
    assert f"{newest} does not record the identity of its base model" in out and "cannot be checked" in out


def test_a_resume_on_a_model_of_another_shape_is_refused_before_any_work(trained, model_dir, tmp_path, capsys):
    run_dir = copy_run(trained, tmp_path)
    wider = write_tiny_model(tmp_path / "wider", arch="mistral-7b", tokenizer="v3", width=2)
    code = train.run([str(write_config(tmp_path, wider, max_steps=3, resume_other_base=True))])
    message = error_ending(code, capsys, exit_codes.USAGE, f"was trained on {model_dir}", f"model.path {wider}")
    assert "a model of another shape (dim" in message and f"Set model.path={model_dir}" in message
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]  # nothing tokenized
    assert names(run_dir / "checkpoints") == ["checkpoint_000001", "checkpoint_000002"]


@pytest.mark.slow
def test_sigint_to_rank_0_stops_a_torchrun_run_with_no_traceback(model_dir, tmp_path):
    """What the docs advise instead of Ctrl-C (whose SIGINT torchrun's agent turns into its own traceback): the
    signal to rank 0 alone, whose pid run.lock names; the ranks agree on the step, save, and torchrun exits 0."""
    config = write_config(tmp_path, model_dir, max_steps=1000, checkpoint__freq=1000, checkpoint__keep=1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port)]
    process = subprocess.Popen(
        [*command, "train.py", str(config)], cwd=REPO, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    metrics = tmp_path / "run" / "metrics.jsonl"
    for _ in range(1200):  # a few steps trained
        if process.poll() is not None or (metrics.exists() and metrics.read_text().count('"kind": "train"') >= 3):
            break
        time.sleep(0.1)
    rank_0 = json.loads((tmp_path / "run" / "run.lock").read_text())["pid"]
    os.kill(rank_0, signal.SIGINT)
    out, err = (text.decode() for text in process.communicate(timeout=300))
    assert "Traceback" not in out + err, err[-3000:]
    assert process.returncode == 0, err[-3000:]
    assert "stopped at step" in out and "(SIGINT): saved" in out
    assert len(list((tmp_path / "run" / "checkpoints").iterdir())) == 1


# ---------------------------------------------------------------------------------------------------
# 12. A rank that never comes up


SHORT_SETUP = """
from datetime import timedelta
import finetune.training.distributed as distributed

distributed.SETUP_TIMEOUT = timedelta(seconds=3)
"""


@pytest.mark.slow
def test_a_rank_that_never_comes_up_ends_the_others_after_the_setup_timeout(model_dir, tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SHORT_SETUP)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    alone = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    env = dict(environment(**alone), PYTHONPATH=f"{hook}{os.pathsep}{REPO}")
    result = run_command([sys.executable, "train.py", str(write_config(tmp_path, model_dir))], env)
    assert_refused(result, exit_codes.NO_PROCESS_GROUP, "rank 0: the 2 ranks did not all meet within 3 s")
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "run.lock").exists()


# ---------------------------------------------------------------------------------------------------
# 11. The threads of a CPU run, said


def test_a_cpu_run_says_how_many_threads_it_computes_with_and_why(model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert train.run([str(write_config(tmp_path, model_dir))]) == 0
    threads = torch.get_num_threads()
    assert f"threads: {threads} per process, torch's default of one per core" in (out := capsys.readouterr().out)
    assert "OMP_NUM_THREADS=1 before the command can be several times faster" in out
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert train.run([str(write_config(tmp_path, model_dir, max_steps=3))]) == 0
    assert f"threads: {threads} per process (OMP_NUM_THREADS=1)" in capsys.readouterr().out


def test_a_base_whose_weights_changed_in_place_is_refused(trained, model_dir, tmp_path, capsys):
    run_dir = copy_run(trained, tmp_path)
    newest = run_dir / "checkpoints" / "checkpoint_000002"
    changed = write_tiny_model(tmp_path / "model", arch="mistral-7b", tokenizer="v3", seed=1)
    record = newest / "state" / "base_model.json"
    record.write_text(json.dumps(dict(json.loads(record.read_text()), path=str(changed))))  # trained "there"
    rewrite_manifest(newest)
    code = train.run([str(write_config(tmp_path, changed, max_steps=3))])
    error_ending(
        code, capsys, exit_codes.USAGE, f"trained on the base model in {changed}, whose weight files have changed"
    )
