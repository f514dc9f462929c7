"""Checkpoints in run_dir/checkpoints/checkpoint_{step:06d}/, each written aside and renamed into place.

A checkpoint holds the adapters (lora.safetensors, params.json, the tokenizer file), or the merged model with
`save_adapters: false`, then `state/` for resume (finetune/checkpoints/training_state.py), and, written last,
`manifest.json`: the size and sha256 of every other file. Every rank writes its part into `checkpoint_X.tmp/`;
rank 0 then writes the manifest and renames the folder in one step. A checkpoint folder therefore appears whole or
not at all: a run killed while writing leaves only a `.tmp` folder, which is never listed and is cleared by the next
save. The manifest (finetune/checkpoints/manifest.py) catches what renaming cannot: a file that a disk, a copy or
a hand damaged later.

Rotation keeps the newest `keep` *intact* checkpoints: each one it would keep is verified (the one just written
is known whole), and a damaged one is neither counted nor deleted but renamed aside to `checkpoint_X.damaged`, with
a message, for a person to look at; resume does the same with each damaged one it skips. An old intact one is
renamed to `.old` before it is deleted, so a run killed while deleting never leaves half a checkpoint under a
complete name either.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file

from finetune.checkpoints.adapter import ADAPTER_FILE, lora_entry
from finetune.checkpoints.manifest import verify_checkpoint, write_manifest
from finetune.checkpoints.streaming import MERGED_WEIGHTS, TensorSpec, write_safetensors
from finetune.data.tokenize import find_tokenizer_file
from finetune.training.distributed import all_reduce_sum, barrier
from finetune.training.parallel import full_state
from model.args import write_params
from model.lora import LoRAArgs, lora_state_dict, merged_state_dict

CHECKPOINT_NAME = re.compile(r"checkpoint_(\d{6,})")
DEBRIS_NAME = re.compile(r"checkpoint_\d{6,}\.(tmp|old)")  # a write or a deletion cut short
DAMAGED_SUFFIX = ".damaged"


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (a full disk, most often); the message names it and what was kept."""


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"checkpoint_{step:06d}"


def checkpoint_step(folder: Path) -> int:
    return int(CHECKPOINT_NAME.fullmatch(Path(folder).name).group(1))


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints under their complete name, oldest first (verify_checkpoint says whether one is intact)."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and CHECKPOINT_NAME.fullmatch(p.name)]
    return sorted(found, key=checkpoint_step)


def list_debris(run_dir: Path) -> list[Path]:
    """Leftovers of saves or deletions cut short: never used, removed by the next save."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and DEBRIS_NAME.fullmatch(p.name))


# ---------------------------------------------------------------------------------------------------
# Writing


def remove_old_checkpoints(run_dir: Path, keep: int, written: Path) -> None:
    """Keep the newest `keep` intact checkpoints (`written`, just published, is one): a damaged one is set aside,
    older intact ones are deleted."""
    kept = 0
    for folder in reversed(list_checkpoints(run_dir)):
        if kept == keep:
            _delete(folder)
            continue
        problem = None if folder == written else verify_checkpoint(folder)
        if problem is None:
            kept += 1
        else:
            aside = set_aside(folder)
            print(
                f"{folder}: {problem}; renamed to {aside.name}, which tailor never uses, counts or deletes", flush=True
            )


def set_aside(folder: Path) -> Path:
    """Rename a damaged checkpoint to `checkpoint_X.damaged` (or `.damaged2`, ...): it is never listed, chosen or
    counted again, and never deleted, so a person can look at what went wrong."""
    aside, number = folder.with_name(folder.name + DAMAGED_SUFFIX), 1
    while aside.exists():
        number += 1
        aside = folder.with_name(f"{folder.name}{DAMAGED_SUFFIX}{number}")
    os.replace(folder, aside)
    return aside


def _stage(final: Path) -> Path:
    _clear_debris(final.parent)
    staging = final.with_name(final.name + ".tmp")
    staging.mkdir(parents=True)
    return staging


def _publish(staging: Path, final: Path) -> Path:
    """Make every file durable, list it in the manifest (written last), and rename the folder into place."""
    write_manifest(staging)
    for folder in [staging, *(p for p in staging.rglob("*") if p.is_dir())]:
        _fsync_folder(folder)
    if final.exists():  # the same step saved again (e.g. a resumed run): the new one wins
        _delete(final)
    os.replace(staging, final)
    _fsync_folder(final.parent)
    return final


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _delete(folder: Path) -> None:
    doomed = folder.with_name(folder.name + ".old")
    os.replace(folder, doomed)
    shutil.rmtree(doomed)


def _clear_debris(folder: Path) -> None:
    if folder.is_dir():
        for path in folder.iterdir():
            if path.is_dir() and DEBRIS_NAME.fullmatch(path.name):
                shutil.rmtree(path)


# ---------------------------------------------------------------------------------------------------
# What a checkpoint holds


def _write_adapters(
    folder: Path,
    lora_state: dict[str, torch.Tensor],
    params: dict,
    lora: LoRAArgs,
    tokenizer_file: Path,
    base_quantization: str = "none",
) -> None:
    """lora.safetensors, params.json with the `lora` entry (`lora_entry`), and the tokenizer."""
    save_file({k: v.contiguous() for k, v in lora_state.items()}, folder / ADAPTER_FILE)
    write_params(folder, dict(params, lora=lora_entry(lora, base_quantization)))
    shutil.copy2(tokenizer_file, folder / Path(tokenizer_file).name)


def _write_merged(
    folder: Path,
    specs: dict[str, TensorSpec],
    tensors: Iterable[tuple[str, torch.Tensor]],
    params: dict,
    tokenizer_file: Path,
) -> None:
    """The weights stream in one at a time, each written as it comes (`specs`: name -> dtype and shape, for the
    file's header), so a model that fits in memory only sharded is never whole in one process."""
    write_safetensors(folder / MERGED_WEIGHTS, specs, tensors)
    write_params(folder, {k: v for k, v in params.items() if k != "lora"})
    shutil.copy2(tokenizer_file, folder / Path(tokenizer_file).name)


def save_training_checkpoint(cfg, model, step: int, is_main: bool, write_state: Callable[[Path], None]) -> Path:
    """A collective: every rank gathers the adapters to rank 0, which writes them (or the merged model when
    `checkpoint.save_adapters` is false), and calls `write_state(folder)` to write its part of the training state;
    then rank 0 writes the manifest, renames the folder into place and removes the oldest checkpoints. A write that
    fails on any rank (a full disk) makes every rank raise CheckpointWriteError, rather than wait for the others,
    and the partial folder is removed; the older checkpoints stay."""
    run_dir = Path(cfg.run_dir)
    final = checkpoint_path(run_dir, step)
    staging = _stage(final) if is_main else final.with_name(final.name + ".tmp")
    barrier()  # the folder exists, and no debris is being cleared, before any rank writes into it
    device = next(model.parameters()).device  # where the ranks agree (NCCL reduces on the GPU)
    try:
        _write_parts(cfg, model, staging, is_main)
        write_state(staging)
        failure = None
    except OSError as error:
        failure = error
    _raise_if_any_failed(failure, final, staging, is_main, device)  # every rank's files are written, or all raise
    try:
        if is_main:
            _publish(staging, final)
    except OSError as error:
        failure = error
    _raise_if_any_failed(failure, final, staging, is_main, device)
    if is_main:
        remove_old_checkpoints(run_dir, cfg.checkpoint.keep, final)
    return final


def _raise_if_any_failed(
    failure: OSError | None, final: Path, staging: Path, is_main: bool, device: torch.device
) -> None:
    """A collective: whether a write failed on any rank; if so, rank 0 removes the partial folder and all raise."""
    if all_reduce_sum(torch.tensor([float(failure is not None)], device=device)).item() == 0:
        return
    if is_main:
        shutil.rmtree(staging, ignore_errors=True)
    what = f"{failure.strerror or failure}: {failure.filename or staging}" if failure else "on another rank"
    raise CheckpointWriteError(
        f"{final} could not be written ({what}): the partial folder is removed, and the checkpoints saved before "
        "are kept. Free some space (or lower checkpoint.keep), then run the same command: resume: auto continues "
        "from the newest checkpoint."
    )


def _write_parts(cfg, model, staging: Path, is_main: bool) -> None:
    """The adapters (or the merged model) and the tokenizer, gathered from every rank and written by rank 0."""
    params = model.args.to_dict()
    tokenizer_file = find_tokenizer_file(cfg.model.path)
    if cfg.checkpoint.save_adapters:
        state = full_state(lora_state_dict(model))
        if is_main:
            _write_adapters(staging, state, params, cfg.lora, tokenizer_file, cfg.model.quantize)
    else:
        merged = merged_state_dict(model)  # sharded as the model is
        # Each weight is gathered by every rank in turn (a collective) and written by rank 0 before the next one.
        gathered = (item for name, t in merged.items() for item in full_state({name: t}).items())
        if is_main:
            # a DTensor's shape is the global one
            specs = {name: TensorSpec(t.dtype, tuple(t.shape)) for name, t in merged.items()}
            _write_merged(staging, specs, gathered, params, tokenizer_file)
        else:
            for _ in gathered:
                pass
