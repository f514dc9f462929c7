"""A resumable checkpoint: what it consists of, saved by every rank together and loaded.

What a checkpoint folder is (its name, staging, publishing, manifest, rotation, adapter files) is
finetune/checkpoints/'s; this module adds what only the run knows: its collectives and random state. Beside the
adapters, each checkpoint has a state/ folder with what they alone do not hold:

    state/tensors_rank_R.safetensors      the LoRA weights and their AdamW state, sharded as the ranks hold them
                                          (finetune/checkpoints/tensor_state.py: no rank gathers them; any number
                                          of ranks can load them)
    state/progress.json                   the step, the counters (tokens, non-finite steps), time spent, world size
    state/rank_R.json                     rank R's data position and random generator states
    state/base_model.json                 the base model's path and identity (finetune/checkpoints/base_model.py)

The learning rate is a pure function of the step and AdamW's settings come from the config, so neither is saved.
With the same number of ranks, a resumed run computes bit for bit what the uninterrupted run would have. With
another number, the weights and optimizer state are resharded, but a rank's data position has no counterpart
there: the data starts a new order, seeded by (seed, step), and so do the random generators.

Reading a checkpoint runs no code, whatever its bytes: the state is safetensors and JSON, nothing is unpickled.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from finetune import exit_codes
from finetune.atomic_files import atomic_write
from finetune.checkpoints.base_model import base_record_problem, write_base_record
from finetune.checkpoints.folders import (
    PROGRESS,
    STATE,
    CheckpointWriteError,
    checkpoint_path,
    has_training_state,
    newest_with_training_state,
    publish_checkpoint,
    remove_old_checkpoints,
    stage_checkpoint,
    staging_path,
    write_adapters,
    write_merged,
)
from finetune.checkpoints.manifest import verify_checkpoint
from finetune.checkpoints.streaming import TensorSpec
from finetune.checkpoints.tensor_state import (
    TensorStateError,
    load_tensors,
    save_tensors,
    tensors_file,
    tensors_file_problem,
)
from finetune.config import TrainConfig
from finetune.data.errors import DataError
from finetune.data.model_tokenizer import find_tokenizer_file
from finetune.training.distributed import DistInfo, all_reduce_sum, barrier
from finetune.training.parallel import full_state
from finetune.training.rng import derived_seed, rng_state, rng_state_problem, seed_rngs, set_rng_state
from finetune.training.train_state import Progress, ResumePoint, TrainState
from finetune.training.train_step import NonFiniteError
from model.dtensor import is_dtensor
from model.lora import lora_state_dict, merged_state_dict

if TYPE_CHECKING:
    from finetune.data.loader import TrainLoader
    from finetune.training.loss_scale import DynamicLossScale

NO_TRAINING_STATE = f"no training state ({STATE}/{PROGRESS}): adapters only"  # not damaged, but not resumable


class ResumeError(ValueError):
    """The run cannot start where the config says; the message names the folder and the ways out."""

    exit_code = exit_codes.USAGE


def why_not_resumable(folder: Path) -> str | None:
    """Say why a checkpoint folder cannot be resumed from: damaged, adapters only, or a state file unreadable.

    Returns:
        None for an intact checkpoint with a training state; else what is wrong with it, in words.
    """
    folder = Path(folder)
    problem = verify_checkpoint(folder)
    if problem is not None:
        return problem
    if not has_training_state(folder):
        return NO_TRAINING_STATE
    problem = _progress_problem(folder / STATE / PROGRESS) or base_record_problem(folder)
    if problem is not None:
        return problem
    world_size = json.loads((folder / STATE / PROGRESS).read_text(encoding="utf-8"))["world_size"]
    for rank in range(world_size):
        for name in (tensors_file(rank), f"rank_{rank}.json"):
            if not (folder / STATE / name).is_file():
                return f"{STATE}/{name} is missing, though {world_size} ranks saved this state"
    for rank in range(world_size):
        problem = _rank_state_problem(folder / STATE / f"rank_{rank}.json") or tensors_file_problem(
            folder / STATE / tensors_file(rank)
        )
        if problem is not None:
            return problem.replace(str(folder / STATE), STATE)
    return None


def _read_state_json(path: Path) -> tuple[object, str | None]:
    """A state file's JSON value, or why it cannot be read: damage, never an exception (deep nesting included)."""
    try:
        return json.loads(path.read_text(encoding="utf-8")), None
    except (OSError, ValueError, RecursionError) as error:
        return None, f"{STATE}/{path.name} is unreadable ({type(error).__name__})"


def _rank_state_problem(path: Path) -> str | None:
    """The shape of a rank's data position and random state; their values are checked as they are loaded."""
    where = f"{STATE}/{path.name}"
    saved, problem = _read_state_json(path)
    if problem:
        return problem
    if not (
        isinstance(saved, dict)
        and set(saved) == {"data", "rng"}
        and isinstance(saved["data"], dict)
        and isinstance(saved["rng"], dict)
        and {"torch", "numpy", "python"} <= set(saved["rng"])
    ):
        return f"{where} is not a data position and random state that tailor writes"
    problem = rng_state_problem(saved["rng"])
    return f"{where} holds no random state that can be restored ({problem})" if problem else None


def read_resume_point(folder: Path) -> ResumePoint:
    """Where a checkpoint resumes from: its folder, step and the world size that saved it.

    Raises:
        ResumeError: state/progress.json is missing, unreadable or has a field wrong, naming the folder and field.
    """
    saved = _read_progress_file(Path(folder))
    return ResumePoint(Path(folder), saved["step"], saved["world_size"])


def read_progress(folder: Path) -> Progress:
    """A checkpoint's counters (step, tokens, non-finite steps, time spent, fp16's loss scale).

    Raises:
        ResumeError: state/progress.json is missing, unreadable or has a field wrong, naming the folder and field.
    """
    saved = _read_progress_file(Path(folder))
    return Progress(**{k: v for k, v in saved.items() if k != "world_size"})


def _read_progress_file(folder: Path) -> dict:
    """state/progress.json, checked field by field: a ResumeError names the file and the field."""
    path = folder / STATE / PROGRESS
    problem = _progress_problem(path)
    if problem:
        raise ResumeError(f"{folder}: {problem}")
    return json.loads(path.read_text(encoding="utf-8"))


def _progress_problem(path: Path) -> str | None:
    where = f"{STATE}/{PROGRESS}"
    saved, problem = _read_state_json(path)
    if problem:
        return problem
    if not isinstance(saved, dict):
        return f"{where} is not a JSON object"
    fields = {"world_size": int, **{name: type(value) for name, value in asdict(Progress()).items()}}
    for name, kind in fields.items():
        value = saved.get(name)
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if name not in saved or not numeric or (kind is int and not isinstance(value, int)):
            return f"{where} has no {kind.__name__} {name!r}"
        if not math.isfinite(value) or value < (1 if name == "world_size" else 0):
            return f"{where} has {name} {value}, which no run reaches"
    if set(saved) != set(fields):
        return f"{where} has fields tailor does not write: {', '.join(sorted(set(saved) - set(fields)))}"
    return None


@dataclass
class Checkpointer:
    """What a run saves at each checkpoint and loads to resume, on this rank.

    That is the adapters, AdamW's state, the data loader's position and the random generators. Saving and resuming
    are both collectives: every rank calls them together.
    """

    cfg: TrainConfig
    loss_model: nn.Module
    optimizer: torch.optim.Optimizer
    loader: TrainLoader
    dist_info: DistInfo

    def save(self, progress: Progress, loss_scale: DynamicLossScale | None = None) -> Path:
        """Save the checkpoint of step `progress.step`: the adapters and the training state.

        Weights that are not finite are never written, and the last good checkpoint stays the newest.

        Args:
            loss_scale: fp16's dynamic loss scale, whose state goes into progress.json; None in bf16 and fp32.

        Returns:
            The published checkpoint folder.

        Raises:
            NonFiniteError: some LoRA weight is not finite on some rank.
            CheckpointWriteError: a write failed on some rank (a full disk); the partial folder is removed.
        """
        cfg, dist_info = self.cfg, self.dist_info
        _raise_if_not_finite(self.loss_model, progress.step, Path(cfg.run_dir))
        if loss_scale is not None:
            progress = replace(progress, **loss_scale.state())

        def write_state(folder: Path) -> None:
            save_training_state(folder / STATE, self.loss_model, self.optimizer, self.loader, progress, dist_info)
            if dist_info.is_main:
                write_base_record(folder / STATE, cfg.model.path)

        return save_training_checkpoint(cfg, self.loss_model.model, progress.step, dist_info.is_main, write_state)

    def resume(self, start: ResumePoint) -> Progress:
        """Load a checkpoint's state into the freshly built model, optimizer and data loader.

        With another world size than the one that saved it, the weights and optimizer state are resharded, and the
        data order and random generators start anew from (seed, step).

        Returns:
            The checkpoint's counters, to continue from.

        Raises:
            ResumeError: a state file is damaged, or the data no longer has the saved position, naming the file.
        """
        dist_info = self.dist_info
        folder = start.folder / STATE
        model_state, optim_state = _state_dicts(self.loss_model, self.optimizer)
        try:
            load_tensors([folder / tensors_file(rank) for rank in range(start.world_size)], model_state, optim_state)
        except TensorStateError as error:
            raise ResumeError(f"{start.folder}: {error}") from None
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(
            self.loss_model,
            self.optimizer,
            model_state_dict=model_state,
            optim_state_dict=optim_state,
            options=_state_dict_options(),
        )
        progress = read_progress(start.folder)
        if start.world_size == dist_info.world_size:
            path = folder / f"rank_{dist_info.rank}.json"
            try:
                mine = json.loads(path.read_text(encoding="utf-8"))
                self.loader.load_state_dict(mine["data"])
                set_rng_state(mine["rng"], dist_info.device)
            except DataError as error:  # a position the data as it is now does not have: the data changed
                raise ResumeError(f"{start.folder}: {error}") from None
            except (ValueError, KeyError, TypeError, IndexError, OverflowError, RuntimeError) as error:
                raise ResumeError(
                    f"{path}: not a data position and random state that tailor writes ({type(error).__name__}: {error})"
                ) from None
        else:
            seed_rngs(derived_seed(self.cfg.seed, start.step, dist_info.rank))
            if dist_info.is_main:
                print(
                    f"{start.folder} was saved by {start.world_size} ranks and this run has {dist_info.world_size}: "
                    "the weights and optimizer state are resharded, but the data goes on in a new order and the "
                    f"random generators are seeded anew (from seed and step {start.step}): not the exact continuation "
                    "that the same number of ranks gives",
                    flush=True,
                )
        return progress


def _raise_if_not_finite(loss_model, step: int, run_dir: Path) -> None:
    """Count the non-finite values of the trained weights over every rank's shards (a collective)."""
    shards = [p.to_local() if is_dtensor(p) else p for p in loss_model.parameters() if p.requires_grad]
    bad = all_reduce_sum(torch.stack([(~torch.isfinite(t.detach())).sum() for t in shards]).sum()).item()
    if bad:
        newest = newest_with_training_state(run_dir)
        raise NonFiniteError(
            f"step {step}: {bad} of the LoRA weights are not finite, so no checkpoint is written: "
            + (f"the newest, {newest}, is kept, and resume: auto continues from it" if newest else "none was saved")
            + ". Things to try: a lower optim.lr, a longer warmup (optim.warmup_steps), a lower optim.weight_decay "
            "or optim.max_grad_norm; model.dtype bf16 or fp32 if it is fp16."
        )


def save_training_state(folder: Path, loss_model, optimizer, loader, progress: Progress, dist_info: DistInfo) -> None:
    """Write this rank's part of a checkpoint's state/ folder: its tensors and its data and random state.

    The main rank also writes progress.json, with the world size that saved the state.
    """
    folder.mkdir(parents=True, exist_ok=True)
    save_tensors(folder / tensors_file(dist_info.rank), *_state_dicts(loss_model, optimizer))
    state = TrainState(progress, data=loader.state_dict(), rng=rng_state(dist_info.device))
    _write_json(folder / f"rank_{dist_info.rank}.json", {"data": state.data, "rng": state.rng})
    if dist_info.is_main:
        _write_json(folder / PROGRESS, {"world_size": dist_info.world_size, **asdict(state.progress)})


def _state_dict_options():
    """Only the LoRA weights are trainable: the frozen base model is never saved. strict=False because the model's
    state dict has the frozen weights too, which loading leaves as they are.

    torch.distributed.checkpoint is imported here, at the first save or resume, not with train.py: it loads FSDP
    and torch.distributed.tensor (most of a second), which `tailor validate` and a run's start never need."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, strict=False)


def _state_dicts(loss_model, optimizer) -> tuple[dict, dict]:
    """The trained weights and AdamW's state, under the model's parameter names, sharded as this rank holds them."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    return get_state_dict(loss_model, optimizer, options=_state_dict_options())


def _write_json(path: Path, value: dict) -> None:
    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump(value, f)


# ---------------------------------------------------------------------------------------------------
# The save, across ranks


def save_training_checkpoint(cfg, model, step: int, is_main: bool, write_state: Callable[[Path], None]) -> Path:
    """Save a checkpoint folder for `step`, a collective: every rank calls it together.

    Every rank gathers the adapters to rank 0, which writes them (or the merged model when `checkpoint.save_adapters`
    is false), and calls `write_state(folder)` to write its part of the training state; then rank 0 writes the
    manifest, renames the folder into place and removes the oldest checkpoints.

    Args:
        model: the LoRA model (not its loss wrapper), sharded as the ranks hold it.
        write_state: writes this rank's part of the training state into the staging folder it is given.

    Returns:
        The published checkpoint folder.

    Raises:
        CheckpointWriteError: a write failed on any rank (a full disk); every rank raises rather than wait for the
            others, the partial folder is removed and the older checkpoints stay.
    """
    run_dir = Path(cfg.run_dir)
    final = checkpoint_path(run_dir, step)
    staging = stage_checkpoint(final) if is_main else staging_path(final)
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
            publish_checkpoint(staging, final)
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
    # a copy names its source first, its destination second: the file being written is the second
    written = (failure.filename2 or failure.filename or staging) if failure else None
    what = f"{failure.strerror or failure}: {written}" if failure else "on another rank"
    raise CheckpointWriteError(
        f"{final} could not be written ({what}): the partial folder is removed, and the checkpoints saved before "
        f"are kept. Free space on the disk that holds {final.parent} (other runs' checkpoints or other files there: "
        "this run deletes its own old checkpoints only after a save succeeds), then run the same command: resume: "
        "auto continues from the newest checkpoint."
    )


def _write_parts(cfg, model, staging: Path, is_main: bool) -> None:
    """The adapters (or the merged model) and the tokenizer, gathered from every rank and written by rank 0."""
    params = model.args.to_dict()
    tokenizer_file = find_tokenizer_file(cfg.model.path)
    if cfg.checkpoint.save_adapters:
        state = full_state(lora_state_dict(model))
        if is_main:
            write_adapters(staging, state, params, cfg.lora, tokenizer_file, cfg.model.quantize)
    else:
        merged = merged_state_dict(model)  # sharded as the model is
        # Each weight is gathered by every rank in turn (a collective) and written by rank 0 before the next one.
        gathered = (item for name, t in merged.items() for item in full_state({name: t}).items())
        if is_main:
            # a DTensor's shape is the global one
            specs = {name: TensorSpec(t.dtype, tuple(t.shape)) for name, t in merged.items()}
            write_merged(staging, specs, gathered, params, tokenizer_file)
        else:
            for _ in gathered:
                pass
