"""run_dir/config.yaml: the settings the run's checkpoints were trained with, written once a run is accepted.

A run refused (a bad config, a checkpoint that does not fit) leaves the record as it was. A resume with other
settings keeps the earlier record as config.step_N.yaml (N: the step it resumes from) and says what changed; when
the change re-plans the learning rate schedule, it says so with the learning rate of the next step, before and
after, since the steps trained so far followed the old plan.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from finetune.atomic_files import atomic_path
from finetune.config import ConfigError, TrainConfig, config_from_dict, config_to_dict, load_yaml, save_config
from finetune.training.optim import lr_at_step

if TYPE_CHECKING:
    from finetune.training.train_state import ResumePoint

CONFIG_FILE = "config.yaml"
SCHEDULE_KEYS = ("max_steps", "optim.lr", "optim.min_lr", "optim.warmup_steps", "optim.warmup_fraction")
WHERE_KEYS = ("run_dir", "resume")  # where a run is and starts, not how it trains: no change worth a word


def record_config(cfg: TrainConfig, start: ResumePoint | None) -> None:
    """Write the accepted run's config.yaml; on a change of settings, keep the earlier one and say what changed.

    Args:
        start: the checkpoint the run resumes from, whose run's record the settings are compared with; None: a
            fresh start, compared with run_dir's own record.
    """
    path = Path(cfg.run_dir) / CONFIG_FILE
    trained_with = start.folder.parent.parent / CONFIG_FILE if start else path  # resume: PATH may be another run's
    previous = read_record(trained_with)
    as_written = yaml.safe_load(yaml.safe_dump(config_to_dict(cfg)))  # compared as YAML reads it: lists, not tuples
    changes = [] if previous is None else setting_changes(previous, as_written)
    if changes:
        print(f"settings changed from {trained_with}: {'; '.join(changes)}", flush=True)
    if start and any(change.split(" ")[0] in SCHEDULE_KEYS for change in changes):
        _say_replanned(previous, cfg, start.step + 1)
    if path.exists() and (changes or previous is None):
        kept = _free_name(path.with_name(f"config.step_{start.step if start else 0:06d}.yaml"))
        os.replace(path, kept)
        print(f"the earlier settings are kept in {kept}", flush=True)
    with atomic_path(path) as staging:
        save_config(cfg, staging)


def read_record(path: Path) -> dict | None:
    """The recorded settings, or None when there is no readable record (a FIFO is none: reading it would block)."""
    if not path.is_file():
        return None
    try:
        recorded = load_yaml(path.read_text(encoding="utf-8"), str(path))
    except (OSError, ValueError, yaml.YAMLError, RecursionError):
        return None
    return recorded if isinstance(recorded, dict) else None


def setting_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """`key old -> new` for each setting that differs, in dotted keys."""
    changes = []
    for key in dict.fromkeys([*old, *new]):
        before, after, name = old.get(key), new.get(key), prefix + str(key)
        if isinstance(before, dict) and isinstance(after, dict):
            changes += setting_changes(before, after, name + ".")
        elif before != after and name not in WHERE_KEYS:
            changes.append(f"{name} {before} -> {after}")
    return changes


def _say_replanned(previous: dict, cfg: TrainConfig, step: int) -> None:
    new_lr = lr_at_step(step, cfg.optim, cfg.max_steps)
    try:
        old = config_from_dict(previous)
    except ConfigError:
        print(f"the learning rate schedule is re-planned: step {step} trains at {new_lr:.2e}", flush=True)
        return
    old_lr = lr_at_step(step, old.optim, old.max_steps)
    print(
        f"the learning rate schedule is re-planned from step {step}: its learning rate is {new_lr:.2e}, where the "
        f"earlier plan had {old_lr:.2e} (warmup and cosine decay now run to max_steps {cfg.max_steps})",
        flush=True,
    )


def _free_name(path: Path) -> Path:
    candidate, number = path, 1
    while candidate.exists():
        number += 1
        candidate = path.with_name(f"{path.stem}.{number}{path.suffix}")
    return candidate
