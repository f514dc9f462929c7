"""`tailor export-hf`: a base or merged model folder in Hugging Face's Mistral / Mixtral format.

The output (config.json, model.safetensors, the mistral-common tokenizer file and a tokenizer_config.json naming
transformers' mistral-common tokenizer) loads with transformers' `AutoModelForCausalLM.from_pretrained` and
`AutoTokenizer.from_pretrained` (the same ids as mistral-common, chats included, since it is mistral-common), and
serves with vLLM (`--tokenizer-mode mistral` reads the tokenizer file).
Names and the q/k rotary permutation are model/hf_format.py's; tensors stream one at a time, as in merge.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from finetune.after.tokenizer_copy import copy_tokenizer
from finetune.checkpoints.streaming import staged_folder, write_safetensors
from model.args import ModelArgs, args_to_hf_config, load_model_args
from model.hf_format import convert_tensor_to_hf, native_to_hf_name
from model.lora import is_lora_name
from model.weights import TensorSpec, read_weights, vision_tower_specs, weight_specs

HF_WEIGHTS = "model.safetensors"
# transformers (5 and later) reads tekken.json / tokenizer.model.v* through mistral-common with this class: the exact
# tokens and chat template of training. Without it, AutoTokenizer looks for a tokenizer.json and fails.
HF_TOKENIZER_CONFIG = {"tokenizer_class": "MistralCommonBackend"}
# PyTorch's names, and the config's (model.dtype) for the same types
DTYPES = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
}


def export_hf(model_dir: str | Path, out_dir: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write `model_dir` (any layout model/loading.py reads) as a Hugging Face folder, in `dtype` or each tensor's own.

    The text decoder only: a multimodal checkpoint's vision tower is left out (`read_weights` skips it;
    transformers' Mistral and Mixtral classes have no place for it), and the command says so.

    Raises:
        ValueError: no model folder, a folder holding LoRA tensors or a tensor Hugging Face's format has no name
            for, or an output folder that exists and is not empty.
        FileNotFoundError: no params.json / config.json or weights in the model folder.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ValueError(f"model folder not found: {model_dir}")
    args = load_model_args(model_dir)
    specs = weight_specs(model_dir)
    if any(is_lora_name(name) for name in specs):
        raise ValueError(f"{model_dir} holds LoRA tensors: merge the adapter first (tailor merge)")
    try:
        hf_specs = {native_to_hf_name(name): TensorSpec(dtype or s.dtype, s.shape) for name, s in specs.items()}
    except ValueError as e:
        raise ValueError(f"{model_dir}: {e}") from None
    config = args_to_hf_config(args)
    config["torch_dtype"] = str(dtype or specs["tok_embeddings.weight"].dtype).removeprefix("torch.")
    with staged_folder(out_dir) as staging:
        write_safetensors(staging / HF_WEIGHTS, hf_specs, hf_tensors(read_weights(model_dir), args, dtype))
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        copy_tokenizer([model_dir], staging)
        (staging / "tokenizer_config.json").write_text(json.dumps(HF_TOKENIZER_CONFIG, indent=2) + "\n")
    return Path(out_dir)


def hf_tensors(
    tensors: Iterable[tuple[str, torch.Tensor]], args: ModelArgs, dtype: torch.dtype | None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Each native (name, tensor) under its Hugging Face name and rotary layout, cast to `dtype` when given."""
    for name, tensor in tensors:
        hf_name, tensor = convert_tensor_to_hf(name, tensor, args)
        yield hf_name, tensor if dtype is None else tensor.to(dtype)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `tailor export-hf`'s arguments to its parser."""
    parser.add_argument("--model", required=True, type=Path, help="a base or merged model folder")
    parser.add_argument("--out", required=True, type=Path, help="new folder for the Hugging Face model")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="cast the weights (default: keep each tensor's dtype)"
    )


def run(args: argparse.Namespace) -> int:
    """Run `tailor export-hf`; return the exit code."""
    out = export_hf(args.model, args.out, DTYPES[args.dtype] if args.dtype else None)
    print(f"Hugging Face model written to {out}")
    if tower := vision_tower_specs(args.model):
        print(f"left out the vision tower ({len(tower)} tensors): the Hugging Face folder holds the text decoder only")
    return 0
