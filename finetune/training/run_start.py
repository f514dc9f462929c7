"""Where a run starts: rank 0 chooses the checkpoint to continue from (or step 0) and trims metrics.jsonl to it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch.distributed as dist

from finetune.checkpoints.folders import checkpoint_step, list_checkpoints, list_debris, set_aside
from finetune.checkpoints.training_state import (
    NO_TRAINING_STATE,
    ResumeError,
    ResumePoint,
    read_resume_point,
    why_not_resumable,
)
from finetune.config import TrainConfig
from finetune.training.distributed import DistInfo, is_initialized
from finetune.training.monitoring import METRICS_FILE


def prepare_run_dir(cfg: TrainConfig, dist_info: DistInfo) -> ResumePoint | None:
    """Decide where this run starts (rank 0 decides and tells every rank) and make run_dir ready for it.

    `resume: false` refuses a run_dir that already holds a run. `auto` continues from the newest intact checkpoint,
    reporting each one it skips (a damaged one is renamed aside) and the leftovers of saves cut short, or starts at
    step 0 when there is none. A checkpoint folder continues from that one. metrics.jsonl keeps only the records up
    to the starting step, so it reads as one run. Returns None for a start at step 0.
    """
    answer: ResumePoint | str | None = None
    if dist_info.is_main:
        try:
            answer = _choose_start(cfg)
            Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
            _cut_metrics(Path(cfg.run_dir) / METRICS_FILE, answer.step if answer else 0)
        except ResumeError as error:
            answer = str(error)  # every rank raises it, rather than waiting for rank 0
    if is_initialized():
        box = [answer]
        dist.broadcast_object_list(box, src=0)
        answer = box[0]
    if isinstance(answer, str):
        raise ResumeError(answer)
    return answer


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
    for folder in reversed(list_checkpoints(run_dir)):
        problem = why_not_resumable(folder)
        if problem is None:
            point = read_resume_point(folder)
            print(f"resuming from {folder} (step {point.step} of {cfg.max_steps})", flush=True)
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
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if (recorded := _record_step(line)) is not None and recorded <= step]
    if len(kept) == len(lines):
        return
    staging = path.with_name(path.name + ".tmp")
    staging.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(staging, path)
    print(
        f"{path}: dropped the {len(lines) - len(kept)} records after step {step}, which this run writes anew",
        flush=True,
    )


def _record_step(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError, RecursionError):
        return None
