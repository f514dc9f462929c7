"""Hostile inputs, round 3 (issue #27, part B): the tokenized cache, data paths, validate and tokenize, config loading.

Each case ends in no traceback, no hang and no loss: the documented exit code (finetune/exit_codes.py), a message
naming the place, and what was there before still there.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from hostile_runs import REPO, clean_ending, copy_run, environment, write_config

import train as train_script
from finetune import exit_codes
from finetune.cli import main as tailor
from finetune.data import cache_build
from finetune.data.text_encoders import usable_cores
from model.tiny import write_tiny_model

DEMO = REPO / "data/demo/train.jsonl"


def sample(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]}


def write_jsonl(path: Path, lines: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def cache_entries(cache_dir: Path) -> list[Path]:
    return sorted(p for p in cache_dir.iterdir() if p.is_dir() and len(p.name) == 32)


# ---------------------------------------------------------------------------------------------------
# 1. An edit in place that keeps size, mtime and inode is seen


def test_an_edit_in_place_keeping_size_and_mtime_is_not_served_from_the_cache(model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", [sample(i) for i in range(4)])
    config = write_config(tmp_path, model_dir, data__train=str(data))
    clean_ending(tailor(["validate", str(config)]), capsys, exit_codes.OK, "no faults")
    before = data.stat()
    lines = data.read_bytes().split(b"\n")
    lines[1] = b"x" * len(lines[1])  # the same length: not JSON
    with open(data, "r+b") as f:  # in place: the same inode
        f.write(b"\n".join(lines))
    os.utime(data, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = data.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (before.st_size, before.st_mtime_ns, before.st_ino)
    clean_ending(tailor(["validate", str(config)]), capsys, exit_codes.DATA_FAULTS, f"{data}:2: ")


# ---------------------------------------------------------------------------------------------------
# 2. Damaged cache entries are rebuilt, said, never trusted, never fatal


def _pickled_spans(entry: Path, marker: Path) -> None:
    class RunsCode:  # what unpickling would call: Path.touch(marker)
        def __reduce__(self):
            return (Path.touch, (marker,))

    np.save(entry / "spans.npy", np.array([RunsCode()], dtype=object), allow_pickle=True)


DAMAGES = {
    "no meta.json": lambda entry, marker: (entry / "meta.json").unlink(),
    "meta.json not JSON": lambda entry, marker: (entry / "meta.json").write_text("{not json"),
    "truncated tokens": lambda entry, marker: os.truncate(
        entry / "tokens.bin", (entry / "tokens.bin").stat().st_size - 4
    ),
    "ids beyond the vocabulary": lambda entry, marker: (entry / "tokens.bin").write_bytes(
        np.full((entry / "tokens.bin").stat().st_size // 4, 2**31, np.uint32).tobytes()
    ),
    "a pickled array": _pickled_spans,
    "offsets past the tokens": lambda entry, marker: np.save(
        entry / "sample_starts.npy", np.load(entry / "sample_starts.npy") * 2
    ),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_cache_entry_is_rebuilt_and_said(damage, model_dir, tmp_path, capsys):
    config = write_config(tmp_path, model_dir, max_steps=1, checkpoint__enabled=False)
    clean_ending(tailor(["validate", str(config)]), capsys, exit_codes.OK, "no faults")
    (entry,) = cache_entries(tmp_path / "cache")
    marker = tmp_path / "pwned"
    DAMAGES[damage](entry, marker)
    clean_ending(
        train_script.run([str(config)]), capsys, exit_codes.OK, f"{entry}: damaged cache entry of {DEMO}", "rebuilt"
    )
    assert not marker.exists()  # no pickle was loaded
    output = clean_ending(tailor(["validate", str(config)]), capsys, exit_codes.OK, "no faults")
    assert "damaged" not in output  # the rebuilt entry is whole


def test_a_data_file_shrunk_between_runs_is_named_on_resume(model_dir, tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    shutil.copy(DEMO, data)
    config = write_config(tmp_path, model_dir, data__train=str(data), data__shuffle=False)
    clean_ending(train_script.run([str(config)]), capsys, exit_codes.OK)
    data.write_text(data.read_text().splitlines(keepends=True)[0])  # one sample left
    clean_ending(
        train_script.run([str(config), "max_steps=4"]),
        capsys,
        exit_codes.USAGE,
        f"error: {tmp_path / 'run' / 'checkpoints' / 'checkpoint_000002'}: the saved data position (sample ",
        f"{data} changed since the checkpoint",
    )


# ---------------------------------------------------------------------------------------------------
# 3. Hundreds of data files under the usual limit of open files


def _limit_open_files() -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    limit = 1024 if hard == resource.RLIM_INFINITY else min(1024, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))


@pytest.mark.slow
def test_300_data_files_under_ulimit_1024(model_dir, tmp_path):
    folder = tmp_path / "data"
    for k in range(300):
        write_jsonl(folder / f"part{k:03d}.jsonl", [sample(2 * k), sample(2 * k + 1)])
    config = write_config(tmp_path, model_dir, data__train=str(folder), max_steps=3, checkpoint__enabled=False)
    result = subprocess.run(
        [sys.executable, "train.py", str(config)],
        cwd=REPO,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=_limit_open_files,
    )
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.returncode == 0, result.stderr[-3000:]
    assert "300 file(s), 300 lines" not in result.stdout and "300 file(s), 600 lines" in result.stdout


# ---------------------------------------------------------------------------------------------------
# 4. `tailor tokenize F -o F`


def test_tokenize_refuses_to_write_over_its_input(model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", [sample(0), sample(1)])
    before = data.read_bytes()
    same = tmp_path / "sub" / ".." / "train.jsonl"
    (tmp_path / "sub").mkdir()
    for output in (data, same):
        code = tailor(["tokenize", str(data), "--model", str(model_dir), "-o", str(output)])
        clean_ending(code, capsys, exit_codes.USAGE, f"error: -o {output} is the input file")
    assert data.read_bytes() == before


# ---------------------------------------------------------------------------------------------------
# 5. run_dir or data.cache_dir inside a data folder


@pytest.mark.parametrize("inside", ["run_dir", "data.cache_dir"])
def test_a_data_folder_holding_the_run_folder_or_the_cache_is_refused(inside, model_dir, tmp_path, capsys):
    folder = tmp_path / "data"
    write_jsonl(folder / "train.jsonl", [sample(i) for i in range(4)])
    written = folder / ("run" if inside == "run_dir" else "cache")
    where = {"run_dir" if inside == "run_dir" else "data__cache_dir": str(written)}
    config = write_config(tmp_path, model_dir, data__train=str(folder), **where)
    named = f"data.train[0]: {folder}: the folder holds {inside} {written}"
    clean_ending(train_script.run([str(config)]), capsys, exit_codes.USAGE, named)
    clean_ending(tailor(["validate", str(config)]), capsys, exit_codes.USAGE, named)
    assert sorted(p.name for p in folder.iterdir()) == ["train.jsonl"]  # nothing written there


# ---------------------------------------------------------------------------------------------------
# 6. `~` in paths


def test_tilde_means_the_home_folder_everywhere(model_dir, tmp_path, capsys, monkeypatch):
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    cwd.mkdir()
    write_jsonl(home / "data" / "train.jsonl", [sample(i) for i in range(6)])
    (home / "model").symlink_to(model_dir)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    config = write_config(
        tmp_path,
        model_dir,
        run_dir="~/runs/a",
        model__path="~/model",
        data__train="~/data/train.jsonl",
        data__cache_dir="~/cache",
        max_steps=1,
    )
    clean_ending(tailor(["validate", str(config)]), capsys, exit_codes.OK, "no faults")
    clean_ending(train_script.run([str(config)]), capsys, exit_codes.OK)
    assert (home / "runs" / "a" / "checkpoints" / "checkpoint_000001").is_dir()
    assert yaml.safe_load((home / "runs" / "a" / "config.yaml").read_text())["run_dir"] == str(home / "runs" / "a")
    assert list(cwd.iterdir()) == [] and not (REPO / "~").exists()  # no folder named `~`


# ---------------------------------------------------------------------------------------------------
# 7. A FIFO as a data file


@pytest.mark.parametrize("place", ["the file", "in a folder"])
def test_a_fifo_as_data_is_named_as_a_fifo(place, model_dir, tmp_path, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    fifo = folder / "train.jsonl"
    os.mkfifo(fifo)
    if place == "in a folder":
        write_jsonl(folder / "good.jsonl", [sample(0)])
    config = write_config(tmp_path, model_dir, data__train=str(fifo if place == "the file" else folder))
    named = f"{fifo}: a FIFO (named pipe)"
    clean_ending(train_script.run([str(config)]), capsys, exit_codes.USAGE, f"error: data.train[0]: {named}")
    clean_ending(tailor(["validate", str(config)]), capsys, exit_codes.USAGE, f"error: data.train[0]: {named}")
    if place == "the file":
        clean_ending(
            tailor(["tokenize", str(fifo), "--model", str(model_dir)]), capsys, exit_codes.USAGE, f"error: {named}"
        )


# ---------------------------------------------------------------------------------------------------
# 8. Faulty data: one exit code everywhere, and no run_dir left behind


def test_faulty_data_exits_1_in_training_as_in_validate_and_leaves_no_run_dir(model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", [sample(0), "{not json", sample(1)])
    run_dir = tmp_path / "new" / "deeper" / "run"
    config = write_config(tmp_path, model_dir, data__train=str(data), run_dir=str(run_dir))
    clean_ending(tailor(["validate", str(config)]), capsys, exit_codes.DATA_FAULTS, f"{data}:2: ")
    clean_ending(train_script.run([str(config)]), capsys, exit_codes.DATA_FAULTS, f"error: {data}:2: ")
    assert not (tmp_path / "new").exists()

    run_dir.mkdir(parents=True)  # a run_dir that was there keeps what it held
    (run_dir / "notes.txt").write_text("mine")
    clean_ending(train_script.run([str(config)]), capsys, exit_codes.DATA_FAULTS, f"error: {data}:2: ")
    assert (run_dir / "notes.txt").read_text() == "mine"


# ---------------------------------------------------------------------------------------------------
# 9. --fix's wording; Ctrl-C during `tailor validate` with worker processes


def test_fix_says_what_it_did(model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", [sample(0), "{not json", sample(1)])
    config = write_config(tmp_path, model_dir, data__train=str(data))
    output = clean_ending(
        tailor(["validate", str(config), "--fix", str(tmp_path / "fixed")]),
        capsys,
        exit_codes.OK,
        "0 have a safe repair applied in the files written below, where the others are removed",
        "2 lines kept, 0 repaired, 1 removed",
    )
    assert "would be removed" not in output


def _children(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/task/{pid}/children").read_text().split()


@pytest.mark.slow
@pytest.mark.skipif(usable_cores() < 2 or not Path("/proc/self/task").is_dir(), reason="workers need 2 cores")
def test_ctrl_c_during_validate_with_workers_ends_quietly(tmp_path):
    model = write_tiny_model(tmp_path / "model", tokenizer="tekken")  # Tekken: workers from 2 cores on
    data = tmp_path / "train.jsonl"
    with open(data, "w") as f:
        for i in range(60_000):  # about 6 MB: split between the workers
            f.write(json.dumps(sample(i)) + "\n")
    config = write_config(tmp_path, model, data__train=str(data), data__num_workers=2)
    process = subprocess.Popen(
        [sys.executable, "-m", "finetune", "validate", str(config)],
        cwd=REPO,
        env=environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # a group of its own, as a terminal's Ctrl-C reaches the whole group
    )
    while process.poll() is None and not _children(process.pid):
        time.sleep(0.05)
    assert process.poll() is None, process.communicate()
    os.killpg(process.pid, signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert "Traceback" not in err and "ForkPoolWorker" not in err, err[-3000:]
    assert process.returncode == exit_codes.INTERRUPTED and "interrupted" in err


# ---------------------------------------------------------------------------------------------------
# 10. YAML alias bombs: a few hundred bytes that stand for a billion values

BOMB = "".join(f"b{k}: &b{k} [{', '.join([f'*b{k - 1}'] * 9) if k else ', '.join(['lol'] * 9)}]\n" for k in range(10))
MERGE_BOMB = "m0: &m0 {a: 1, b: 2}\n" + "".join(
    f"m{k}: &m{k} {{<<: [{', '.join([f'*m{k - 1}'] * 9)}], k{k}: 1}}\n" for k in range(1, 12)
)


@pytest.mark.parametrize("bomb", ["aliases", "merge keys"])
@pytest.mark.parametrize("command", ["train", "validate"])
def test_a_yaml_alias_bomb_in_a_config_is_refused(bomb, command, model_dir, tmp_path, capsys):
    config = write_config(tmp_path, model_dir)
    config.write_text(config.read_text() + (BOMB if bomb == "aliases" else MERGE_BOMB))
    assert config.stat().st_size < 4096
    code = train_script.run([str(config)]) if command == "train" else tailor(["validate", str(config)])
    output = clean_ending(code, capsys, exit_codes.USAGE, f"error: {config}")
    assert len(output) < 2000  # the value is not quoted


def test_a_yaml_alias_bomb_in_an_override_is_refused(model_dir, tmp_path, capsys):
    config = write_config(tmp_path, model_dir)
    levels = ["&a [x, x, x, x, x, x, x, x, x]"] + [
        f"&{c} [{', '.join([f'*{p}'] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi")
    ]
    override = f"lora.targets=[{', '.join(levels)}]"
    output = clean_ending(
        train_script.run([str(config), override]), capsys, exit_codes.USAGE, "error: override 'lora.targets="
    )
    assert "stands for more than" in output and len(output) < 4000


def test_a_yaml_alias_bomb_in_a_runs_config_yaml_does_not_stop_a_resume(trained, model_dir, tmp_path, capsys):
    run_dir = copy_run(trained, tmp_path)
    (run_dir / "config.yaml").write_text(BOMB)
    config = write_config(tmp_path, model_dir, max_steps=3)
    clean_ending(train_script.run([str(config)]), capsys, exit_codes.OK, "the earlier settings are kept in")
    assert (run_dir / "checkpoints" / "checkpoint_000003").is_dir()


# ---------------------------------------------------------------------------------------------------
# 11. A config file's fault is not blamed on an unrelated override


def test_a_config_files_fault_is_not_blamed_on_an_unrelated_override(model_dir, tmp_path, capsys):
    config = write_config(tmp_path, model_dir, logging={"wandb": {"key": "secret"}})
    code = train_script.run([str(config), f"run_dir={tmp_path / 'other'}"])
    output = clean_ending(code, capsys, exit_codes.USAGE, f"error: {config}: logging.wandb.key")
    assert "override" not in output


# ---------------------------------------------------------------------------------------------------
# 12. A full disk while caching names the cache


@pytest.mark.parametrize("command", ["train", "validate"])
def test_a_full_disk_while_caching_names_the_cache(command, model_dir, tmp_path, capsys, monkeypatch):
    def fill_the_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as a write's error: no file named

    monkeypatch.setattr(cache_build, "_tokenize_range", fill_the_disk)
    config = write_config(tmp_path, model_dir)
    code = train_script.run([str(config)]) if command == "train" else tailor(["validate", str(config)])
    clean_ending(code, capsys, exit_codes.WRITE_FAILED, f"error: {tmp_path / 'cache'}: No space left on device")
    assert not [p for p in (tmp_path / "cache").iterdir() if ".tmp-" in p.name]  # the partial entry removed
