"""Streaming safetensors: a writer that holds one tensor in memory, planned from specs (model/weights.py's
`weight_specs` reads them from file headers), and an output folder that appears whole or not at all.

A model does not fit in memory twice, and `safetensors.save_file` wants every tensor at once. So the writer
takes the names, dtypes and shapes first, writes the header, then each tensor's bytes at its offset as it
arrives: peak memory is about one tensor.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from finetune.atomic_files import atomic_folder, clear_leftovers
from model.weights import SAFETENSORS_DTYPES, TensorSpec

MERGED_WEIGHTS = "consolidated.safetensors"
_SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


def write_safetensors(
    path: str | Path, specs: dict[str, TensorSpec], tensors: Iterable[tuple[str, torch.Tensor]]
) -> None:
    """Write one safetensors file holding one tensor in memory at a time.

    The header comes from `specs`, then each tensor's bytes go to their offset as it arrives (in any order).

    Raises:
        ValueError: naming the file and the tensor: one not in `specs`, one that comes twice or with another dtype
            or shape, or one of `specs` that never comes.
    """
    header, offsets, end = {}, {}, 0
    for name, spec in specs.items():
        size = torch.Size(spec.shape).numel() * spec.dtype.itemsize
        dtype = _SAFETENSORS_NAMES[spec.dtype]
        header[name] = {"dtype": dtype, "shape": list(spec.shape), "data_offsets": [end, end + size]}
        offsets[name], end = end, end + size
    header["__metadata__"] = {"format": "pt"}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors' own writer does
    data_start = 8 + len(encoded)
    written = set()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        for name, tensor in tensors:
            spec = specs.get(name)
            if spec is None or name in written:
                fault = "written twice" if spec else "not in the planned header"
                raise ValueError(f"{path}: tensor {name!r} is {fault}")
            if (tensor.dtype, tuple(tensor.shape)) != spec:
                raise ValueError(
                    f"{path}: tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)}, planned as "
                    f"{spec.dtype} {spec.shape}"
                )
            f.seek(data_start + offsets[name])
            f.write(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().data)
            written.add(name)
    if missing := [name for name in specs if name not in written]:
        raise ValueError(f"{path}: no data came for tensor(s) {missing[:8]}")


@contextmanager
def staged_folder(out_dir: str | Path) -> Iterator[Path]:
    """A fresh folder to write into, renamed to `out_dir` when the block ends without error.

    A half-written output so never looks finished.

    Raises:
        ValueError: `out_dir` exists and is not an empty folder (it is never overwritten).
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} already exists and is not empty; choose a new output folder")
    clear_leftovers(out)  # of a write to the same folder cut short
    with atomic_folder(out) as staging:
        yield staging
