"""Streaming safetensors: a writer that holds one tensor in memory, the specs it plans from (read from file headers,
no data), and an output folder that appears whole or not at all.

A model does not fit in memory twice, and `safetensors.save_file` wants every tensor at once. So the writer
takes the names, dtypes and shapes first, writes the header, then each tensor's bytes at its offset as it
arrives: peak memory is about one tensor.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open

from model.hf_format import hf_to_native_name
from model.loading import checkpoint_files

MERGED_WEIGHTS = "consolidated.safetensors"


class TensorSpec(NamedTuple):
    dtype: torch.dtype
    shape: tuple[int, ...]


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip
_SAFETENSORS_NAMES = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}


def checkpoint_specs(folder: str | Path) -> dict[str, TensorSpec]:
    """Native name -> dtype and shape of every tensor `iter_checkpoint_tensors(folder)` yields, in the same order,
    read from the files' headers without reading the data."""
    files, layout = checkpoint_files(folder)
    specs = {}
    for file in files:
        if file.suffix == ".pth":  # memory-mapped: shapes without reading
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            entries = [(name, t.dtype, tuple(t.shape)) for name, t in state.items()]
        else:
            with safe_open(file, framework="pt", device="cpu") as handle:
                slices = ((name, handle.get_slice(name)) for name in handle.keys())
                entries = [(name, _SAFETENSORS_DTYPES[s.get_dtype()], tuple(s.get_shape())) for name, s in slices]
        for name, dtype, shape in entries:
            if layout == "hf":  # renamed as model/loading.py does; the rotary permutation keeps shapes
                if name.endswith("rotary_emb.inv_freq"):
                    continue
                name = hf_to_native_name(name)
            specs[name] = TensorSpec(dtype, shape)
    return specs


def write_safetensors(path: str | Path, specs: dict[str, TensorSpec], tensors: Iterable[tuple[str, torch.Tensor]]
                      ) -> None:  # fmt: skip
    """Write one safetensors file holding one tensor in memory at a time: the header comes from `specs`, then each
    tensor's bytes go to their offset as it arrives (in any order). Each tensor of `specs` must come exactly once,
    with its dtype and shape."""
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
                raise ValueError(f"{path}: tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)}, planned as "
                                 f"{spec.dtype} {spec.shape}")
            f.seek(data_start + offsets[name])
            f.write(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().data)
            written.add(name)
    if missing := [name for name in specs if name not in written]:
        raise ValueError(f"{path}: no data came for tensor(s) {missing[:8]}")


@contextmanager
def staged_folder(out_dir: str | Path) -> Iterator[Path]:
    """A fresh folder to write into, renamed to `out_dir` when the block ends without error: a half-written output
    never looks finished. An existing non-empty `out_dir` is refused rather than overwritten."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} already exists and is not empty; choose a new output folder")
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out.exists():
        out.rmdir()
    staging.rename(out)
