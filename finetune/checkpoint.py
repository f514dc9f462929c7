"""Checkpoints in run_dir/checkpoints/checkpoint_{step:06d}/, each written aside and renamed into place.

A checkpoint folder therefore appears whole or not at all: a run killed while writing leaves only a
`.tmp` folder, which is never listed and is cleared by the next save. Only the newest `keep` are kept; an old
one is renamed to `.old` before it is deleted, so a run killed while deleting never leaves half a checkpoint
under a complete name either.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file

from finetune.data.tokenize import find_tokenizer_file
from finetune.merge import ADAPTER_FILE, MERGED_WEIGHTS, TensorSpec, write_safetensors
from finetune.parallel import full_state
from model.lora import lora_state_dict, merged_state_dict

CHECKPOINT_NAME = re.compile(r"checkpoint_(\d{6,})")
DEBRIS_NAME = re.compile(r"checkpoint_\d{6,}\.(tmp|old)")  # a write or a deletion cut short


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"checkpoint_{step:06d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and CHECKPOINT_NAME.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_NAME.fullmatch(p.name).group(1)))


def write_atomically(final: Path, write: Callable[[Path], None]) -> Path:
    """Run `write(tmp_folder)`, then rename the folder to `final` in one step."""
    _clear_debris(final.parent)
    tmp = final.with_name(final.name + ".tmp")
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        for file in tmp.iterdir():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():  # the same step saved again (e.g. a resumed run): the new one wins
        _delete(final)
    os.replace(tmp, final)
    return final


def remove_old_checkpoints(run_dir: Path, keep: int) -> None:
    for old in list_checkpoints(run_dir)[:-keep]:
        _delete(old)


def _delete(folder: Path) -> None:
    doomed = folder.with_name(folder.name + ".old")
    os.replace(folder, doomed)
    shutil.rmtree(doomed)


def _clear_debris(folder: Path) -> None:
    if folder.is_dir():
        for path in folder.iterdir():
            if path.is_dir() and DEBRIS_NAME.fullmatch(path.name):
                shutil.rmtree(path)


def save_adapter_checkpoint(run_dir: Path, step: int, lora_state: dict[str, torch.Tensor], params: dict,
                            lora_settings: dict, tokenizer_file: Path, keep: int) -> Path:
    """lora.safetensors, params.json with a `lora` entry (rank, alpha, scaling = alpha / rank, dropout,
    targets: mistral-inference reads rank and scaling), and the tokenizer. Call on one rank only."""
    lora = dict(lora_settings, scaling=lora_settings["alpha"] / lora_settings["rank"])

    def write(folder: Path) -> None:
        save_file({k: v.contiguous() for k, v in lora_state.items()}, folder / ADAPTER_FILE)
        _write_params(folder, dict(params, lora=lora))
        shutil.copy2(tokenizer_file, folder / Path(tokenizer_file).name)

    path = write_atomically(checkpoint_path(run_dir, step), write)
    remove_old_checkpoints(run_dir, keep)
    return path


def save_merged_checkpoint(run_dir: Path, step: int, specs: dict[str, TensorSpec],
                           tensors: Iterable[tuple[str, torch.Tensor]], params: dict, tokenizer_file: Path,
                           keep: int) -> Path:
    """A full model folder (consolidated.safetensors, params.json without LoRA, tokenizer): `save_adapters: false`.

    The weights stream in one at a time, each written as it comes (`specs`: name -> dtype and shape, for the
    file's header), so a model that fits in memory only sharded is never whole in one process."""

    def write(folder: Path) -> None:
        write_safetensors(folder / MERGED_WEIGHTS, specs, tensors)
        _write_params(folder, {k: v for k, v in params.items() if k != "lora"})
        shutil.copy2(tokenizer_file, folder / Path(tokenizer_file).name)

    path = write_atomically(checkpoint_path(run_dir, step), write)
    remove_old_checkpoints(run_dir, keep)
    return path


def _write_params(folder: Path, params: dict) -> None:
    (folder / "params.json").write_text(json.dumps(params, indent=2) + "\n", encoding="utf-8")


def save_training_checkpoint(cfg, model, step: int, is_main: bool) -> Path | None:
    """Gather the adapters from every rank (a collective) and let rank 0 write them, or the merged model
    when `checkpoint.save_adapters` is false. Returns the folder on rank 0."""
    params = model.args.to_dict()
    tokenizer_file = find_tokenizer_file(cfg.model.path)
    run_dir, keep = Path(cfg.run_dir), cfg.checkpoint.keep
    if cfg.checkpoint.save_adapters:
        state = full_state(lora_state_dict(model))
        if not is_main:
            return None
        settings = dict(rank=cfg.lora.rank, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout, targets=list(cfg.lora.targets))
        return save_adapter_checkpoint(run_dir, step, state, params, settings, tokenizer_file, keep)
    merged = merged_state_dict(model)  # sharded as the model is
    # Each weight is gathered by every rank in turn (a collective) and written by rank 0 before the next one.
    gathered = (item for name, t in merged.items() for item in full_state({name: t}).items())
    if not is_main:
        for _ in gathered:
            pass
        return None
    specs = {name: TensorSpec(t.dtype, tuple(t.shape)) for name, t in merged.items()}  # a DTensor's shape is global
    return save_merged_checkpoint(run_dir, step, specs, gathered, params, tokenizer_file, keep)
