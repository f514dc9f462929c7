"""Load a model folder (native or Hugging Face) into a `Transformer`, one tensor at a time; write native folders.

The weights come from model/weights.py's `read_weights` (every layout, native names, the vision tower of a
multimodal checkpoint left out). The model is built on the meta device and allocated once with `to_empty`; each
tensor is copied into its parameter as it is read, so a 12B model is never held twice in memory.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import nn

from model.args import ModelArgs, load_model_args, write_params
from model.lora import (
    LoRAArgs,
    init_lora_weights,
    inject_lora,
    is_lora_name,
    lora_modules,
    mark_only_lora_trainable,
)
from model.quantize import QUANTIZATIONS, assign_nf4, is_nf4, quantize_frozen_linears, to_nf4
from model.transformer import Transformer
from model.weights import read_weights, save_weights


@torch.no_grad()
def load_model(
    path: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    attention_backend: str = "auto",
    lora: LoRAArgs | None = None,
    quantize: str = "none",
) -> Transformer:
    """Build the model of a folder and fill it from its weights.

    With `lora`, adapters are injected (fp32, A Kaiming-uniform, B zeros) and only they require grad. With
    `quantize="nf4"`, the frozen projections are quantized as they are read, on `device` (model/quantize.py). A
    missing, unexpected, duplicated or mis-shaped tensor is a ValueError naming the tensor and the file.
    """
    if lora is not None and lora.dora and quantize == "nf4":
        raise ValueError(
            "a DoRA adapter does not run on NF4 weights: its row norms need each weight whole; load it unquantized"
        )
    folder = Path(path)
    args = load_model_args(folder)
    with torch.device("meta"):
        model = Transformer(args, attention_backend).to(dtype)
    if lora is not None:
        inject_lora(model, lora)
    if quantize == "nf4":
        quantize_frozen_linears(model)
    elif quantize != "none":
        raise ValueError(f"quantize is {quantize!r}; expected one of {', '.join(QUANTIZATIONS)}")
    model.to_empty(device=device)
    params = {name: p for name, p in model.named_parameters() if not is_lora_name(name)}
    loaded = set()
    for name, tensor in read_weights(folder):
        if name not in params:
            raise ValueError(f"{folder}: unexpected tensor {name!r} for the model described in its params")
        if name in loaded:
            raise ValueError(f"{folder}: tensor {name!r} appears twice")
        if tensor.shape != params[name].shape:
            raise ValueError(
                f"{folder}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                f"the model's params expect {tuple(params[name].shape)}"
            )
        if is_nf4(params[name]):
            assign_nf4(model, name, to_nf4(tensor.to(device=device, dtype=dtype)))
        else:
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
    save_weights({k: v.detach().contiguous() for k, v in state.items()}, folder / "consolidated.safetensors")
    if tokenizer_file is not None:
        shutil.copyfile(tokenizer_file, folder / Path(tokenizer_file).name)
    return folder
