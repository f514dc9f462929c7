"""Checkpoints in run_dir/checkpoints/checkpoint_{step:06d}/, each written aside and renamed into place.

A checkpoint holds the adapters (lora.safetensors, params.json, the tokenizer file), or the merged model with
`save_adapters: false`, then `state/` for resume (finetune/training/checkpointing.py), and, written last,
`manifest.json`: the size and sha256 of every other file. Every rank writes its part into `checkpoint_X.tmp/`;
rank 0 then writes the manifest and renames the folder in one step (finetune/training/checkpointing.py's
`save_training_checkpoint` runs that across the ranks). A checkpoint folder therefore appears whole or
not at all: a run killed while writing leaves only a `.tmp` folder, which is never listed and is cleared by the next
save. The manifest (finetune/checkpoints/manifest.py) catches what renaming cannot: a file that a disk, a copy or
a hand damaged later.

Rotation keeps the newest `keep` *intact* checkpoints, the one just written always among them: each other one it
would keep is verified, and a damaged one is neither counted nor deleted but renamed aside to
`checkpoint_X.damaged`, with a message, for a person to look at; resume does the same with each damaged one it
skips. A checkpoint at a later step than the one just written (adapters only, left by a run with a higher max_steps,
which resume passed over) is neither counted nor deleted. An old intact one is renamed to `.old` before it is
deleted, so a run killed while deleting never leaves half a checkpoint under a complete name either.
A symbolic link under a checkpoint's name is no folder tailor wrote: it is never listed, used, counted or deleted.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch

from finetune import exit_codes
from finetune.atomic_files import fsync_path
from finetune.checkpoints.adapter import ADAPTER_FILE, lora_entry
from finetune.checkpoints.manifest import verify_checkpoint, write_manifest
from finetune.checkpoints.streaming import MERGED_WEIGHTS, TensorSpec, write_safetensors
from model.args import write_params
from model.settings import LoRAArgs
from model.weights import save_weights

CHECKPOINT_NAME = re.compile(r"checkpoint_(\d{6,})")
DEBRIS_NAME = re.compile(r"checkpoint_\d{6,}\.(tmp|old)")  # a write or a deletion cut short
DAMAGED_SUFFIX = ".damaged"
STATE = "state"  # the training state's folder in a checkpoint (finetune/training/checkpointing.py)
PROGRESS = "progress.json"


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (a full disk, most often); the message names it and what was kept."""

    exit_code = exit_codes.WRITE_FAILED


def checkpoint_path(run_dir: Path, step: int) -> Path:
    """The folder of the checkpoint of `step`: run_dir/checkpoints/checkpoint_{step:06d}."""
    return Path(run_dir) / "checkpoints" / f"checkpoint_{step:06d}"


def checkpoint_step(folder: Path) -> int:
    """The step a checkpoint folder's name holds."""
    return int(CHECKPOINT_NAME.fullmatch(Path(folder).name).group(1))


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint folders under their complete name, oldest first.

    `verify_checkpoint` says whether one is intact; a symbolic link is not one of them (`list_linked_checkpoints`).
    """
    found = [p for p in _named_checkpoints(run_dir) if p.is_dir() and not p.is_symlink()]
    return sorted(found, key=checkpoint_step)


def list_linked_checkpoints(run_dir: Path) -> list[Path]:
    """Symbolic links under a checkpoint's name: tailor writes none, so it never uses, counts or deletes one."""
    return sorted((p for p in _named_checkpoints(run_dir) if p.is_symlink()), key=checkpoint_step)


def _named_checkpoints(run_dir: Path) -> list[Path]:
    folder = Path(run_dir) / "checkpoints"
    return [p for p in folder.iterdir() if CHECKPOINT_NAME.fullmatch(p.name)] if folder.is_dir() else []


def has_training_state(folder: Path) -> bool:
    """Whether a checkpoint holds the training state a resume continues from (not adapters only)."""
    return (Path(folder) / STATE / PROGRESS).is_file()


def newest_with_training_state(run_dir: Path) -> Path | None:
    """The newest checkpoint a resume can continue from, as far as its files say (None if there is none).

    One of adapters only is not it, whatever its step.
    """
    return next((c for c in reversed(list_checkpoints(run_dir)) if has_training_state(c)), None)


def list_debris(run_dir: Path) -> list[Path]:
    """Leftovers of saves or deletions cut short: never used, removed by the next save."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.is_symlink() and DEBRIS_NAME.fullmatch(p.name))


# ---------------------------------------------------------------------------------------------------
# Writing


def remove_old_checkpoints(run_dir: Path, keep: int, written: Path) -> None:
    """Keep the newest `keep` intact checkpoints, `written` (just published) first among them.

    A damaged one is set aside, older intact ones are deleted. An intact one at a later step than `written` is left
    as it is and not counted: the run resumed before it, so it cannot resume from it (no training state: another
    run's adapters).
    """
    kept = 1
    for folder in reversed(list_checkpoints(run_dir)):
        if folder == written:
            continue
        later = checkpoint_step(folder) > checkpoint_step(written)
        if kept >= keep and not later:
            _delete(folder)
            continue
        problem = verify_checkpoint(folder)
        if problem is None:
            kept += not later
        else:
            aside = set_aside(folder)
            print(
                f"{folder}: {problem}; renamed to {aside.name}, which tailor never uses, counts or deletes", flush=True
            )


def set_aside(folder: Path) -> Path:
    """Rename a damaged checkpoint to `checkpoint_X.damaged` (or `.damaged2`, ...), and return the new path.

    It is never listed, chosen or counted again, and never deleted, so a person can look at what went wrong.
    """
    aside, number = folder.with_name(folder.name + DAMAGED_SUFFIX), 1
    while aside.exists():
        number += 1
        aside = folder.with_name(f"{folder.name}{DAMAGED_SUFFIX}{number}")
    os.replace(folder, aside)
    return aside


def staging_path(final: Path) -> Path:
    """Where the checkpoint `final` is written before it is published: `checkpoint_X.tmp`."""
    return final.with_name(final.name + ".tmp")


def stage_checkpoint(final: Path) -> Path:
    """The empty staging folder of `final`, once the leftovers of saves or deletions cut short are cleared."""
    _clear_debris(final.parent)
    staging = staging_path(final)
    staging.mkdir(parents=True)
    return staging


def publish_checkpoint(staging: Path, final: Path) -> Path:
    """Make every file durable, list it in the manifest (written last), and rename the folder into place."""
    write_manifest(staging)
    for folder in [staging, *(p for p in staging.rglob("*") if p.is_dir())]:
        fsync_path(folder)
    if final.is_symlink():  # not a folder tailor wrote: kept for a person to look at
        aside = set_aside(final)
        print(f"{final}: a symbolic link, not a checkpoint folder tailor wrote; renamed to {aside.name}", flush=True)
    elif final.exists():  # the same step saved again (e.g. a resumed run): the new one wins
        _delete(final)
    os.replace(staging, final)
    fsync_path(final.parent)
    return final


def _delete(folder: Path) -> None:
    doomed = folder.with_name(folder.name + ".old")
    os.replace(folder, doomed)
    shutil.rmtree(doomed)


def _clear_debris(folder: Path) -> None:
    if folder.is_dir():
        for path in folder.iterdir():
            if path.is_dir() and not path.is_symlink() and DEBRIS_NAME.fullmatch(path.name):
                shutil.rmtree(path)


# ---------------------------------------------------------------------------------------------------
# What a checkpoint holds


def write_adapters(
    folder: Path,
    lora_state: dict[str, torch.Tensor],
    params: dict,
    lora: LoRAArgs,
    tokenizer_file: Path,
    base_quantization: str = "none",
) -> None:
    """Write the adapters into `folder`: lora.safetensors, params.json with the `lora` entry, and the tokenizer.

    Args:
        params: the base's params.json, to which the `lora` entry (`lora_entry`) is added.
        base_quantization: how the base's frozen weights were stored in training, recorded in the entry.
    """
    save_weights({k: v.contiguous() for k, v in lora_state.items()}, folder / ADAPTER_FILE)
    write_params(folder, dict(params, lora=lora_entry(lora, base_quantization)))
    shutil.copyfile(tokenizer_file, folder / Path(tokenizer_file).name)


def write_merged(
    folder: Path,
    specs: dict[str, TensorSpec],
    tensors: Iterable[tuple[str, torch.Tensor]],
    params: dict,
    tokenizer_file: Path,
) -> None:
    """Write the merged model into `folder`: consolidated.safetensors, params.json without `lora`, the tokenizer.

    The weights stream in one at a time, each written as it comes, so a model that fits in memory only sharded is
    never whole in one process.

    Args:
        specs: name -> dtype and shape of every tensor, for the file's header.
    """
    write_safetensors(folder / MERGED_WEIGHTS, specs, tensors)
    write_params(folder, {k: v for k, v in params.items() if k != "lora"})
    shutil.copyfile(tokenizer_file, folder / Path(tokenizer_file).name)
