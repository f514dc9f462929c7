"""Where a run starts: rank 0 chooses the checkpoint to continue from (or step 0) and trims metrics.jsonl to it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch.distributed as dist

from finetune.atomic_files import atomic_write_bytes
from finetune.checkpoints.base_model import check_base_model
from finetune.checkpoints.folders import (
    checkpoint_step,
    list_checkpoints,
    list_debris,
    list_linked_checkpoints,
    set_aside,
)
from finetune.config import TrainConfig
from finetune.training.checkpointing import NO_TRAINING_STATE, ResumeError, read_resume_point, why_not_resumable
from finetune.training.config_record import CONFIG_FILE, read_record
from finetune.training.distributed import DistInfo, is_initialized
from finetune.training.eval_generations import GENERATIONS_FILE
from finetune.training.monitoring import METRICS_FILE
from finetune.training.train_state import ResumePoint


def prepare_run_dir(cfg: TrainConfig, dist_info: DistInfo) -> ResumePoint | None:
    """Decide where this run starts (rank 0 decides and tells every rank) and make run_dir ready for it.

    `resume: false` refuses a run_dir that already holds a run. `auto` continues from the newest intact checkpoint,
    reporting each one it skips (a damaged one is renamed aside) and the leftovers of saves cut short, or starts at
    step 0 when there is none. A checkpoint folder continues from that one. metrics.jsonl (and eval_generations.jsonl)
    keep only the records up to the starting step, so each reads as one run.

    Returns:
        The checkpoint to resume from; None for a start at step 0.

    Raises:
        ResumeError: on every rank: resume: false with a run in run_dir, a named checkpoint that is damaged or has
            later ones beside it, or a checkpoint trained on another base model.
    """
    answer: ResumePoint | str | None = None
    if dist_info.is_main:
        try:
            answer = _choose_start(cfg)
            if answer is not None:
                _check_base_model(cfg, answer)
            Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
            for records in (METRICS_FILE, GENERATIONS_FILE):
                _cut_metrics(Path(cfg.run_dir) / records, answer.step if answer else 0)
        except ResumeError as error:
            answer = str(error)  # every rank raises it, rather than waiting for rank 0
    if is_initialized():
        box = [answer]
        dist.broadcast_object_list(box, src=0)
        answer = box[0]
    if isinstance(answer, str):
        raise ResumeError(answer)
    return answer


def _check_base_model(cfg: TrainConfig, start: ResumePoint) -> None:
    """The checkpoint's adapters go on training on the base they were trained on (finetune/checkpoints/base_model.py),
    checked before any data is tokenized or weight loaded."""
    recorded = read_record(start.folder.parent.parent / CONFIG_FILE) or {}
    model = recorded.get("model")
    trained_with = model.get("path") if isinstance(model, dict) and isinstance(model.get("path"), str) else None
    problem = check_base_model(start.folder, Path(cfg.model.path), trained_with, cfg.resume_other_base)
    if problem:
        raise ResumeError(problem)


def _choose_start(cfg: TrainConfig) -> ResumePoint | None:
    run_dir = Path(cfg.run_dir)
    if cfg.resume == "false":
        used = [name for name in (METRICS_FILE, "checkpoints") if (run_dir / name).exists()]
        if used:
            raise ResumeError(
                f"run_dir {run_dir} already holds a run ({' and '.join(used)}) and resume is false, so it is left "
                f"as it is. To continue that run, set resume: auto (the default) or resume: <a checkpoint folder>; "
                f"to start a new one, choose another run_dir (e.g. run_dir={run_dir}-2 on the command line)."
            )
        return None
    if cfg.resume != "auto":
        return _explicit_start(Path(cfg.resume), run_dir)
    for debris in list_debris(run_dir):
        print(f"skipped {debris}: a save or a deletion that was cut short; the next save removes it", flush=True)
    for link in list_linked_checkpoints(run_dir):
        print(
            f"skipped {link}: a symbolic link (to {os.readlink(link)}), not a checkpoint folder tailor wrote; tailor "
            "never uses, counts or deletes it (name it with resume: to continue from what it points to)",
            flush=True,
        )
    for folder in reversed(list_checkpoints(run_dir)):
        problem = why_not_resumable(folder)
        if problem is None:
            point = read_resume_point(folder)
            # in epochs, max_steps is known once the data is counted, after this (finetune/planning/epochs.py)
            total = f"of {cfg.max_steps}" if cfg.epochs is None else f"of a run of {cfg.epochs:g} epochs"
            print(f"resuming from {folder} (step {point.step} {total})", flush=True)
            return point
        if problem == NO_TRAINING_STATE:
            print(f"skipped {folder}: {problem}", flush=True)
        else:
            aside = set_aside(folder)
            print(
                f"skipped {folder}: {problem}; renamed to {aside.name}, which tailor never uses, counts or deletes",
                flush=True,
            )
    if (run_dir / METRICS_FILE).exists() or (run_dir / "checkpoints").exists():
        print(f"no intact checkpoint in {run_dir / 'checkpoints'}: starting from step 0", flush=True)
    return None


def _explicit_start(folder: Path, run_dir: Path) -> ResumePoint:
    problem = why_not_resumable(folder)
    if problem is not None:
        raise ResumeError(f"resume: {folder}: {problem}")
    point = read_resume_point(folder)
    later = [c for c in list_checkpoints(run_dir) if checkpoint_step(c) > point.step]
    if later:
        raise ResumeError(
            f"resume: {folder} is at step {point.step}, but {run_dir / 'checkpoints'} holds later checkpoints "
            f"({', '.join(c.name for c in later)}): continuing there would mix two runs. Resume into another "
            "run_dir (run_dir=... on the command line), or move those checkpoints away."
        )
    print(f"resuming from {folder} (step {point.step})", flush=True)
    return point


def _cut_metrics(path: Path, step: int) -> None:
    """Drop the records after `step` (and a line cut short by a kill), which this run writes anew."""
    if not path.exists():
        return
    lines = path.read_bytes().splitlines()
    steps = [_record_step(line) for line in lines]
    kept = [line for line, recorded in zip(lines, steps) if recorded is not None and recorded <= step]
    if len(kept) == len(lines):
        return
    atomic_write_bytes(path, b"".join(line + b"\n" for line in kept))
    later = sum(recorded is not None and recorded > step for recorded in steps)
    if later:
        print(f"{path}: dropped the {later} records after step {step}, which this run writes anew", flush=True)
    if damaged := [number for number, recorded in enumerate(steps, start=1) if recorded is None]:
        shown = ", ".join(map(str, damaged[:10])) + (" ..." if len(damaged) > 10 else "")
        which = f"lines {shown} ({len(damaged)}), which are" if len(damaged) > 1 else f"line {shown}, which is"
        print(f"{path}: dropped {which} not a record tailor writes (cut short by a kill, or damaged)", flush=True)


def _record_step(line: bytes) -> int | None:
    """The step of a metrics record, or None for a line that is not one (not UTF-8, not JSON, no integer step)."""
    try:
        recorded = json.loads(line.decode("utf-8"))["step"]
    except (ValueError, KeyError, TypeError, IndexError, RecursionError):
        return None
    return recorded if type(recorded) is int else None
