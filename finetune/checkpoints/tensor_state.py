"""The LoRA weights and their AdamW state in a checkpoint: one safetensors file per rank, never a pickle.

Each rank writes the shards it holds, as they are (no rank gathers the whole state), to
`state/tensors_rank_R.safetensors`, keyed `model/NAME` and `optim/NAME/FIELD`; the file's metadata says, for each
key, along which dimension the ranks split it (FSDP2 shards dimension 0 of every parameter and its AdamW moments;
AdamW's step counter is whole on every rank). Loading reads every rank's file, joins the shards in rank order and
keeps the part this rank holds now, so any number of ranks loads what any number saved, and the same number gets
back the very bytes it wrote.

safetensors reads a JSON header and raw numbers: whatever the bytes of a file, reading it runs no code. (PyTorch's
distributed checkpoint, used before, indexes its shards with a pickle.)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from model.dtensor import is_dtensor
from model.weights import save_weights

SHARD_DIMS = "shard_dims"  # the metadata entry: {key: the dimension split over the ranks, or null when whole}


class TensorStateError(ValueError):
    """A state file that cannot be read, or that does not fit the model; the message names the file or the key."""


def tensors_file(rank: int) -> str:
    """The name of a rank's state file."""
    return f"tensors_rank_{rank}.safetensors"


def tensors_file_problem(path: Path) -> str | None:
    """None when `path` is a training state tailor writes (read from its header only, no tensor); else why not."""
    try:
        _open(path)
    except TensorStateError as error:
        return str(error)
    return None


def save_tensors(path: Path, model_state: dict, optim_state: dict) -> None:
    """Write this rank's part of `get_state_dict(model, optimizer)` to `path`, as it holds it.

    That is its shards of the weights and of AdamW's state; no rank gathers the whole.
    """
    local, shard_dims = {}, {}
    for key, value in _flatten(model_state, optim_state).items():
        shard_dims[key] = _shard_dim(value, key)
        local[key] = (value.to_local() if is_dtensor(value) else value).detach().cpu().contiguous()
    save_weights(local, path, metadata={SHARD_DIMS: json.dumps(shard_dims)})


def load_tensors(paths: list[Path], model_state: dict, optim_state: dict) -> None:
    """Fill `model_state` and `optim_state` from the files every rank of the saving run wrote.

    Args:
        paths: every saving rank's file, in rank order.
        model_state, optim_state: `get_state_dict` of the model and optimizer to load into, whose values give each
            key's shape, type and sharding.

    Raises:
        TensorStateError: a file that cannot be read, or a key missing, added or of another shape: a checkpoint of
            another model or LoRA setting is refused whole.
    """
    files = [_open(path) for path in paths]
    wanted = _flatten(model_state, optim_state)
    saved = files[0][0]
    problems = [f"{key} is missing" for key in wanted if key not in saved]
    problems += [f"{key} is not in this model" for key in sorted(saved - set(wanted))]
    loaded = {}
    for key, template in wanted.items():
        if key not in saved:
            continue
        full = _join(files, key)
        if tuple(full.shape) != tuple(template.shape) or full.dtype != template.dtype:
            problems.append(
                f"Size mismatch for {key}: saved {tuple(full.shape)} {full.dtype}, this model has "
                f"{tuple(template.shape)} {template.dtype}"
            )
            continue
        full = full.to(template.device)
        if is_dtensor(template):
            from torch.distributed.tensor import distribute_tensor  # with FSDP only: see is_dtensor

            full = distribute_tensor(full, template.device_mesh, template.placements, src_data_rank=None)
        loaded[key] = full
    if problems:
        raise TensorStateError(
            f"its training state does not fit this model: {'; '.join(problems[:5])}"
            + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "")
            + ". Resume with the model.path and lora settings it was trained with."
        )
    for key, value in loaded.items():
        kind, _, rest = key.partition("/")
        if kind == "model":
            model_state[rest] = value
        else:
            name, _, field = rest.rpartition("/")
            optim_state["state"][name][field] = value


def _flatten(model_state: dict, optim_state: dict) -> dict[str, torch.Tensor]:
    """One flat dict of tensors. The optimizer's param_groups (its settings) are left out: they come from the
    config, and the learning rate from the step."""
    flat = {f"model/{name}": value for name, value in model_state.items()}
    for name, fields in optim_state["state"].items():
        flat.update({f"optim/{name}/{field}": value for field, value in fields.items()})
    for key, value in flat.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{key} is a {type(value).__name__}, not a tensor: a training state holds tensors only")
    return flat


def _shard_dim(value: torch.Tensor, key: str) -> int | None:
    if not is_dtensor(value):
        return None
    if len(value.placements) != 1 or not (value.placements[0].is_shard() or value.placements[0].is_replicate()):
        raise TypeError(f"{key} is placed {value.placements}; only one mesh dimension (FSDP2) is saved")
    placement = value.placements[0]
    return placement.dim if placement.is_shard() else None


def _open(path: Path) -> tuple[set, dict, object]:
    """(keys, shard dims, reader) of one rank's file, or a TensorStateError naming it."""
    try:
        reader = safe_open(str(path), framework="pt", device="cpu")
        shard_dims = json.loads((reader.metadata() or {})[SHARD_DIMS])
        if (
            not isinstance(shard_dims, dict)
            or set(shard_dims) != set(reader.keys())
            or not all(
                dim is None or (isinstance(dim, int) and not isinstance(dim, bool)) for dim in shard_dims.values()
            )
        ):
            raise ValueError(f"its {SHARD_DIMS} entry does not list its tensors")
    except FileNotFoundError:
        raise TensorStateError(f"{path} is missing") from None
    except (SafetensorError, OSError, KeyError, ValueError, RecursionError) as error:
        raise TensorStateError(
            f"{path} is not a training state tailor writes (a safetensors file with {SHARD_DIMS}): {error}"
        ) from None
    return set(reader.keys()), shard_dims, reader


def _join(files: list[tuple[set, dict, object]], key: str) -> torch.Tensor:
    """The whole tensor: the shards of every rank joined along their dimension, or rank 0's when it is whole."""
    dims = {dims.get(key, "missing") for _, dims, _ in files}
    if len(dims) != 1 or "missing" in dims:
        raise TensorStateError(
            f"its training state files disagree on {key} (shard dimensions {sorted(map(str, dims))})"
        )
    (dim,) = dims
    try:
        if dim is None:
            return files[0][2].get_tensor(key)
        return torch.cat([reader.get_tensor(key) for _, _, reader in files], dim=dim)
    except (SafetensorError, RuntimeError, IndexError) as error:
        raise TensorStateError(f"its training state's shards of {key} do not join: {error}") from None
