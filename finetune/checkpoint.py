"""Checkpoints in run_dir/checkpoints/checkpoint_{step:06d}/, each written aside and renamed into place.

A checkpoint folder therefore appears whole or not at all: a run killed while writing leaves only a
`.tmp` folder, which is never listed and is cleared by the next save. Only the newest `keep` are kept.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

CHECKPOINT_NAME = re.compile(r"checkpoint_(\d{6,})")
ADAPTER_FILE = "lora.safetensors"


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
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
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
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def remove_old_checkpoints(run_dir: Path, keep: int) -> None:
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old)


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


def save_merged_checkpoint(run_dir: Path, step: int, state: dict[str, torch.Tensor], params: dict,
                           tokenizer_file: Path, keep: int) -> Path:
    """A full model folder (consolidated.safetensors, params.json without LoRA, tokenizer): `save_adapters: false`."""

    def write(folder: Path) -> None:
        save_file({k: v.contiguous() for k, v in state.items()}, folder / "consolidated.safetensors")
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
    from finetune.data.tokenize import find_tokenizer_file
    from finetune.parallel import full_state
    from model.lora import lora_state_dict, merged_state_dict

    params = model.args.to_dict()
    tokenizer_file = find_tokenizer_file(cfg.model.path)
    run_dir, keep = Path(cfg.run_dir), cfg.checkpoint.keep
    if cfg.checkpoint.save_adapters:
        state = full_state(lora_state_dict(model))
        if not is_main:
            return None
        settings = dict(rank=cfg.lora.rank, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout, targets=list(cfg.lora.targets))
        return save_adapter_checkpoint(run_dir, step, state, params, settings, tokenizer_file, keep)
    state = full_state(merged_state_dict(model))
    if not is_main:
        return None
    return save_merged_checkpoint(run_dir, step, state, params, tokenizer_file, keep)
