"""Never lose work: a run killed, preempted or fed bad numbers resumes exactly; checkpoints count only when whole.

End to end with train.py (one process, and 2 ranks under torchrun), then the pieces in process.
"""

import json
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from launching import REPO, hook_folder, records, subprocess_env, torchrun
from safetensors.torch import load_file

import finetune.training.train_step as step_module
import train as train_script
from finetune import exit_codes
from finetune.checkpoints.manifest import verify_checkpoint
from finetune.checkpoints.tensor_state import save_tensors
from finetune.config import ConfigError, config_from_dict, load_config
from finetune.data import build_train_loader, load_tokenizer
from finetune.data.sources import open_run_data
from finetune.training.checkpointing import Checkpointer, ResumeError, read_resume_point
from finetune.training.distributed import DistInfo
from finetune.training.model_setup import build_training_model
from finetune.training.optim import build_optimizer
from finetune.training.rng import rng_state
from finetune.training.run_start import prepare_run_dir
from model.args import load_model_args
from model.lora import lora_state_dict

TIMEOUT = 300
CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
# A short run with checkpoints every 4 steps. Dropout draws from torch's generator, so an exact resume needs the
# saved generator state, not only the weights, optimizer and data position.
SHORT_RUN = dict(max_steps=16, lora__dropout=0.1, checkpoint__freq=4, checkpoint__keep=2, eval__freq=4)


def train(config: Path, *overrides: str, expect: int = 0, hook: Path | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "train.py", str(config), *overrides],
        cwd=REPO,
        env=subprocess_env(hook),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == expect, f"exit {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def launch(command: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        command, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def wait_for_step(run_dir: Path, step: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not any(r["step"] >= step for r in records(run_dir, "train")):
        assert process.poll() is None, f"the run ended before step {step}:\n{process.stdout.read()[-3000:]}"
        assert time.monotonic() < deadline
        time.sleep(0.01)


def numbers(run_dir: Path) -> list[tuple]:
    """What must be equal between two runs: every train step's loss and gradient norm, every eval."""
    return [
        (r["kind"], r["step"], r.get("loss"), r.get("grad_norm"), r.get("eval_loss"))
        for r in records(run_dir)
        if r["kind"] in ("train", "eval")  # not the data report each launch writes
    ]


# ---------------------------------------------------------------------------------------------------
# End to end


def test_killed_at_a_random_step_and_resumed_equals_the_uninterrupted_run(write_config, tmp_path):
    reference = tmp_path / "reference"
    train(write_config(run_dir=str(reference), **SHORT_RUN))

    config = write_config(**SHORT_RUN)
    run_dir = tmp_path / "run"
    kill_at = random.randint(5, 13)  # after the first checkpoint, and before the last step
    process = launch([sys.executable, "train.py", str(config)])
    wait_for_step(run_dir, kill_at, process)
    process.kill()
    assert process.wait() == -signal.SIGKILL
    stopped = max(r["step"] for r in records(run_dir, "train"))
    assert stopped < 16, f"killed after the end (step {stopped})"

    resumed = train(config)  # the same command
    assert "resuming from" in resumed.stdout, resumed.stdout
    final = "checkpoints/checkpoint_000016/lora.safetensors"
    assert (run_dir / final).read_bytes() == (reference / final).read_bytes(), f"killed at step {stopped}"
    assert numbers(run_dir) == numbers(reference), f"killed at step {stopped}"


def test_a_torn_or_damaged_checkpoint_is_skipped_and_reported(write_config, tmp_path):
    config = write_config(**dict(SHORT_RUN, max_steps=12, checkpoint__keep=3))
    train(config)
    run_dir, checkpoints = tmp_path / "run", tmp_path / "run" / "checkpoints"
    adapters, uninterrupted = (checkpoints / "checkpoint_000012/lora.safetensors").read_bytes(), numbers(run_dir)
    shard = checkpoints / "checkpoint_000012" / "state" / "tensors_rank_0.safetensors"
    damaged = bytearray(shard.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    shard.write_bytes(bytes(damaged))
    torn = checkpoints / "checkpoint_000010.tmp"  # what a kill during a save leaves
    (torn / "state").mkdir(parents=True)
    (torn / "lora.safetensors").write_bytes(adapters[:1000])

    result = train(config)
    assert f"skipped {torn}: a save or a deletion that was cut short" in result.stdout
    assert (
        f"skipped {checkpoints / 'checkpoint_000012'}: state/tensors_rank_0.safetensors checksum mismatch; renamed to "
        "checkpoint_000012.damaged, which tailor never uses, counts or deletes"
    ) in result.stdout
    assert f"resuming from {checkpoints / 'checkpoint_000008'} (step 8 of 12)" in result.stdout
    assert "dropped the 5 records after step 8" in result.stdout  # 4 train records and the eval at step 12
    assert (checkpoints / "checkpoint_000012/lora.safetensors").read_bytes() == adapters
    assert numbers(run_dir) == uninterrupted
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        "checkpoint_000004",
        "checkpoint_000008",
        "checkpoint_000012",
        "checkpoint_000012.damaged",
    ]  # the torn one is gone, the damaged one set aside
    assert (checkpoints / "checkpoint_000012.damaged/state/tensors_rank_0.safetensors").read_bytes() == damaged
    assert verify_checkpoint(checkpoints / "checkpoint_000012") is None


def test_a_damaged_newer_checkpoint_is_set_aside_and_never_counted_by_rotation(write_config, tmp_path, capsys):
    """The case found: resume past a damaged newer checkpoint, save with keep: 1 (which deleted the good one and
    kept the damaged one), resume again (which started from step 0)."""
    config = write_config(max_steps=4, eval__enabled=False, checkpoint__freq=2, checkpoint__keep=2)
    assert train_script.run([str(config)]) == 0
    checkpoints = tmp_path / "run" / "checkpoints"
    (checkpoints / "checkpoint_000004" / "lora.safetensors").write_bytes(b"damaged")
    capsys.readouterr()

    assert train_script.run([str(config), "max_steps=3", "checkpoint.keep=1"]) == 0
    out = capsys.readouterr().out
    assert f"skipped {checkpoints / 'checkpoint_000004'}: lora.safetensors has 7 bytes" in out
    assert f"resuming from {checkpoints / 'checkpoint_000002'} (step 2 of 3)" in out
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint_000003", "checkpoint_000004.damaged"]
    assert (checkpoints / "checkpoint_000004.damaged" / "lora.safetensors").read_bytes() == b"damaged"

    assert train_script.run([str(config), "max_steps=5", "checkpoint.keep=1"]) == 0
    assert f"resuming from {checkpoints / 'checkpoint_000003'} (step 3 of 5)" in capsys.readouterr().out
    assert [r["step"] for r in records(tmp_path / "run", "train")] == [1, 2, 3, 4, 5]


def test_ctrl_c_finishes_the_step_saves_and_exits_0(write_config, tmp_path):
    config = write_config(max_steps=40, eval__enabled=False)
    run_dir = tmp_path / "run"
    process = launch([sys.executable, "train.py", str(config)])
    wait_for_step(run_dir, 3, process)
    process.send_signal(signal.SIGINT)
    output = process.communicate(timeout=TIMEOUT)[0]
    assert process.returncode == 0, output[-3000:]
    last = max(r["step"] for r in records(run_dir, "train"))
    folder = run_dir / "checkpoints" / f"checkpoint_{last:06d}"
    assert f"stopped at step {last} (SIGINT): saved {folder}" in output
    assert f"resume with: python train.py {config}" in output
    assert verify_checkpoint(folder) is None and read_resume_point(folder).step == last

    resumed = train(config, "max_steps=" + str(last + 2))
    assert f"resuming from {folder}" in resumed.stdout
    assert [r["step"] for r in records(run_dir, "train")] == list(range(1, last + 3))


def test_sigterm_to_torchrun_saves_every_rank_and_resumes_exactly_or_on_one_rank(write_config, tmp_path):
    """Preemption of a 2-rank run (torchrun forwards SIGTERM to its workers); the same command resumes it exactly,
    and one process can continue from the same checkpoint, resharding the weights and optimizer state."""
    two_ranks = dict(batch_size=1, max_steps=12, lora__dropout=0.1, eval__enabled=False, checkpoint__freq=100)
    reference = tmp_path / "reference"
    run = subprocess.run(
        torchrun(write_config(run_dir=str(reference), **two_ranks)),
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert run.returncode == 0, run.stderr[-3000:]

    config = write_config(**two_ranks)
    run_dir = tmp_path / "run"
    agent = launch(torchrun(config))
    wait_for_step(run_dir, 3, agent)
    agent.send_signal(signal.SIGTERM)
    output = agent.communicate(timeout=TIMEOUT)[0]  # torchrun itself exits non-zero after forwarding a signal
    last = max(r["step"] for r in records(run_dir, "train"))
    assert last < 12, "the run ended before the signal"
    folder = run_dir / "checkpoints" / f"checkpoint_{last:06d}"
    assert output.count(f"stopped at step {last} (SIGTERM): saved {folder}") == 1, output[-3000:]
    assert "resume with: the same torchrun command" in output
    assert verify_checkpoint(folder) is None
    state = sorted(p.name for p in (folder / "state").iterdir())
    assert state == [
        "base_model.json",
        "progress.json",
        "rank_0.json",
        "rank_1.json",
        "tensors_rank_0.safetensors",
        "tensors_rank_1.safetensors",
    ]

    # The sharded state loads into one process exactly: the weights are the adapters the 2 ranks saved.
    cfg = load_config(config)
    model = build_training_model(cfg, load_model_args(cfg.model.path), CPU)
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], cfg.optim)
    loader = build_train_loader(
        open_run_data(cfg.data, load_tokenizer(cfg.model.path), cache_dir=Path(cfg.data.cache_dir)),
        seq_len=cfg.seq_len,
        batch_size=1,
        rank=0,
        world_size=1,
        seed=cfg.seed,
    )
    progress = Checkpointer(cfg, model, optimizer, loader, CPU).resume(read_resume_point(folder))
    assert progress.step == last and progress.tokens == last * 2 * cfg.seq_len
    saved = load_file(folder / "lora.safetensors")
    loaded = lora_state_dict(model.model)
    assert saved.keys() == loaded.keys()
    for name, tensor in saved.items():
        assert torch.equal(loaded[name], tensor), name
    moments = [s["exp_avg"] for s in optimizer.state.values()]
    assert len(moments) == len(saved) and all(m.abs().sum() > 0 for m in moments)
    assert {float(s["step"]) for s in optimizer.state.values()} == {float(last)}
    cfg.lora.rank = 4
    other = build_training_model(cfg, load_model_args(cfg.model.path), CPU)
    with pytest.raises(ResumeError, match="its training state does not fit this model: Size mismatch"):
        Checkpointer(
            cfg, other, build_optimizer([p for p in other.parameters() if p.requires_grad], cfg.optim), loader, CPU
        ).resume(read_resume_point(folder))

    run = subprocess.run(
        torchrun(config), cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=TIMEOUT
    )
    assert run.returncode == 0, run.stderr[-3000:]
    final = "checkpoints/checkpoint_000012/lora.safetensors"
    assert (run_dir / final).read_bytes() == (reference / final).read_bytes(), f"stopped at step {last}"
    assert numbers(run_dir) == numbers(reference), f"stopped at step {last}"

    branch = tmp_path / "one-rank"  # resume: a checkpoint folder, into a new run_dir
    one_rank = train(config, f"resume={folder}", f"run_dir={branch}", f"max_steps={last + 2}")
    assert f"{folder} was saved by 2 ranks and this run has 1" in one_rank.stdout
    assert [r["step"] for r in records(branch, "train")] == [last + 1, last + 2]
    assert records(branch, "train")[-1]["loss"] < 0.7 * records(run_dir, "train")[0]["loss"]  # trained weights


RANK_1_DISK_FULL_HOOK = """
import errno, os
import finetune.training.checkpointing as module

real, calls = module._write_json, []

def _write_json(path, value):
    calls.append(1)
    if os.environ.get("RANK") == "1" and len(calls) > 1:  # rank 1 writes one file a save: the second save fails
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return real(path, value)

module._write_json = _write_json
"""


def test_a_disk_full_on_one_rank_ends_every_rank_and_keeps_the_older_checkpoints(write_config, tmp_path):
    """Rank 1 cannot write its part of the second checkpoint: both ranks end (none waits for the other), the partial
    folder is removed and the first checkpoint stays intact."""
    config = write_config(batch_size=1, max_steps=4, eval__enabled=False, checkpoint__freq=1)
    hook = hook_folder(tmp_path / "hook", RANK_1_DISK_FULL_HOOK)
    result = subprocess.run(
        torchrun(config), cwd=REPO, env=subprocess_env(hook), capture_output=True, text=True, timeout=TIMEOUT
    )
    # torchrun reports a failed worker with a traceback of its own; tailor's ranks show none, and exit 6
    assert f'File "{REPO}' not in result.stderr and "terminate called" not in result.stderr, result.stderr[-3000:]
    # As torchrun reports the ranks: one exits 6; the other exits 6 too, unless torchrun, seeing the first one fail,
    # ended it (SIGTERM, -15) before it got there: which of the two happens depends on timing.
    codes = re.findall(r"exitcode\s*: (-?\d+) \(pid", result.stderr)
    assert str(exit_codes.WRITE_FAILED) in codes and set(codes) <= {str(exit_codes.WRITE_FAILED), "-15"}, codes
    checkpoints = tmp_path / "run" / "checkpoints"
    failed = checkpoints / "checkpoint_000002"
    assert f"error: {failed} could not be written (No space left on device: " in result.stderr
    assert "rank_1.json): the partial folder is removed" in result.stderr
    assert f"error: {failed} could not be written (on another rank)" in result.stderr
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint_000001"]
    assert verify_checkpoint(checkpoints / "checkpoint_000001") is None


NONFINITE_STEPS_HOOK = """
import dataclasses
import torch
import finetune.training.train_step as module

real, calls = module.train_step, []

def train_step(loss_model, optimizer, micro_batches, *args, **kwargs):
    calls.append(1)
    if len(calls) in STEPS:
        nan = torch.tensor(float("nan"))
        micro_batches = [dataclasses.replace(b, weights=torch.where(b.weights > 0, nan, 0.0)) for b in micro_batches]
    return real(loss_model, optimizer, micro_batches, *args, **kwargs)

module.train_step = train_step
"""


def nonfinite_steps(tmp_path: Path, steps: set[int]) -> Path:
    """A hook that makes the loss of these optimizer steps (counted from 1 in a fresh run) NaN on every rank: their
    trained tokens get NaN loss weights before train_step sees them."""
    return hook_folder(tmp_path / "hook", f"STEPS = {sorted(steps)}\n{NONFINITE_STEPS_HOOK}")


def test_nonfinite_steps_are_skipped_and_counted(write_config, tmp_path):
    config = write_config(max_steps=4, eval__enabled=False, checkpoint__freq=2, checkpoint__keep=3)
    result = train(config, hook=nonfinite_steps(tmp_path, {3, 4}))
    assert "step 3: the loss or the gradients are not finite, so the step is skipped (1 in a row" in result.stdout
    assert "2 steps skipped" in result.stdout
    run_dir, checkpoints = tmp_path / "run", tmp_path / "run" / "checkpoints"
    assert [r["skipped"] for r in records(run_dir, "train")] == [False, False, True, True]
    # standard JSON: a non-finite number is null, never a bare NaN that strict readers reject
    strict = [
        json.loads(line, parse_constant=pytest.fail) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert [(r["loss"], r["grad_norm"]) for r in strict if r["kind"] == "train"][2:] == [(None, None), (None, None)]
    # nothing moved: the weights and the optimizer state after step 4 are those after step 2
    for name in ("lora.safetensors", "state/tensors_rank_0.safetensors"):
        after_2, after_4 = (checkpoints / f"checkpoint_00000{step}" / name for step in (2, 4))
        assert after_2.read_bytes() == after_4.read_bytes(), name
    progress = json.loads((checkpoints / "checkpoint_000004/state/progress.json").read_text())
    assert progress["nonfinite_in_a_row"] == 2 and progress["nonfinite_skipped"] == 2


def test_weights_that_are_not_finite_are_never_saved(write_config, tmp_path, monkeypatch, capsys):
    """Weights that turned non-finite (here made NaN after step 3, as an infinite learning rate would) end the run
    with exit 5 at the next save, which writes nothing: the last good checkpoint stays the newest."""
    real, calls = step_module.train_step, []

    def train_step(loss_model, *args, **kwargs):
        sums = real(loss_model, *args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            with torch.no_grad():
                next(p for p in loss_model.parameters() if p.requires_grad)[0, 0] = float("nan")
        return sums

    monkeypatch.setattr(step_module, "train_step", train_step)  # what the run's StepRunner calls
    config = write_config(max_steps=6, eval__enabled=False, checkpoint__freq=2)
    assert train_script.run([str(config)]) == exit_codes.NOT_FINITE
    checkpoints = tmp_path / "run" / "checkpoints"
    assert (
        f"error: step 4: 1 of the LoRA weights are not finite, so no checkpoint is written: the newest, "
        f"{checkpoints / 'checkpoint_000002'}, is kept, and resume: auto continues from it"
    ) in capsys.readouterr().err
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint_000002"]
    assert verify_checkpoint(checkpoints / "checkpoint_000002") is None


def test_too_many_nonfinite_steps_in_a_row_stop_the_run(write_config, tmp_path):
    config = write_config(max_steps=8, eval__enabled=False, checkpoint__freq=2, optim__max_consecutive_nonfinite=3)
    result = train(config, expect=exit_codes.NOT_FINITE, hook=nonfinite_steps(tmp_path, {2, 3, 4}))
    assert (
        "error: step 4: the loss or the gradients were not finite in 3 steps in a row (steps 2 to 4; "
        "optim.max_consecutive_nonfinite is 3), so the run stops"
    ) in result.stderr
    assert "a lower optim.lr" in result.stderr and "tailor validate" in result.stderr
    checkpoint_2 = tmp_path / "run" / "checkpoints" / "checkpoint_000002"
    assert f"resume: auto continues from the newest checkpoint, {checkpoint_2}" in result.stderr
    assert sorted(p.name for p in checkpoint_2.parent.iterdir()) == ["checkpoint_000002"]  # none at the failing step


def test_a_used_run_dir_is_refused_without_resume(write_config, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 1.0}\n')
    result = train(write_config(), "resume=false", expect=2)
    assert (
        f"error: run_dir {run_dir} already holds a run (metrics.jsonl) and resume is false, so it is left as "
        "it is. To continue that run, set resume: auto (the default)"
    ) in result.stderr
    assert f"choose another run_dir (e.g. run_dir={run_dir}-2 on the command line)" in result.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == ["metrics.jsonl", "run.lock"]
    assert (run_dir / "metrics.jsonl").read_text() == '{"kind": "train", "step": 1, "loss": 1.0}\n'


# ---------------------------------------------------------------------------------------------------
# In process


def fake_checkpoint(save_checkpoint, step: int, with_state: bool = True) -> Path:
    """Training's own save of the tiny model under tmp_path/run, with the files of a training state (of the right
    shape, though holding no tensor: their values are read only as the state is loaded), or adapters only."""

    def write_state(folder: Path) -> None:
        (folder / "state").mkdir()
        progress = dict(
            world_size=1,
            step=step,
            tokens=0,
            trained_tokens=0,
            nonfinite_in_a_row=0,
            nonfinite_skipped=0,
            elapsed_s=0.0,
            loss_scale=0.0,
            loss_scale_good_steps=0,
        )
        (folder / "state" / "progress.json").write_text(json.dumps(progress))
        rank_state = {"data": {}, "rng": rng_state(torch.device("cpu"))}
        (folder / "state" / "rank_0.json").write_text(json.dumps(rank_state))
        save_tensors(folder / "state" / "tensors_rank_0.safetensors", {}, {"state": {}})

    return save_checkpoint(step, keep=10, write_state=write_state if with_state else None)


def test_manifest_catches_missing_resized_and_altered_files(save_checkpoint):
    folder = save_checkpoint(10, keep=1)
    assert verify_checkpoint(folder) is None
    manifest = json.loads((folder / "manifest.json").read_text())["files"]
    assert sorted(manifest) == ["lora.safetensors", "params.json", "tokenizer.model.v3"]

    params = (folder / "params.json").read_text()
    (folder / "params.json").write_text(params.replace("8", "9"))  # same size, other bytes
    assert verify_checkpoint(folder) == "params.json checksum mismatch"
    (folder / "params.json").write_text(params + " ")
    assert verify_checkpoint(folder).startswith("params.json has ")
    (folder / "params.json").unlink()
    assert verify_checkpoint(folder) == "params.json is missing"
    (folder / "manifest.json").unlink()
    assert verify_checkpoint(folder).startswith("no manifest.json")


def test_auto_resume_takes_the_newest_checkpoint_with_a_training_state(write_config, save_checkpoint, capsys):
    cfg = load_config(write_config())
    run_dir = Path(cfg.run_dir)
    fake_checkpoint(save_checkpoint, 4)
    fake_checkpoint(save_checkpoint, 8)
    fake_checkpoint(save_checkpoint, 12, with_state=False)  # e.g. adapters saved by an older tailor
    lines = [json.dumps({"kind": "train", "step": step}) for step in range(1, 14)]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + '\n{"kind": "tr')  # the last line cut short by a kill
    start = prepare_run_dir(cfg, CPU)
    assert (start.step, start.folder.name, start.world_size) == (8, "checkpoint_000008", 1)
    out = capsys.readouterr().out
    assert f"skipped {run_dir / 'checkpoints/checkpoint_000012'}: no training state (state/progress.json)" in out
    assert f"{run_dir / 'metrics.jsonl'}: dropped the 5 records after step 8" in out
    assert f"{run_dir / 'metrics.jsonl'}: dropped line 14, which is not a record tailor writes" in out
    assert (run_dir / "metrics.jsonl").read_text().splitlines() == lines[:8]


def test_auto_resume_without_a_checkpoint_starts_over_and_says_so(write_config, tmp_path, capsys):
    cfg = load_config(write_config())
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 1}) + "\n")
    assert prepare_run_dir(cfg, CPU) is None
    out = capsys.readouterr().out
    assert f"no intact checkpoint in {run_dir / 'checkpoints'}: starting from step 0" in out
    assert (run_dir / "metrics.jsonl").read_text() == ""


def test_an_explicit_checkpoint_must_be_intact_and_the_newest_of_its_run_dir(write_config, save_checkpoint, tmp_path):
    cfg = load_config(write_config())
    older, newer = fake_checkpoint(save_checkpoint, 4), fake_checkpoint(save_checkpoint, 8)
    cfg.resume = str(older)
    with pytest.raises(
        ResumeError,
        match="holds later checkpoints \\(checkpoint_000008\\): continuing there would "
        "mix two runs. Resume into another run_dir",
    ):
        prepare_run_dir(cfg, CPU)
    cfg.resume, cfg.run_dir = str(older), str(tmp_path / "branch")
    assert prepare_run_dir(cfg, CPU).folder == older  # a new run_dir may branch off any checkpoint
    adapters = (newer / "lora.safetensors").read_bytes()
    (newer / "lora.safetensors").write_bytes(adapters[:-1] + bytes([adapters[-1] ^ 1]))  # same size, other bytes
    cfg.resume = str(newer)
    with pytest.raises(ResumeError, match=re.escape(f"resume: {newer}: lora.safetensors checksum mismatch")):
        prepare_run_dir(cfg, CPU)


def test_resume_and_nonfinite_settings_in_the_config(write_config):
    raw = {"run_dir": "r", "model": {"path": "m"}, "data": {"train": "t.jsonl"}, "eval": {"enabled": False}}
    assert config_from_dict(raw).resume == "auto"
    assert config_from_dict(dict(raw, resume=False)).resume == "false"  # YAML's `resume: false` is a boolean
    assert config_from_dict(dict(raw, resume="runs/a/checkpoints/checkpoint_000100")).resume.endswith("000100")
    assert config_from_dict(raw).optim.max_consecutive_nonfinite == 5
    with pytest.raises(ConfigError, match="optim.max_consecutive_nonfinite must be >= 1, got 0"):
        config_from_dict(dict(raw, optim={"max_consecutive_nonfinite": 0}))


def test_running_out_of_gpu_memory_ends_in_advice_and_keeps_the_checkpoints(write_config, tmp_path):
    """A CUDA out-of-memory error at step 6 (raised by a stand-in train_step, as no GPU is here) after the checkpoint
    of step 4: exit 4 (exit_codes.OUT_OF_MEMORY), what to change, and the checkpoint is there to resume from."""
    hook = hook_folder(
        tmp_path / "hook",
        "import torch\nimport finetune.training.train_step as module\nreal, calls = module.train_step, []\n"
        "def train_step(*args, **kwargs):\n    calls.append(1)\n    if len(calls) == 6:\n"
        "        raise torch.OutOfMemoryError(\n"
        "            'CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.1 GiB total)')\n"
        "    return real(*args, **kwargs)\nmodule.train_step = train_step\n",
    )
    config = write_config(max_steps=8, eval__enabled=False, checkpoint__freq=4)
    result = train(config, expect=exit_codes.OUT_OF_MEMORY, hook=hook)
    assert "error: out of GPU memory: CUDA out of memory. Tried to allocate 20.00 GiB" in result.stderr
    assert "a lower seq_len" in result.stderr and "Traceback" not in result.stderr
    assert verify_checkpoint(tmp_path / "run/checkpoints/checkpoint_000004") is None
    resumed = train(config)
    assert f"resuming from {tmp_path / 'run/checkpoints/checkpoint_000004'}" in resumed.stdout
