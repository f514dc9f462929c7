"""Load a model folder (native or Hugging Face) into a `Transformer`, one tensor at a time; write native folders.

Native: params.json + consolidated.safetensors, or consolidated-0000N-of-0000M.safetensors shards, or the legacy
consolidated.00.pth. Hugging Face: config.json + model*.safetensors, renamed and permuted on the fly. The model
is built on the meta device and allocated once with `to_empty`; each tensor is read from its (memory-mapped)
file and copied into its parameter, so a 12B model is never held twice in memory.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from model.args import ModelArgs, load_model_args, write_params
from model.hf_format import convert_tensor_to_native
from model.lora import (
    LoRAArgs,
    init_lora_weights,
    inject_lora,
    is_lora_name,
    lora_modules,
    mark_only_lora_trainable,
)
from model.transformer import Transformer

# Multimodal checkpoints (e.g. Mistral Small 3.1) carry a vision tower next to the text decoder; text-only
# fine-tuning skips it.
VISION_PREFIXES = ("vision_encoder.", "vision_language_adapter.", "patch_merger.", "pre_mm_projector_norm.")


def checkpoint_files(folder: str | Path) -> tuple[list[Path], str]:
    """The weight files of a model folder and their layout, "native" or "hf" (native wins when both exist)."""
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


def _read_file(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    if file.suffix == ".pth":
        yield from torch.load(file, map_location="cpu", weights_only=True, mmap=True).items()
    else:
        with safe_open(file, framework="pt", device="cpu") as handle:
            for name in handle.keys():
                yield name, handle.get_tensor(name)


def _tensors_with_source(folder: Path) -> Iterator[tuple[str, torch.Tensor, Path]]:
    files, layout = checkpoint_files(folder)
    args = load_model_args(folder) if layout == "hf" else None
    for file in files:
        for name, tensor in _read_file(file):
            if layout == "hf":
                if name.endswith("rotary_emb.inv_freq"):  # a buffer some older HF checkpoints saved
                    continue
                name, tensor = convert_tensor_to_native(name, tensor, args)
            yield name, tensor, file


def iter_checkpoint_tensors(folder: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every weight of a model folder as (native name, tensor), one at a time, whatever the folder's layout."""
    for name, tensor, _ in _tensors_with_source(Path(folder)):
        yield name, tensor


@torch.no_grad()
def load_model(
    path: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    attention_backend: str = "auto",
    lora: LoRAArgs | None = None,
) -> Transformer:
    """Build the model of a folder and fill it from its weights.

    With `lora`, adapters are injected (fp32, A Kaiming-uniform, B zeros) and only they require grad. A
    missing, unexpected, duplicated or mis-shaped tensor is a ValueError naming the tensor and the file.
    """
    folder = Path(path)
    args = load_model_args(folder)
    with torch.device("meta"):
        model = Transformer(args, attention_backend).to(dtype)
    if lora is not None:
        inject_lora(model, lora)
    model.to_empty(device=device)
    params = {name: p for name, p in model.named_parameters() if not is_lora_name(name)}
    loaded = set()
    for name, tensor, file in _tensors_with_source(folder):
        if name.startswith(VISION_PREFIXES):
            continue
        if name not in params:
            raise ValueError(f"{file}: unexpected tensor {name!r} for the model described in {folder}")
        if name in loaded:
            raise ValueError(f"{file}: tensor {name!r} appears twice in {folder}")
        if tensor.shape != params[name].shape:
            raise ValueError(
                f"{file}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                f"the model's params expect {tuple(params[name].shape)}"
            )
        params[name].copy_(tensor)
        loaded.add(name)
    if missing := sorted(set(params) - loaded):
        raise ValueError(f"{folder}: missing tensor(s) {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if lora is not None:
        init_lora_weights(model)
        mark_only_lora_trainable(model)
    return model


def save_model_folder(
    model_or_state_dict: nn.Module | dict[str, torch.Tensor],
    args: ModelArgs,
    folder: str | Path,
    tokenizer_file: str | Path | None = None,
) -> Path:
    """Write a native model folder: params.json, consolidated.safetensors and optionally a tokenizer file.

    From a module, the base weights are written; unmerged LoRA adapters are an error (merge them first, or save
    them apart with `lora_state_dict`), because writing the base alone would drop them silently.
    """
    if isinstance(model_or_state_dict, nn.Module):
        if any(not m.merged for m in lora_modules(model_or_state_dict)):
            raise ValueError("the model has unmerged LoRA adapters: call merge_lora(model) before saving it")
        state = {k: v for k, v in model_or_state_dict.state_dict().items() if not is_lora_name(k)}
    else:
        state = model_or_state_dict
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_params(folder, args.to_dict())
    save_file({k: v.detach().contiguous() for k, v in state.items()}, folder / "consolidated.safetensors")
    if tokenizer_file is not None:
        shutil.copy(tokenizer_file, folder / Path(tokenizer_file).name)
    return folder
