"""Hostile run folders: checkpoints damaged on disk or edited with a manifest to match, and file-system faults.

Every case runs train.py's entry point in this process (train.run) against a copy of one tiny run trained once for
the module, and asserts its ending: no traceback (an exception would fail the test), the exit code of
finetune/exit_codes.py, and the message naming the place. A damaged checkpoint reads as damaged whatever was done
to it: `resume: PATH` refuses it by name (exit 2); `resume: auto` reports it, sets it aside as
`checkpoint_000002.damaged` and continues from the intact checkpoint_000001.
"""

from __future__ import annotations

import errno
import json
import os
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from hostile_runs import copy_run, error_ending, rewrite_manifest, write_config
from safetensors.torch import save as safetensors_bytes

import finetune.checkpoints.folders as folders
import finetune.training.checkpointing as training_state
import finetune.training.monitoring as monitoring
import train
from finetune import exit_codes
from finetune.checkpoints.manifest import verify_checkpoint
from finetune.cli import main as tailor
from finetune.training.distributed import DistInfo
from finetune.training.run_lock import lock_run_dir
from finetune.training.train_state import Progress

UNWRITABLE = Path("/sys/fs")  # a folder where even root cannot create a file (sysfs), unlike a chmod-ed one


# ---------------------------------------------------------------------------------------------------
# Damaged checkpoints


def write(path: str, text: str | bytes, manifest: bool = True):
    """A damage: `path` (in the checkpoint) rewritten; with `manifest`, the manifest made to match, as a hand that
    edits a checkpoint can."""

    def damage(checkpoint: Path) -> None:
        target = checkpoint / path
        target.write_bytes(text if isinstance(text, bytes) else text.encode())
        if manifest:
            rewrite_manifest(checkpoint)

    return damage


def remove(path: str, manifest: bool = True):
    def damage(checkpoint: Path) -> None:
        target = checkpoint / path
        if target.is_dir():
            for child in sorted(target.rglob("*"), reverse=True):
                child.unlink() if child.is_file() else child.rmdir()
            target.rmdir()
        else:
            target.unlink()
        if manifest:
            rewrite_manifest(checkpoint)

    return damage


def flip_a_byte(path: str):
    def damage(checkpoint: Path) -> None:
        data = bytearray((checkpoint / path).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (checkpoint / path).write_bytes(bytes(data))

    return damage


def list_outside(checkpoint: Path) -> None:
    """A manifest that matches the files and adds one outside the checkpoint (which a check might then read)."""
    rewrite_manifest(checkpoint)
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    manifest["files"]["../../x"] = {"bytes": 1, "sha256": "0"}
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))


def progress(**fields):
    """progress.json as tailor writes it at step 2, with `fields` changed (None: left out)."""
    saved = {"world_size": 1, **asdict(Progress(step=2, tokens=128, trained_tokens=10, elapsed_s=1.0))}
    saved.update(fields)
    return json.dumps({k: v for k, v in saved.items() if v is not None})


P, R = "state/progress.json", "state/rank_0.json"
DAMAGED = {  # name: (damage, what the message says)
    "progress.json is {}": (write(P, "{}"), f"{P} has no int 'world_size'"),
    "progress.json is a list": (write(P, "[]"), f"{P} is not a JSON object"),
    "progress.json is not JSON": (write(P, "{'step': 2"), f"{P} is unreadable (JSONDecodeError)"),
    "progress.json is not UTF-8": (write(P, b"\xff\xfe{}"), f"{P} is unreadable (UnicodeDecodeError)"),
    "progress.json is empty": (write(P, ""), f"{P} is unreadable (JSONDecodeError)"),
    "progress.json nests 100000 lists": (write(P, "[" * 100_000), f"{P} is unreadable (RecursionError)"),
    "step is a string": (write(P, progress(step="2")), f"{P} has no int 'step'"),
    "step is a float": (write(P, progress(step=2.0)), f"{P} has no int 'step'"),
    "step is true": (write(P, progress(step=True)), f"{P} has no int 'step'"),
    "step is negative": (write(P, progress(step=-1)), f"{P} has step -1, which no run reaches"),
    "step is missing": (write(P, progress(step=None)), f"{P} has no int 'step'"),
    "elapsed_s is NaN": (write(P, progress(elapsed_s=float("nan"))), f"{P} has elapsed_s nan, which no run reaches"),
    "elapsed_s is 1e400": (write(P, progress().replace('"elapsed_s": 1.0', '"elapsed_s": 1e400')), "elapsed_s inf"),
    "world_size is 0": (write(P, progress(world_size=0)), f"{P} has world_size 0, which no run reaches"),
    "world_size is 3": (write(P, progress(world_size=3)), "state/tensors_rank_1.safetensors is missing, though 3"),
    "an unknown field": (write(P, progress(pickle="cos\nsystem")), f"{P} has fields tailor does not write: pickle"),
    "progress.json is missing": (remove(P), "no training state (state/progress.json): adapters only"),
    "rank_0.json is {}": (write(R, "{}"), f"{R} is not a data position and random state that tailor writes"),
    "rank_0.json is not JSON": (write(R, "\x00"), f"{R} is unreadable (JSONDecodeError)"),
    "rank_0.json is missing": (remove(R), f"{R} is missing, though 1 ranks saved this state"),
    "the tensors file is missing": (
        remove("state/tensors_rank_0.safetensors"),
        "tensors_rank_0.safetensors is missing",
    ),
    "manifest lists no files": (
        write("manifest.json", '{"files": {}}', manifest=False),
        "manifest.json lists no files",
    ),
    "manifest is {}": (write("manifest.json", "{}", manifest=False), "manifest.json is unreadable"),
    "manifest is a list": (write("manifest.json", "[]", manifest=False), "manifest.json is unreadable"),
    "manifest is not JSON": (write("manifest.json", "{", manifest=False), "manifest.json is unreadable"),
    "manifest is missing": (remove("manifest.json", manifest=False), "no manifest.json"),
    "manifest sizes are strings": (
        write("manifest.json", '{"files": {"params.json": {"bytes": "1", "sha256": "0"}}}', manifest=False),
        "manifest.json is not a list of files with their bytes and sha256",
    ),
    "manifest names a file outside": (list_outside, "manifest.json names a file outside the checkpoint: ../../x"),
    "a file the manifest does not list": (write("extra.bin", b"\x80\x04", manifest=False), "does not list extra.bin"),
    "a state file cut short": (
        write("state/tensors_rank_0.safetensors", b"\x00" * 8, manifest=False),
        "state/tensors_rank_0.safetensors has 8 bytes, the manifest says",
    ),
    "a flipped byte in the state": (
        flip_a_byte("state/tensors_rank_0.safetensors"),
        "state/tensors_rank_0.safetensors checksum mismatch",
    ),
    "a flipped byte in the adapters": (flip_a_byte("lora.safetensors"), "lora.safetensors checksum mismatch"),
    "params.json edited": (write("params.json", "{}", manifest=False), "params.json has 2 bytes, the manifest says"),
    "the state folder is gone": (remove("state"), "no training state (state/progress.json): adapters only"),
    "rank_0.json's random state is not one": (
        write(R, '{"data": {}, "rng": {"torch": [1, 2], "numpy": [], "python": []}}'),
        f"{R} holds no random state that can be restored",
    ),
    "the tensors file is a pickle": (
        write("state/tensors_rank_0.safetensors", b"\x80\x04\x95" + b"\x00" * 64),
        "state/tensors_rank_0.safetensors is not a training state tailor writes",
    ),
    "the tensors file has no shard dimensions": (
        write("state/tensors_rank_0.safetensors", safetensors_bytes({"model/x": torch.zeros(2)})),
        "state/tensors_rank_0.safetensors is not a training state tailor writes (a safetensors file with shard_dims)",
    ),
}


@pytest.mark.parametrize("case", DAMAGED)
def test_resume_from_a_damaged_checkpoint_is_refused_by_name(case, trained, model_dir, tmp_path, capsys):
    damage, problem = DAMAGED[case]
    checkpoint = copy_run(trained, tmp_path) / "checkpoints" / "checkpoint_000002"
    damage(checkpoint)
    config = write_config(tmp_path, model_dir, max_steps=3)
    code = train.run([str(config), f"resume={checkpoint}", f"run_dir={tmp_path / 'branch'}"])
    error_ending(code, capsys, exit_codes.USAGE, f"resume: {checkpoint}: ", problem)
    assert not (tmp_path / "branch" / "config.yaml").exists()


@pytest.mark.parametrize("case", DAMAGED)
def test_resume_auto_sets_a_damaged_checkpoint_aside_and_goes_on(case, trained, model_dir, tmp_path, capsys):
    damage, problem = DAMAGED[case]
    run_dir = copy_run(trained, tmp_path)
    checkpoint = run_dir / "checkpoints" / "checkpoint_000002"
    damage(checkpoint)
    assert train.run([str(write_config(tmp_path, model_dir, max_steps=3))]) == 0
    out = capsys.readouterr().out
    assert f"skipped {checkpoint}: " in out and problem in out
    assert f"resuming from {run_dir / 'checkpoints' / 'checkpoint_000001'}" in out
    names = sorted(p.name for p in checkpoint.parent.iterdir())
    if "adapters only" in problem:  # not damaged: kept where it is, though it cannot be resumed from
        assert names == ["checkpoint_000002", "checkpoint_000003"]
    else:
        assert "renamed to checkpoint_000002.damaged, which tailor never uses, counts or deletes" in out
        assert names == ["checkpoint_000002", "checkpoint_000002.damaged", "checkpoint_000003"]


@pytest.mark.parametrize("resume", ["auto", "PATH"])
def test_a_checkpoint_of_another_lora_rank_is_refused_by_name(resume, trained, model_dir, tmp_path, capsys):
    run_dir = copy_run(trained, tmp_path)
    checkpoint = run_dir / "checkpoints" / "checkpoint_000002"
    overrides = ["lora.rank=2"] + ([] if resume == "auto" else [f"resume={checkpoint}", f"run_dir={tmp_path / 'b'}"])
    code = train.run([str(write_config(tmp_path, model_dir, max_steps=3)), *overrides])
    error_ending(
        code, capsys, exit_codes.USAGE, checkpoint, "its training state does not fit this model: Size mismatch"
    )
    assert (run_dir / "config.yaml").read_text() == (trained / "config.yaml").read_text()  # the record stays


@pytest.mark.parametrize(
    "where, problem",
    [
        ("missing", "not a folder"),
        ("a file", "not a folder"),
        ("an empty folder", "no manifest.json"),
    ],
)
def test_resume_from_what_is_not_a_checkpoint(where, problem, model_dir, tmp_path, capsys):
    target = tmp_path / "elsewhere" / "checkpoint_000002"
    if where == "a file":
        target.parent.mkdir()
        target.write_text("{}")
    elif where == "an empty folder":
        target.mkdir(parents=True)
    code = train.run([str(write_config(tmp_path, model_dir)), f"resume={target}"])
    error_ending(code, capsys, exit_codes.USAGE, f"resume: {target}: {problem}")


AFTER_TRAINING = {  # the commands that read a checkpoint's adapters
    "merge": lambda model, checkpoint, out: ["merge", "--base", model, "--adapter", checkpoint, "--out", out],
    "export-peft": lambda model, checkpoint, out: ["export-peft", "--adapter", checkpoint, "--out", out],
    "chat": lambda model, checkpoint, out: ["chat", model, "--adapter", checkpoint, "--prompt", "hi"],
}


@pytest.mark.parametrize("command", AFTER_TRAINING)
def test_damaged_adapters_are_never_merged_exported_or_chatted_with(command, trained, model_dir, tmp_path, capsys):
    checkpoint = copy_run(trained, tmp_path) / "checkpoints" / "checkpoint_000002"
    flip_a_byte("lora.safetensors")(checkpoint)
    code = tailor([str(a) for a in AFTER_TRAINING[command](model_dir, checkpoint, tmp_path / "out")])
    error_ending(code, capsys, exit_codes.USAGE, f"{checkpoint}: lora.safetensors checksum mismatch")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------
# The file system


def make_file(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("x")


def make_folder(path: Path) -> None:
    path.mkdir(parents=True)


def link_to_unwritable(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(UNWRITABLE)


FOLDER_FAULTS = {  # name: (what is done to tmp_path, the override, what the message says)
    "run_dir is a file": (lambda t: make_file(t / "run"), [], "run_dir: {t}/run is a file, not a folder"),
    "run_dir cannot be created": (
        lambda t: None,
        [f"run_dir={UNWRITABLE}/tailor/run"],
        f"run_dir: {UNWRITABLE}/tailor/run cannot be written",
    ),
    "run_dir is not writable": (lambda t: link_to_unwritable(t / "run"), [], "run_dir: {t}/run cannot be written"),
    "checkpoints/ is a file": (
        lambda t: make_file(t / "run/checkpoints"),
        [],
        "run_dir: {t}/run/checkpoints is a file, where tailor keeps the checkpoint folders",
    ),
    "checkpoints/ is not writable": (
        lambda t: link_to_unwritable(t / "run/checkpoints"),
        [],
        "run_dir: {t}/run/checkpoints cannot be written",
    ),
    "metrics.jsonl is a folder": (
        lambda t: make_folder(t / "run/metrics.jsonl"),
        [],
        "run_dir: {t}/run/metrics.jsonl is a folder, where tailor writes its metrics.jsonl file",
    ),
    "config.yaml is a folder": (
        lambda t: make_folder(t / "run/config.yaml"),
        [],
        "run_dir: {t}/run/config.yaml is a folder",
    ),
    "run.lock is a folder": (lambda t: make_folder(t / "run/run.lock"), [], "run_dir: {t}/run/run.lock is a folder"),
    "data.cache_dir is a file": (
        lambda t: make_file(t / "cache"),
        [],
        "data.cache_dir: {t}/cache is a file, not a folder",
    ),
    "data.cache_dir cannot be created": (
        lambda t: None,
        [f"data.cache_dir={UNWRITABLE}/tailor-cache"],
        f"data.cache_dir: {UNWRITABLE}/tailor-cache cannot be written",
    ),
    "data.cache_dir is not writable": (
        lambda t: link_to_unwritable(t / "cache"),
        [],
        "data.cache_dir: {t}/cache cannot be written",
    ),
}


@pytest.mark.parametrize("case", FOLDER_FAULTS)
def test_a_run_folder_that_cannot_be_written_is_found_before_any_work(case, model_dir, tmp_path, capsys):
    prepare, overrides, problem = FOLDER_FAULTS[case]
    prepare(tmp_path)
    code = train.run([str(write_config(tmp_path, model_dir)), *overrides])
    error_ending(code, capsys, exit_codes.USAGE, problem.format(t=tmp_path))
    assert not (tmp_path / "run" / "metrics.jsonl").is_file()  # found in pre-flight: no step was trained


def test_a_run_folder_held_by_another_run_exits_3(model_dir, tmp_path, capsys):
    cpu = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    with lock_run_dir(tmp_path / "run", cpu, command="train.py other.yaml"):
        code = train.run([str(write_config(tmp_path, model_dir))])
    error_ending(code, capsys, exit_codes.RUN_LOCKED, f"run_dir {tmp_path / 'run'} is in use", f"pid {os.getpid()}")


WRITES = {  # the function of a save that finds the disk full, its calls in one save, and the file it was writing
    "the adapters": (folders, "save_weights", 1, "lora.safetensors"),
    "the training state": (training_state, "save_tensors", 1, "tensors_rank_0.safetensors"),
    "a rank's data position": (training_state, "_write_json", 2, "rank_0.json"),
}


@pytest.mark.parametrize("case", WRITES)
def test_a_disk_that_fills_during_a_save_keeps_the_older_checkpoints(case, model_dir, tmp_path, capsys, monkeypatch):
    module, name, per_save, file = WRITES[case]
    real, calls = getattr(module, name), []

    def fill_the_disk(*args, **kwargs):
        calls.append(1)
        if len(calls) > per_save:  # the second save
            path = next(a for a in args if isinstance(a, (str, Path)))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, fill_the_disk)
    code = train.run([str(write_config(tmp_path, model_dir))])
    checkpoints = tmp_path / "run" / "checkpoints"
    message = error_ending(
        code, capsys, exit_codes.WRITE_FAILED, checkpoints / "checkpoint_000002", "No space left on device"
    )
    assert file in message and "the checkpoints saved before are kept" in message
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint_000001"]  # no partial folder left
    assert verify_checkpoint(checkpoints / "checkpoint_000001") is None


class FullDisk:
    """A file whose writes fail as on a full disk once `room` of them went through."""

    def __init__(self, file, room: int) -> None:
        self.file, self.room = file, room

    def write(self, text: str) -> int:
        self.room -= 1
        if self.room < 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.file.write(text)

    def __getattr__(self, name):
        return getattr(self.file, name)


def test_a_disk_that_fills_while_metrics_are_written_names_the_file(model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(monitoring, "open", lambda *args, **kwargs: FullDisk(open(*args, **kwargs), 2), raising=False)
    code = train.run([str(write_config(tmp_path, model_dir, max_steps=4))])
    run_dir = tmp_path / "run"
    error_ending(code, capsys, exit_codes.WRITE_FAILED, f"error: {run_dir / 'metrics.jsonl'}: No space left on device")
    assert verify_checkpoint(run_dir / "checkpoints" / "checkpoint_000001") is None  # saved before the disk filled
