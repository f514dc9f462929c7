"""The training state of a checkpoint: what an exact resume needs beside the adapters, saved and loaded.

Beside the adapters, each checkpoint has a state/ folder with what they alone do not hold:

    state/tensors_rank_R.safetensors      the LoRA weights and their AdamW state, sharded as the ranks hold them
                                          (finetune/checkpoints/tensor_state.py: no rank gathers them; any number
                                          of ranks can load them)
    state/progress.json                   the step, the counters (tokens, non-finite steps), time spent, world size
    state/rank_R.json                     rank R's data position and random generator states

The learning rate is a pure function of the step and AdamW's settings come from the config, so neither is saved.
With the same number of ranks, a resumed run computes bit for bit what the uninterrupted run would have. With
another number, the weights and optimizer state are resharded, but a rank's data position has no counterpart
there: the data starts a new order, seeded by (seed, step), and so do the random generators.

Reading a checkpoint runs no code, whatever its bytes: the state is safetensors and JSON, nothing is unpickled.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from finetune.checkpoints.folders import list_checkpoints, save_training_checkpoint
from finetune.checkpoints.manifest import verify_checkpoint
from finetune.checkpoints.tensor_state import (
    TensorStateError,
    load_tensors,
    save_tensors,
    tensors_file,
    tensors_file_problem,
)
from finetune.config import TrainConfig
from finetune.training.distributed import DistInfo, all_reduce_sum, is_dtensor
from finetune.training.rng import derived_seed, rng_state, rng_state_problem, seed_rngs, set_rng_state
from finetune.training.train_step import NonFiniteError

if TYPE_CHECKING:
    from finetune.training.train_step import StepOutcome

STATE = "state"
PROGRESS = "progress.json"
NO_TRAINING_STATE = f"no training state ({STATE}/{PROGRESS}): adapters only"  # not damaged, but not resumable


class ResumeError(ValueError):
    """The run cannot start where the config says; the message names the folder and the ways out."""


@dataclass
class Progress:
    """What the training loop counts, saved with every checkpoint."""

    step: int = 0  # optimizer steps done
    tokens: int = 0  # all tokens of all ranks so far
    trained_tokens: int = 0
    nonfinite_in_a_row: int = 0  # steps skipped for a non-finite loss or gradient, up to this one
    nonfinite_skipped: int = 0  # all such steps
    elapsed_s: float = 0.0  # training time, across resumes
    loss_scale: float = 0.0  # fp16's dynamic loss scale as saved (0: the run does not scale its loss)
    loss_scale_good_steps: int = 0  # finite steps in a row since the loss scale last changed, as saved

    def count(self, step: int, tokens: int, outcome: StepOutcome, elapsed_s: float) -> None:
        self.step, self.elapsed_s = step, elapsed_s
        self.tokens += tokens
        self.trained_tokens += outcome.trained_tokens
        self.nonfinite_in_a_row = 0 if outcome.finite else self.nonfinite_in_a_row + 1
        self.nonfinite_skipped += not outcome.finite


@dataclass
class ResumePoint:
    folder: Path  # the checkpoint
    step: int
    world_size: int  # of the run that saved it


def why_not_resumable(folder: Path) -> str | None:
    """None for an intact checkpoint with a training state; else what is wrong with it, in words."""
    folder = Path(folder)
    problem = verify_checkpoint(folder)
    if problem is not None:
        return problem
    if not (folder / STATE / PROGRESS).is_file():
        return NO_TRAINING_STATE
    problem = _progress_problem(folder / STATE / PROGRESS)
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
    saved = _read_progress_file(Path(folder))
    return ResumePoint(Path(folder), saved["step"], saved["world_size"])


def read_progress(folder: Path) -> Progress:
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


def save_checkpoint(
    cfg: TrainConfig, loss_model, optimizer, loader, progress: Progress, dist_info: DistInfo, loss_scale=None
) -> Path:
    """The checkpoint of step `progress.step`: the adapters and the training state (with fp16's `loss_scale`, a
    finetune.training.loss_scale.DynamicLossScale, its state). A collective. Weights that are not finite are never
    written: NonFiniteError, and the last good checkpoint stays the newest."""
    _raise_if_not_finite(loss_model, progress.step, Path(cfg.run_dir))
    if loss_scale is not None:
        progress = replace(progress, **loss_scale.state())

    def write_state(folder: Path) -> None:
        save_training_state(folder / STATE, loss_model, optimizer, loader, progress, dist_info)

    return save_training_checkpoint(cfg, loss_model.model, progress.step, dist_info.is_main, write_state)


def _raise_if_not_finite(loss_model, step: int, run_dir: Path) -> None:
    """Count the non-finite values of the trained weights over every rank's shards (a collective)."""
    shards = [p.to_local() if is_dtensor(p) else p for p in loss_model.parameters() if p.requires_grad]
    bad = all_reduce_sum(torch.stack([(~torch.isfinite(t.detach())).sum() for t in shards]).sum()).item()
    if bad:
        newest = (list_checkpoints(run_dir) or [None])[-1]
        raise NonFiniteError(
            f"step {step}: {bad} of the LoRA weights are not finite, so no checkpoint is written: "
            + (f"the newest, {newest}, is kept, and resume: auto continues from it" if newest else "none was saved")
            + ". Things to try: a lower optim.lr, a longer warmup (optim.warmup_steps), a lower optim.weight_decay "
            "or optim.max_grad_norm; model.dtype bf16 or fp32 if it is fp16."
        )


def save_training_state(folder: Path, loss_model, optimizer, loader, progress: Progress, dist_info: DistInfo) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_tensors(folder / tensors_file(dist_info.rank), *_state_dicts(loss_model, optimizer))
    _write_json(
        folder / f"rank_{dist_info.rank}.json", {"data": loader.state_dict(), "rng": rng_state(dist_info.device)}
    )
    if dist_info.is_main:
        _write_json(folder / PROGRESS, {"world_size": dist_info.world_size, **asdict(progress)})


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


def load_training_state(start: ResumePoint, loss_model, optimizer, loader, seed: int, dist_info: DistInfo) -> Progress:
    """Load a checkpoint's state into the freshly built model, optimizer and data loader; returns the counters."""
    folder = start.folder / STATE
    model_state, optim_state = _state_dicts(loss_model, optimizer)
    try:
        load_tensors([folder / tensors_file(rank) for rank in range(start.world_size)], model_state, optim_state)
    except TensorStateError as error:
        raise ResumeError(f"{start.folder}: {error}") from None
    from torch.distributed.checkpoint.state_dict import set_state_dict

    set_state_dict(
        loss_model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state, options=_state_dict_options()
    )
    progress = read_progress(start.folder)
    if start.world_size == dist_info.world_size:
        path = folder / f"rank_{dist_info.rank}.json"
        try:
            mine = json.loads(path.read_text(encoding="utf-8"))
            loader.load_state_dict(mine["data"])
            set_rng_state(mine["rng"], dist_info.device)
        except (ValueError, KeyError, TypeError, IndexError, OverflowError, RuntimeError) as error:
            raise ResumeError(
                f"{path}: not a data position and random state that tailor writes ({type(error).__name__}: {error})"
            ) from None
    else:
        seed_rngs(derived_seed(seed, start.step, dist_info.rank))
        if dist_info.is_main:
            print(
                f"{start.folder} was saved by {start.world_size} ranks and this run has {dist_info.world_size}: "
                "the weights and optimizer state are resharded, but the data goes on in a new order and the random "
                f"generators are seeded anew (from seed and step {start.step}): not the exact continuation that the "
                "same number of ranks gives",
                flush=True,
            )
    return progress


def _write_json(path: Path, value: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f)
        f.flush()
        os.fsync(f.fileno())
