"""The one builder of a model filled from a checkpoint: meta device -> `to_empty` -> weights streamed in; and the
writer of native folders.

`load_model` (chat, eval, merge, export) and training (finetune/training/model_setup.py) both build with
`build_meta_model` (every name and shape, no memory), allocate once with `to_empty`, and fill with `fill_weights`
from a stream of (name, tensor), one tensor at a time, so a 12B model is never held twice in memory. The stream's
checks (names, shapes, dtypes, nothing missing) are made in `fill_weights` only; what differs is where a checked
tensor goes, its `place` hook: `place_tensor` in one process, training's FSDP2 shards (broadcast from rank 0, NF4
quantized whole) otherwise. The weights of a folder come from model/weights.py's `read_weights` (every layout,
native names, the vision tower of a multimodal checkpoint left out).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable
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

# puts one checked full tensor into parameter `name` of the model: place(model, name, tensor)
Place = Callable[[nn.Module, str, torch.Tensor], None]


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

    Args:
        path: a native or Hugging Face model folder.
        lora: inject adapters (fp32, A Kaiming-uniform, B zeros); then only they require grad.
        quantize: "nf4" quantizes the frozen projections as they are read, on `device` (model/quantize.py).

    Raises:
        FileNotFoundError: the folder has no params.json / config.json, or no weights.
        ValueError: a missing, unexpected, duplicated, non-float or mis-shaped tensor, naming it and the folder;
            an unreadable params or weights file; DoRA with NF4, or an unknown `quantize`.
        QuantizationUnavailable: NF4 asked for without torchao installed.
    """
    folder = Path(path)
    model = build_meta_model(load_model_args(folder), dtype, attention_backend, lora, quantize)
    model.to_empty(device=device)
    fill_weights(model, read_weights(folder), folder)
    if lora is not None:
        init_lora_weights(model)
    return model


def build_meta_model(
    args: ModelArgs,
    dtype: torch.dtype,
    attention_backend: str = "auto",
    lora: LoRAArgs | None = None,
    quantize: str = "none",
) -> Transformer:
    """Build the model on the meta device: every name and shape, no memory, in `dtype`.

    Args:
        lora: inject adapters (fp32); then only they require grad. Their values are set after `to_empty`.
        quantize: "nf4" makes the frozen projections NF4 parameters, their values assigned as they are filled.

    Raises:
        ValueError: a DoRA adapter with NF4, or an unknown `quantize`.
        QuantizationUnavailable: NF4 asked for without torchao installed.
    """
    if lora is not None and lora.dora and quantize == "nf4":
        raise ValueError(
            "a DoRA adapter does not run on NF4 weights: its row norms need each weight whole; load it unquantized"
        )
    with torch.device("meta"):
        model = Transformer(args, attention_backend).to(dtype)
        if lora is not None:
            inject_lora(model, lora)
            mark_only_lora_trainable(model)
    if quantize == "nf4":
        quantize_frozen_linears(model)
    elif quantize != "none":
        raise ValueError(f"quantize is {quantize!r}; expected one of {', '.join(QUANTIZATIONS)}")
    return model


@torch.no_grad()
def place_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Put a full tensor into its parameter, in one process.

    The tensor is copied (cast to the parameter's dtype), or quantized whole on the parameter's device where the
    parameter is NF4.
    """
    param = model.get_parameter(name)
    if is_nf4(param):
        assign_nf4(model, name, to_nf4(tensor.to(device=param.device, dtype=param.dtype)))
    else:
        param.copy_(tensor)


def fill_weights(
    model: nn.Module,
    tensors: Iterable[tuple[str, torch.Tensor]],
    source: str | Path,
    place: Place = place_tensor,
) -> None:
    """Fill every weight of an allocated model but the adapters' (initialised, not loaded) from `tensors`.

    Args:
        tensors: (native name, full tensor) pairs, taken one at a time.
        source: the folder or file the tensors come from, named in errors.
        place: puts each checked tensor into the model (`place_tensor`, or training's sharding hook).

    Raises:
        ValueError: naming `source` and the tensor: a name the model has not, a name given twice, a tensor that is
            not floating point, a shape other than the parameter's; after the stream, the weights it did not hold.
    """
    params = {name: p for name, p in model.named_parameters() if not is_lora_name(name)}
    loaded = set()
    for name, tensor in tensors:
        if name not in params:
            raise ValueError(f"{source}: unexpected tensor {name!r} for the model described in its params")
        if name in loaded:
            raise ValueError(f"{source}: tensor {name!r} appears twice")
        if not tensor.dtype.is_floating_point:
            raise ValueError(
                f"{source}: tensor {name!r} is {str(tensor.dtype).removeprefix('torch.')}, where the model has a "
                "float weight; integer (quantized) weights are not loaded as floats: use the float model"
            )
        if tensor.shape != params[name].shape:
            raise ValueError(
                f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                f"the model's params expect {tuple(params[name].shape)}"
            )
        place(model, name, tensor)
        loaded.add(name)
    if missing := sorted(set(params) - loaded):
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        raise ValueError(f"{source}: missing tensor(s) {missing[:8]}{more}")


def save_model_folder(
    model_or_state_dict: nn.Module | dict[str, torch.Tensor],
    args: ModelArgs,
    folder: str | Path,
    tokenizer_file: str | Path | None = None,
) -> Path:
    """Write a native model folder: params.json, consolidated.safetensors and optionally a tokenizer file.

    From a module, the base weights are written; unmerged LoRA adapters are an error (merge them first, or save
    them apart with `lora_state_dict`), because writing the base alone would drop them silently.

    Args:
        tokenizer_file: copied into the folder under its own name when given.

    Returns:
        The folder.

    Raises:
        ValueError: the module has unmerged LoRA adapters.
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
