"""`tailor merge`: fold a trained adapter into its base model, W + (alpha / r) · B A, one tensor at a time.

Also the pieces the other converters (export-peft, import-peft, export-hf, extend-vocab) share: reading an
adapter checkpoint, a safetensors writer that holds one tensor in memory, and an output folder that appears
whole or not at all.

A model does not fit in memory twice, and `safetensors.save_file` wants every tensor at once. So the writer
takes the names, dtypes and shapes first (read from the base's file headers, no data), writes the header, then
each tensor's bytes at its offset as it arrives: peak memory is about one tensor plus the adapter.
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from finetune.data.tokenize import find_tokenizer_file
from model.args import load_model_args, write_params
from model.hf_format import hf_to_native_name
from model.loading import checkpoint_files, iter_checkpoint_tensors
from model.lora import LORA_TARGETS, LoRAArgs, merged_weight

ADAPTER_FILE = "lora.safetensors"
MERGED_WEIGHTS = "consolidated.safetensors"


# ---------------------------------------------------------------------------------------------------
# Adapter checkpoints


def read_adapter(ckpt_dir: str | Path) -> tuple[dict[str, torch.Tensor], LoRAArgs]:
    """The adapter weights (native names) and LoRA settings of a checkpoint folder written by the trainer:
    `lora.safetensors` and a params.json with a `lora` entry. mistral-finetune's entry, which has `scaling` but
    no `alpha`, reads too."""
    folder = Path(ckpt_dir)
    weights, params = folder / ADAPTER_FILE, folder / "params.json"
    for path in (weights, params):
        if not path.is_file():
            raise ValueError(f"{folder}: no {path.name}; expected an adapter checkpoint folder "
                             "(run_dir/checkpoints/checkpoint_N with lora.safetensors and params.json)")
    entry = json.loads(params.read_text()).get("lora")
    if not isinstance(entry, dict) or "rank" not in entry or not ({"alpha", "scaling"} & set(entry)):
        raise ValueError(f"{params}: no 'lora' entry with rank and alpha; was this folder written by the trainer?")
    state = load_file(weights)
    modules = sorted({key.rsplit(".", 2)[0] for key in state})
    targets = entry.get("targets") or sorted({m.rpartition(".")[2] for m in modules}, key=_target_order)
    alpha = entry["alpha"] if "alpha" in entry else entry["scaling"] * entry["rank"]
    try:
        lora = LoRAArgs(rank=entry["rank"], alpha=alpha, dropout=entry.get("dropout", 0.0), targets=tuple(targets))
    except ValueError as e:
        raise ValueError(f"{params}: {e}") from None
    for module in modules:
        a, b = state.get(f"{module}.lora_A.weight"), state.get(f"{module}.lora_B.weight")
        if a is None or b is None or a.shape[0] != lora.rank or b.shape[1] != lora.rank:
            raise ValueError(f"{weights}: {module} needs lora_A [rank, in] and lora_B [out, rank] with rank "
                             f"{lora.rank}, got A {None if a is None else tuple(a.shape)}, "
                             f"B {None if b is None else tuple(b.shape)}")
    return state, lora


def _target_order(target: str) -> int:
    return LORA_TARGETS.index(target) if target in LORA_TARGETS else len(LORA_TARGETS)


def base_params(model_dir: str | Path) -> dict:
    """A model folder's params.json without any `lora` entry, kept verbatim (keys tailor ignores included), or
    made from its config.json when the folder is in Hugging Face format."""
    path = Path(model_dir) / "params.json"
    params = json.loads(path.read_text()) if path.is_file() else load_model_args(model_dir).to_dict()
    params.pop("lora", None)
    return params


def lora_entry(lora: LoRAArgs) -> dict:
    """The `lora` entry of a checkpoint's params.json; mistral-inference reads rank and scaling (= alpha / rank)."""
    return {"rank": lora.rank, "alpha": lora.alpha, "scaling": lora.alpha / lora.rank, "dropout": lora.dropout,
            "targets": list(lora.targets)}


def params_with_lora(base_dir: str | Path, lora: LoRAArgs) -> dict:
    """A checkpoint's params.json: the base's plus the `lora` entry."""
    return dict(base_params(base_dir), lora=lora_entry(lora))


def copy_tokenizer(folders: Iterable[str | Path], out_dir: Path) -> None:
    """Copy the mistral-common tokenizer file of the first folder that has one."""
    for folder in folders:
        try:
            source = find_tokenizer_file(folder)
        except FileNotFoundError:
            continue
        shutil.copy(source, out_dir / source.name)
        return
    raise ValueError(f"no mistral-common tokenizer file (tokenizer.model.v*, tekken.json) in {list(map(str, folders))}")


# ---------------------------------------------------------------------------------------------------
# Streaming safetensors


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


# ---------------------------------------------------------------------------------------------------
# Merge


def merge_adapter(base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Write a native model folder (consolidated.safetensors, params.json without `lora`, tokenizer) whose weights
    are the base's with the adapter added, each in the base's dtype. Any base layout reads: native, sharded,
    .pth or Hugging Face; tensors without an adapter (norms, router, a vision tower) are copied unchanged."""
    base_dir = Path(base_dir)
    if not base_dir.is_dir():
        raise ValueError(f"base model folder not found: {base_dir}")
    adapter, lora = read_adapter(adapter_dir)
    specs = checkpoint_specs(base_dir)
    adapted = {key.rsplit(".", 2)[0] + ".weight" for key in adapter}
    if unknown := sorted(adapted - set(specs)):
        raise ValueError(f"{adapter_dir}: adapters for weights that {base_dir} does not have, e.g. {unknown[:4]}; "
                         "was the adapter trained on another model?")
    tensors = merged_tensors(iter_checkpoint_tensors(base_dir), adapter, lora.alpha / lora.rank)
    with staged_folder(out_dir) as staging:
        write_safetensors(staging / MERGED_WEIGHTS, specs, tensors)
        write_params(staging, base_params(base_dir))
        copy_tokenizer([base_dir, adapter_dir], staging)
    return Path(out_dir)


def merged_tensors(tensors: Iterable[tuple[str, torch.Tensor]], adapter: dict[str, torch.Tensor], scaling: float
                   ) -> Iterator[tuple[str, torch.Tensor]]:  # fmt: skip
    """Each (name, weight) with its adapter merged in (`merged_weight`, as `LoRALinear.merge` does)."""
    for name, tensor in tensors:
        module = name.removesuffix(".weight")
        a, b = adapter.get(f"{module}.lora_A.weight"), adapter.get(f"{module}.lora_B.weight")
        if a is not None:
            if (b.shape[0], a.shape[1]) != tuple(tensor.shape):
                raise ValueError(f"adapter of {name} makes a {b.shape[0]}x{a.shape[1]} update for a weight of shape "
                                 f"{tuple(tensor.shape)}: the adapter was trained on another model")
            tensor = merged_weight(tensor, a, b, scaling)
        yield name, tensor


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, type=Path, help="the base model folder the adapter was trained on")
    parser.add_argument("--adapter", required=True, type=Path, help="checkpoint folder holding lora.safetensors")
    parser.add_argument("--out", required=True, type=Path, help="new folder for the merged model")


def run(args: argparse.Namespace) -> int:
    out = merge_adapter(args.base, args.adapter, args.out)
    print(f"merged model written to {out}")
    return 0
