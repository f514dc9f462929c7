"""Tiny random models of the real architectures, written as real model folders (tests, demo, benchmarks).

Each keeps what makes its architecture different at a small size: grouped-query attention, Nemo's and Small's
attention width different from `dim`, Mistral 7B v0.1's sliding window, Mixtral's top-2 experts. The folder
holds a tokenizer file copied from mistral-common's bundled data (model/tokenizer_files.py), so everything runs
offline.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import torch

from model.args import ARCHITECTURES, ModelArgs, MoeArgs, args_to_hf_config, write_params
from model.hf_format import convert_tensor_to_hf
from model.loading import save_model_folder
from model.tokenizer_files import TOKENIZER_FILES, tokenizer_path
from model.transformer import Transformer
from model.weights import save_weights

LAYOUTS = ("native", "hf", "pth", "sharded")

_SMALL = dict(dim=64, n_layers=2, head_dim=16, hidden_dim=128, n_heads=4, n_kv_heads=2)
_SMALL_BY_ARCH = {
    "nemo-12b": dict(head_dim=32),  # n_heads * head_dim = 128 != dim, like 32 * 128 != 5120
    "small-24b": dict(head_dim=32, hidden_dim=256),
    "codestral-22b": dict(dim=96, n_heads=6),  # 3 query heads per KV head
    "mixtral-8x22b": dict(dim=96, n_heads=6),
}
_TINY_SLIDING_WINDOW = 8
_TINY_EXPERTS = 4


def tiny_args(arch: str, vocab_size: int, width: int = 1) -> ModelArgs:
    """Return the small args of architecture `arch` (one of ARCHITECTURES), keeping what makes it different.

    Args:
        width: multiplies dim, head_dim and hidden_dim: at 4, every projection holds whole NF4 scale groups (16384
            weights) on each of 2 ranks, so QLoRA runs on it (model/quantize.py).

    Raises:
        ValueError: an unknown architecture.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {sorted(ARCHITECTURES)}")
    real = ARCHITECTURES[arch]
    sizes = {**_SMALL, **_SMALL_BY_ARCH.get(arch, {})}
    return replace(
        real,
        **{key: value * width if key in ("dim", "head_dim", "hidden_dim") else value for key, value in sizes.items()},
        vocab_size=vocab_size,
        sliding_window=_TINY_SLIDING_WINDOW if real.sliding_window else None,
        moe=MoeArgs(_TINY_EXPERTS, real.moe.num_experts_per_tok) if real.moe else None,
    )


def random_state_dict(args: ModelArgs, seed: int = 0) -> dict[str, torch.Tensor]:
    """Return random fp32 weights for `args`, the same for the same seed.

    They keep activations of order 1 through the layers, so routing, attention patterns and rotary layouts all
    matter to the logits.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {name: p.shape for name, p in Transformer(args).named_parameters()}
    state = {}
    for name, shape in shapes.items():
        if "norm" in name:
            state[name] = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        elif name == "tok_embeddings.weight":
            state[name] = torch.randn(shape, generator=generator)
        else:
            state[name] = torch.randn(shape, generator=generator) / math.sqrt(shape[1])
    return state


def write_tiny_model(
    folder: str | Path,
    arch: str = "mistral-7b",
    tokenizer: str = "v3",
    seed: int = 0,
    layout: str = "native",
    width: int = 1,
) -> Path:
    """Write a random model folder, with a copy of mistral-common's tokenizer file.

    The same seed gives the same model in every layout.

    Args:
        arch: one of ARCHITECTURES.
        tokenizer: a short name of TOKENIZER_FILES ("v1", "v3", "v7", "tekken"); it sets the vocabulary size.
        layout: `native` (params.json + consolidated.safetensors), `sharded` (two
            consolidated-0000N-of-00002.safetensors), `pth` (legacy consolidated.00.pth) or `hf` (config.json +
            model.safetensors with HF names and rotary layout).
        width: as in `tiny_args`.

    Returns:
        The folder.

    Raises:
        ValueError: an unknown layout, architecture or tokenizer.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    source = tokenizer_path(tokenizer)
    args = tiny_args(arch, TOKENIZER_FILES[tokenizer].vocab_size, width)
    state = random_state_dict(args, seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if layout == "native":
        save_model_folder(state, args, folder)
    elif layout == "hf":
        (folder / "config.json").write_text(json.dumps(args_to_hf_config(args), indent=2) + "\n")
        hf_state = dict(convert_tensor_to_hf(name, tensor, args) for name, tensor in state.items())
        save_weights({k: v.contiguous() for k, v in hf_state.items()}, folder / "model.safetensors", {"format": "pt"})
    else:
        write_params(folder, args.to_dict())
        if layout == "pth":
            torch.save(state, folder / "consolidated.00.pth")
        else:
            names = list(state)
            for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :]), start=1):
                save_weights({k: state[k] for k in part}, folder / f"consolidated-{i:05d}-of-00002.safetensors")
    shutil.copyfile(source, folder / TOKENIZER_FILES[tokenizer].filename)
    return folder
