"""The one reader of a model folder's weights: (name, tensor) pairs in the model's native names, one at a time.

Every reader of weights goes through here (loading for chat and eval, the streamed FSDP loading of training,
merge, Hugging Face export, extend-vocab), so renaming, filtering and skipping happen once and the same way:
- layouts: consolidated.safetensors, consolidated-0000N-of-0000M.safetensors shards, the legacy
  consolidated.00.pth, or Hugging Face's model*.safetensors (renamed and q/k-permuted on the fly);
- a multimodal checkpoint's vision tower (Pixtral, Mistral Small 3.1: `vision_encoder.*`,
  `vision_language_adapter.*`, ...; Hugging Face: `vision_tower.*`, `multi_modal_projector.*`) is not part of
  the text decoder: it is left out unless a caller asks for it (merge keeps it, unchanged), and
  `vision_tower_specs` lets callers count and show what was left out.

Each tensor is read from its (memory-mapped) file when the iteration reaches it, so a caller that handles one
pair at a time (copy into a parameter, quantize, write to a stream) holds about one tensor in memory.
`weight_specs` gives the same names with their dtypes and shapes, read from the files' headers only.
Reading never runs code: safetensors, or torch.load with weights_only. `save_weights` is the one writer of a whole
safetensors file, with the mode every other file gets.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from model.args import load_model_args
from model.hf_format import convert_tensor_to_native, hf_to_native_name

# Native (mistral-inference) names first, then Hugging Face's (Mistral3 / Llava-style, with or without `model.`).
VISION_TOWER_PREFIXES = (
    "vision_encoder.",
    "vision_language_adapter.",
    "patch_merger.",
    "pre_mm_projector_norm.",
    "vision_tower.",
    "multi_modal_projector.",
    "model.vision_tower.",
    "model.multi_modal_projector.",
)
_HF_BUFFERS = ("rotary_emb.inv_freq",)  # buffers some older HF checkpoints saved: derived, not weights


class TensorSpec(NamedTuple):
    """A stored tensor's dtype and shape, as a file's header gives them."""

    dtype: torch.dtype
    shape: tuple[int, ...]


def is_vision_tower(name: str) -> bool:
    """Whether a stored tensor name (native or Hugging Face) belongs to a multimodal checkpoint's vision tower."""
    return name.startswith(VISION_TOWER_PREFIXES)


def weight_files(folder: str | Path) -> tuple[list[Path], str]:
    """The weight files of a model folder and their layout, "native" or "hf" (native wins when both exist).

    Raises:
        FileNotFoundError: the folder holds no weight file.
        ValueError: the weights are model-parallel consolidated.0N.pth shards.
    """
    folder = Path(folder)
    if len(list(folder.glob("consolidated.*.pth"))) > 1:
        raise ValueError(f"{folder}: model-parallel consolidated.0N.pth shards are not supported")
    for pattern in ("consolidated.safetensors", "consolidated-*-of-*.safetensors", "consolidated.00.pth"):
        if files := sorted(folder.glob(pattern)):
            return files, "native"
    if files := sorted(folder.glob("model*.safetensors")):
        return files, "hf"
    raise FileNotFoundError(
        f"{folder}: no weights (consolidated.safetensors, consolidated-*-of-*.safetensors, consolidated.00.pth "
        "or model*.safetensors)"
    )


def read_weights(folder: str | Path, vision_tower: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Every weight of the text decoder as (native name, tensor), one at a time, whatever the folder's layout.

    Args:
        vision_tower: yield a multimodal checkpoint's tower tensors too, under their stored names.

    Raises:
        FileNotFoundError: no weights in the folder (or, for Hugging Face's layout, no config.json).
        ValueError: model-parallel .pth shards, a damaged weights file, or a Hugging Face name the converter does
            not know; each names it.
    """
    folder = Path(folder)
    files, layout = weight_files(folder)
    args = load_model_args(folder) if layout == "hf" else None
    for file in files:
        for name, tensor in _read_file(file):
            native = _native_name(name, layout, vision_tower)
            if native is None:
                continue
            if layout == "hf" and not is_vision_tower(name):
                native, tensor = convert_tensor_to_native(name, tensor, args)
            yield native, tensor


def weight_specs(folder: str | Path, vision_tower: bool = False) -> dict[str, TensorSpec]:
    """Native name -> dtype and shape of every tensor `read_weights(folder, vision_tower)` yields, in its order.

    Read from the files' headers without reading the data (the rotary permutation keeps shapes).

    Raises:
        ValueError: as `weight_specs_by_file`.
    """
    return {name: spec for name, (_, spec) in weight_specs_by_file(folder, vision_tower).items()}


def weight_specs_by_file(folder: str | Path, vision_tower: bool = False) -> dict[str, tuple[Path, TensorSpec]]:
    """`weight_specs`, with the file each tensor is stored in: what a message about a tensor names.

    Raises:
        FileNotFoundError: the folder holds no weight file.
        ValueError: naming the file: a name stored twice (and the other file), an unknown Hugging Face name, a
            dtype tailor does not read, a damaged file.
    """
    files, layout = weight_files(folder)
    specs: dict[str, tuple[Path, TensorSpec]] = {}
    for file in files:
        for name, spec in _read_specs(file):
            try:
                native = _native_name(name, layout, vision_tower)
            except ValueError as e:  # a Hugging Face name the converter does not know
                raise ValueError(f"{file}: {e}") from None
            if native is None:
                continue
            if native in specs:
                raise ValueError(f"{file}: tensor {name!r} is also in {specs[native][0].name}; keep one copy")
            specs[native] = (file, spec)
    return specs


def vision_tower_specs(folder: str | Path) -> dict[str, TensorSpec]:
    """The vision tower's tensors of a multimodal checkpoint (empty for a text model), to count and show."""
    return {name: spec for name, spec in weight_specs(folder, vision_tower=True).items() if is_vision_tower(name)}


def _native_name(name: str, layout: str, vision_tower: bool) -> str | None:
    """The name a stored tensor is yielded under, or None when it is left out."""
    if is_vision_tower(name):
        return name if vision_tower else None
    if layout == "hf":
        return None if name.endswith(_HF_BUFFERS) else hf_to_native_name(name)
    return name


def _read_file(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    if file.suffix == ".pth":
        yield from _load_pth(file).items()
    else:
        with _open_safetensors(file) as handle:
            for name in handle.keys():
                yield name, handle.get_tensor(name)


def _open_safetensors(file: Path):
    """safe_open, with a damaged file (truncated, not safetensors) a ValueError that names it."""
    try:
        return safe_open(file, framework="pt", device="cpu")
    except SafetensorError as e:
        raise ValueError(f"{file}: not a complete safetensors file ({e}); copy or download it again") from None


def _load_pth(file: Path) -> dict[str, torch.Tensor]:
    """A legacy consolidated.00.pth, read with weights_only (no code runs); a damaged one is a ValueError naming it."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        reason = (str(e).strip() or type(e).__name__).splitlines()[0]
        raise ValueError(f"{file}: not a readable weights file ({reason})") from None
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise ValueError(f"{file}: holds no mapping of tensor names to tensors")
    return state


SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _read_specs(file: Path) -> Iterator[tuple[str, TensorSpec]]:
    if file.suffix == ".pth":  # memory-mapped: shapes without reading
        for name, t in _load_pth(file).items():
            yield name, TensorSpec(t.dtype, tuple(t.shape))
    else:
        with _open_safetensors(file) as handle:
            for name in handle.keys():
                s = handle.get_slice(name)
                if s.get_dtype() not in SAFETENSORS_DTYPES:
                    raise ValueError(f"{file}: tensor {name!r} has dtype {s.get_dtype()}, which tailor does not read")
                yield name, TensorSpec(SAFETENSORS_DTYPES[s.get_dtype()], tuple(s.get_shape()))


def save_weights(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` to a safetensors file, with the mode the umask gives every other file (0644 under umask 022).

    safetensors' `save_file` creates it 0600, whatever the umask, which a serving user or a teammate cannot read.
    """
    save_file(tensors, path, metadata=metadata)
    umask = os.umask(0o077)  # read by setting it: a file another thread creates meanwhile is private, never open
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
