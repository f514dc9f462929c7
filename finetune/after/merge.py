"""`tailor merge`: fold a trained adapter into its base model, W + scaling · B A (DoRA's rows rescaled to their
magnitudes), one tensor at a time, peak memory about one tensor plus the adapter."""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from finetune.after.tokenizer_copy import copy_tokenizer
from finetune.checkpoints.adapter import base_params, read_adapter, read_base_quantization
from finetune.checkpoints.streaming import MERGED_WEIGHTS, staged_folder, write_safetensors
from model.args import write_params
from model.lora import merged_weight
from model.weights import read_weights, vision_tower_specs, weight_specs


def merge_adapter(base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Write a native model folder whose weights are the base's with the adapter added, each in the base's dtype.

    The folder holds consolidated.safetensors, params.json without `lora`, and the tokenizer. Any base layout reads:
    native, sharded, .pth or Hugging Face; tensors without an adapter (norms, router) are copied unchanged, and so is
    a multimodal checkpoint's vision tower: the merged folder is the base model with a new text decoder.

    Raises:
        ValueError: no base folder, an adapter folder that is not a checkpoint, an adapter that does not fit the
            base, or an output folder that exists and is not empty.
        FileNotFoundError: no weights in the base folder.
    """
    base_dir = Path(base_dir)
    if not base_dir.is_dir():
        raise ValueError(f"base model folder not found: {base_dir}")
    specs = weight_specs(base_dir, vision_tower=True)
    tensors = merged_weights(base_dir, adapter_dir, vision_tower=True)
    with staged_folder(out_dir) as staging:
        write_safetensors(staging / MERGED_WEIGHTS, specs, tensors)
        write_params(staging, base_params(base_dir))
        copy_tokenizer([base_dir, adapter_dir], staging)
    return Path(out_dir)


def merged_weights(
    base_dir: Path, adapter_dir: str | Path, vision_tower: bool = False
) -> Iterator[tuple[str, torch.Tensor]]:
    """The base folder's (name, weight) as `read_weights` yields them, each with its adapter merged in.

    Raises:
        ValueError: an adapter folder that is not a checkpoint, or an adapter of a weight the base does not have
            (refused before any tensor is read); a mis-shaped adapter, when its weight is reached.
    """
    adapter, lora = read_adapter(adapter_dir)
    adapted = {key.rsplit(".", 2)[0] + ".weight" for key in adapter}
    if unknown := sorted(adapted - set(weight_specs(base_dir))):
        raise ValueError(
            f"{adapter_dir}: adapters for weights that {base_dir} does not have, e.g. {unknown[:4]}; "
            "was the adapter trained on another model?"
        )
    return merged_tensors(read_weights(base_dir, vision_tower=vision_tower), adapter, lora.scaling)


def merged_tensors(
    tensors: Iterable[tuple[str, torch.Tensor]], adapter: dict[str, torch.Tensor], scaling: float
) -> Iterator[tuple[str, torch.Tensor]]:
    """Each (name, weight) with its adapter merged in (`merged_weight`, as `LoRALinear.merge` does).

    Raises:
        ValueError: an adapter whose update has another shape than its weight.
    """
    for name, tensor in tensors:
        module = name.removesuffix(".weight")
        a, b = adapter.get(f"{module}.lora_A.weight"), adapter.get(f"{module}.lora_B.weight")
        magnitude = adapter.get(f"{module}.lora_magnitude.weight")
        if a is not None:
            if (b.shape[0], a.shape[1]) != tuple(tensor.shape):
                raise ValueError(
                    f"adapter of {name} makes a {b.shape[0]}x{a.shape[1]} update for a weight of shape "
                    f"{tuple(tensor.shape)}: the adapter was trained on another model"
                )
            tensor = merged_weight(tensor, a, b, scaling, magnitude)
        yield name, tensor


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `tailor merge`'s arguments to its parser."""
    parser.add_argument("--base", required=True, type=Path, help="the base model folder the adapter was trained on")
    parser.add_argument("--adapter", required=True, type=Path, help="checkpoint folder holding lora.safetensors")
    parser.add_argument("--out", required=True, type=Path, help="new folder for the merged model")


def run(args: argparse.Namespace) -> int:
    """Run `tailor merge`; return the exit code."""
    out = merge_adapter(args.base, args.adapter, args.out)
    print(f"merged model written to {out}")
    if (quantization := read_base_quantization(args.adapter)) != "none":
        print(
            f"the adapter was trained on {quantization.upper()}-quantized frozen weights; it is merged into "
            f"{args.base}'s original weights, each in its stored dtype (never into dequantized {quantization} values)"
        )
    if tower := vision_tower_specs(args.base):
        print(f"the base's vision tower ({len(tower)} tensors) is copied unchanged: LoRA trained the text decoder only")
    return 0
