"""`tailor export-peft` / `tailor import-peft`: adapters in Hugging Face PEFT's format, and back.

PEFT's file is `adapter_model.safetensors` with keys `base_model.model.<HF weight name minus .weight>.lora_A.weight`
and an `adapter_config.json`; that is what `peft.PeftModel.from_pretrained` and vLLM read. Names and the rotary
permutation are model/hf_format.py's: wq/wk's B rows are permuted like their weight's rows, A never is.

Mixtral's experts are written per expert (`block_sparse_moe.experts.{e}.w1`), as PEFT saves them with
transformers 4 and as the hub's Mixtral adapters are; PEFT with transformers 5 converts them to its fused expert
parameters on load. The reverse, importing an adapter saved in that fused layout (`target_parameters`), is refused:
splitting PEFT's nested, rank-doubled gate_up/down wrappers back into experts is not supported.
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file

from finetune.after.tokenizer_copy import copy_tokenizer
from finetune.checkpoints.adapter import (
    ADAPTER_FILE,
    check_numbers,
    lora_args,
    params_with_lora,
    read_adapter,
)
from finetune.checkpoints.streaming import staged_folder
from model.args import load_model_args, read_json_object, write_params
from model.hf_format import convert_tensor_to_hf, convert_tensor_to_native
from model.lora import inject_lora, load_lora_state_dict
from model.settings import LORA_TARGETS, OUTPUT_HEAD_SERVING_NOTE
from model.transformer import Transformer
from model.weights import save_weights

PEFT_PREFIX = "base_model.model."
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_WEIGHTS_LEGACY = "adapter_model.bin"
PEFT_MAGNITUDE = ".lora_magnitude_vector"  # DoRA's, where tailor's key ends in .lora_magnitude.weight
NATIVE_MAGNITUDE = ".lora_magnitude.weight"

# PEFT options that make an adapter something other than LoRA (rsLoRA, DoRA) on whole layers.
_UNSUPPORTED_OPTIONS = {
    "lora_bias": "LoRA biases",
    "fan_in_fan_out": "transposed (Conv1D) weights",
    "modules_to_save": "fully trained modules next to the adapters",
    "layers_to_transform": "adapters on some layers only",
    "layers_pattern": "adapters on some layers only",
    "rank_pattern": "a different rank per module",
    "alpha_pattern": "a different alpha per module",
    "target_parameters": "adapters on parameters (transformers 5's fused Mixtral experts)",
    "trainable_token_indices": "trained token embeddings",
    "layer_replication": "replicated layers",
}


def export_peft(adapter_dir: str | Path, out_dir: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write a tailor checkpoint's adapter as a PEFT adapter for the Hugging Face Mistral / Mixtral layout.

    Args:
        base_model_name_or_path: written into adapter_config.json (e.g. the hub id of the converted base).

    Raises:
        ValueError: a folder that is not a checkpoint, or an output folder that exists and is not empty.
    """
    state, lora = read_adapter(adapter_dir)
    args = load_model_args(adapter_dir)  # the checkpoint's params.json is the base's plus `lora`
    # PEFT's wrapper of transformers 5's fused experts refuses dropout; dropout plays no part in inference.
    dropout = 0.0 if args.moe and {"w1", "w2", "w3"} & set(lora.targets) else lora.dropout
    peft_state, modules = {}, set()
    for name, tensor in state.items():
        hf_name, tensor = convert_tensor_to_hf(name, tensor, args)
        if hf_name.endswith(NATIVE_MAGNITUDE):
            hf_name = hf_name.removesuffix(NATIVE_MAGNITUDE) + PEFT_MAGNITUDE
        peft_state[PEFT_PREFIX + hf_name] = tensor.contiguous()
        modules.add(hf_name.rsplit(".lora_", 1)[0].rpartition(".")[2])  # ...self_attn.q_proj.lora_A.weight -> q_proj
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": dropout,
        "target_modules": sorted(modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": lora.rslora,
        "use_dora": lora.dora,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    with staged_folder(out_dir) as staging:
        save_weights(peft_state, staging / PEFT_WEIGHTS, metadata={"format": "pt"})
        (staging / PEFT_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return Path(out_dir)


def import_peft(peft_dir: str | Path, out_dir: str | Path, base_dir: str | Path) -> Path:
    """Write a PEFT LoRA adapter of a Mistral / Mixtral model as a tailor checkpoint folder.

    The folder holds lora.safetensors in fp32, the base's params.json with `lora` and the base's tokenizer, ready to
    evaluate, merge or train further.

    Raises:
        ValueError: a config or weights file tailor's LoRA cannot express or read, adapters on modules tailor
            cannot adapt, adapters that do not fit the base, or an output folder that exists and is not empty.
    """
    peft_dir, base_dir = Path(peft_dir), Path(base_dir)
    rank, alpha, dropout, rslora, dora = read_peft_config(peft_dir)
    args = load_model_args(base_dir)
    state, unsupported = {}, set()
    for key, tensor in read_peft_weights(peft_dir).items():
        hf_name = key.removeprefix(PEFT_PREFIX)
        if hf_name.endswith(PEFT_MAGNITUDE):
            hf_name = hf_name.removesuffix(PEFT_MAGNITUDE) + NATIVE_MAGNITUDE
        try:
            name, tensor = convert_tensor_to_native(hf_name, tensor, args)
        except ValueError:
            name = None
        if not key.startswith(PEFT_PREFIX) or name is None or name.rsplit(".", 3)[-3] not in LORA_TARGETS:
            unsupported.add(_module_of(key))
            continue
        state[name] = tensor.float().contiguous()
    if unsupported:
        raise ValueError(
            f"{peft_dir}: adapters on modules tailor cannot adapt: {sorted(unsupported)[:6]}; "
            "supported are q/k/v/o_proj, gate/up/down_proj, Mixtral's experts w1/w2/w3 and lm_head"
        )
    targets = sorted({name.rsplit(".", 3)[-3] for name in state}, key=LORA_TARGETS.index)
    lora = lora_args(
        f"{peft_dir / PEFT_CONFIG}: ",
        rank=rank,
        alpha=alpha,
        dropout=dropout,
        targets=targets,
        rslora=rslora,
        dora=dora,
    )
    with torch.device("meta"):  # checks every adapted layer is there with the base's shapes, without memory
        model = Transformer(args)
    inject_lora(model, lora)
    try:
        load_lora_state_dict(model, {name: tensor.to("meta") for name, tensor in state.items()})
    except ValueError as e:
        raise ValueError(f"{peft_dir} does not fit the model of {base_dir}: {e}") from None
    with staged_folder(out_dir) as staging:
        save_weights(state, staging / ADAPTER_FILE)
        write_params(staging, params_with_lora(base_dir, lora))
        copy_tokenizer([base_dir], staging)
    return Path(out_dir)


def _module_of(key: str) -> str:
    """base_model.model.model.embed_tokens.lora_embedding_A -> model.embed_tokens"""
    key = key.removeprefix(PEFT_PREFIX).removesuffix(".weight")
    module, _, last = key.rpartition(".")
    return module if last.startswith("lora_") else key


def read_peft_config(peft_dir: Path) -> tuple[int, float, float, bool, bool]:
    """Rank, alpha, dropout, rsLoRA (scaling alpha / sqrt(r)) and DoRA of a PEFT LoRA config.

    Raises:
        ValueError: naming the file: no config, not LoRA, an option tailor's LoRA cannot express, or a number out
            of range.
    """
    path = peft_dir / PEFT_CONFIG
    if not path.is_file():
        raise ValueError(f"{peft_dir}: no {PEFT_CONFIG}; expected a PEFT adapter folder")
    config = read_json_object(path)
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type {config.get('peft_type')!r} is not supported, only 'LORA'")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{path}: bias {config['bias']!r} is not supported: tailor's LoRA trains no bias")
    for option, meaning in _UNSUPPORTED_OPTIONS.items():
        if config.get(option):
            raise ValueError(f"{path}: {option} = {config[option]!r} is not supported: tailor's LoRA has no {meaning}")
    if not {"r", "lora_alpha"} <= set(config):
        raise ValueError(f"{path}: r and lora_alpha are required")
    rank, alpha = config["r"], config["lora_alpha"]
    check_numbers(f"{path}: ", {"lora_alpha": alpha, "lora_dropout": config.get("lora_dropout", 0.0)}, r=rank)
    return rank, alpha, config.get("lora_dropout", 0.0), bool(config.get("use_rslora")), bool(config.get("use_dora"))


def read_peft_weights(peft_dir: Path) -> dict[str, torch.Tensor]:
    """The tensors of a PEFT adapter folder: adapter_model.safetensors, or the legacy adapter_model.bin.

    Raises:
        ValueError: neither file is there, or the legacy file cannot be read without running code.
    """
    if (peft_dir / PEFT_WEIGHTS).is_file():
        return load_file(peft_dir / PEFT_WEIGHTS)
    if (peft_dir / PEFT_WEIGHTS_LEGACY).is_file():
        return _load_legacy_weights(peft_dir / PEFT_WEIGHTS_LEGACY)
    raise ValueError(f"{peft_dir}: no {PEFT_WEIGHTS} (or {PEFT_WEIGHTS_LEGACY})")


def _load_legacy_weights(path: Path) -> dict[str, torch.Tensor]:
    """PEFT's legacy adapter_model.bin, with PyTorch's restricted unpickler (weights_only: no code runs); one that
    needs more than tensors and plain containers, or is damaged, is a ValueError naming the file."""
    try:
        with warnings.catch_warnings():  # PyTorch's note on pickle protocols, about a file refused anyway
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        reason = (str(e).strip() or type(e).__name__).splitlines()[0]
        raise ValueError(
            f"{path}: not a file of tensors that can be read without running code ({reason}); convert the adapter "
            "to adapter_model.safetensors with PEFT where you trust it"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(t) for k, t in state.items()):
        raise ValueError(f"{path}: holds no mapping of tensor names to tensors")
    return state


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `tailor export-peft`'s arguments to its parser."""
    parser.add_argument("--adapter", required=True, type=Path, help="checkpoint folder holding lora.safetensors")
    parser.add_argument("--out", required=True, type=Path, help="new folder for the PEFT adapter")
    parser.add_argument(
        "--base-model-name",
        default=None,
        help="written as base_model_name_or_path, e.g. the hub id of the converted base",
    )


def run_export(args: argparse.Namespace) -> int:
    """Run `tailor export-peft`; return the exit code."""
    _, lora = read_adapter(args.adapter)
    if "output" in lora.targets:  # said before the folder is written, rather than by the server that refuses it
        print(f"warning: {OUTPUT_HEAD_SERVING_NOTE}", file=sys.stderr)
    out = export_peft(args.adapter, args.out, args.base_model_name)
    print(f"PEFT adapter written to {out}")
    return 0


def add_import_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `tailor import-peft`'s arguments to its parser."""
    parser.add_argument("--peft", required=True, type=Path, help="PEFT adapter folder (adapter_config.json, ...)")
    parser.add_argument("--base", required=True, type=Path, help="the model folder the adapter belongs to")
    parser.add_argument("--out", required=True, type=Path, help="new checkpoint folder")


def run_import(args: argparse.Namespace) -> int:
    """Run `tailor import-peft`; return the exit code."""
    out = import_peft(args.peft, args.out, args.base)
    print(f"adapter checkpoint written to {out}")
    return 0
