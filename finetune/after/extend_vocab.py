"""`tailor extend-vocab`: Mistral 7B v0.1 and Mixtral 8x7B v1 (vocabulary 32000) to the v3 tokenizer's 32768.

As mistral-finetune's utils/extend_model_vocab.py does: v3 keeps <unk>, <s>, </s> at 0-2, puts its 768 control
tokens ([INST], [TOOL_CALLS], ...) at 3-770 and every other piece of the 32000-token vocabulary 768 ids later.
So the rows of the embedding and of the output head move the same way, and the 768 new rows are drawn from
N(0, 1/dim) (seeded), for both. The extended model gives the old model's logits on any text, shifted by 768;
the control tokens mean something only after fine-tuning with the v3 template.
"""

from __future__ import annotations

import argparse
import math
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from finetune.checkpoints.adapter import base_params
from finetune.checkpoints.streaming import staged_folder, write_safetensors
from model.args import load_model_args, write_params
from model.tokenizer_files import TOKENIZER_FILES, tokenizer_path
from model.weights import TensorSpec, read_weights, weight_specs

OLD_VOCAB_SIZE, NEW_VOCAB_SIZE = 32000, 32768
FIRST_PIECE_ID = 3  # after <unk>, <s>, </s>
VOCAB_TENSORS = ("tok_embeddings.weight", "output.weight")  # rows indexed by token id


def extend_vocab(model_dir: str | Path, out_dir: str | Path, seed: int = 0) -> Path:
    """Write `model_dir` with a 32768-token vocabulary and the v3 tokenizer as a native folder.

    Args:
        seed: draws the new rows (the output head's from seed + 1).

    Raises:
        ValueError: no model folder, a vocabulary other than 32000, or an output folder that exists and is not
            empty.
        FileNotFoundError: no params.json / config.json or weights in the model folder.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ValueError(f"model folder not found: {model_dir}")
    vocab_size = load_model_args(model_dir).vocab_size
    if vocab_size != OLD_VOCAB_SIZE:
        already = " (already extended)" if vocab_size == NEW_VOCAB_SIZE else ""
        raise ValueError(
            f"{model_dir}: vocab_size is {vocab_size}{already}; extend-vocab turns the "
            f"{OLD_VOCAB_SIZE}-token vocabulary of Mistral 7B v0.1 / Mixtral 8x7B v1 into "
            f"{NEW_VOCAB_SIZE}"
        )
    specs = weight_specs(model_dir, vision_tower=True)
    for name in VOCAB_TENSORS:
        specs[name] = TensorSpec(specs[name].dtype, (NEW_VOCAB_SIZE, *specs[name].shape[1:]))
    params = base_params(model_dir)
    params["vocab_size"] = NEW_VOCAB_SIZE
    with staged_folder(out_dir) as staging:
        tensors = extended_tensors(read_weights(model_dir, vision_tower=True), seed)
        write_safetensors(staging / "consolidated.safetensors", specs, tensors)
        write_params(staging, params)
        shutil.copyfile(tokenizer_path("v3"), staging / TOKENIZER_FILES["v3"].filename)
    return Path(out_dir)


def extended_tensors(tensors: Iterable[tuple[str, torch.Tensor]], seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Each (name, tensor), the embedding's and the output head's rows extended (`extend_rows`)."""
    for name, tensor in tensors:
        if name in VOCAB_TENSORS:
            generator = torch.Generator().manual_seed(seed + VOCAB_TENSORS.index(name))
            tensor = extend_rows(tensor, generator)
        yield name, tensor


def extend_rows(rows: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """[32000, dim] rows in v1 token order -> [32768, dim] in v3 order, new control-token rows random."""
    added = NEW_VOCAB_SIZE - OLD_VOCAB_SIZE
    dim = rows.shape[1]
    new_rows = torch.randn(added, dim, generator=generator) / math.sqrt(dim)
    return torch.cat([rows[:FIRST_PIECE_ID], new_rows.to(rows.dtype), rows[FIRST_PIECE_ID:]])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `tailor extend-vocab`'s arguments to its parser."""
    parser.add_argument("--model", required=True, type=Path, help="a model folder with vocab_size 32000")
    parser.add_argument("--out", required=True, type=Path, help="new folder for the extended model")
    parser.add_argument("--seed", type=int, default=0, help="seed of the new rows")


def run(args: argparse.Namespace) -> int:
    """Run `tailor extend-vocab`; return the exit code."""
    out = extend_vocab(args.model, args.out, args.seed)
    print(f"extended model written to {out}")
    return 0
