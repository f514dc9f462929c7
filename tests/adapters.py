"""Adapter checkpoints in the trainer's format with random nonzero weights, for the tests of what reads them (after
training, serving)."""

import json
import shutil

import torch
from safetensors.torch import save_file

from finetune.checkpoints.adapter import params_with_lora
from finetune.data.model_tokenizer import find_tokenizer_file
from model.args import load_model_args
from model.lora import LoRAArgs, inject_lora, lora_state_dict
from model.transformer import Transformer


def random_adapter(base_folder, lora: LoRAArgs, seed: int = 0) -> dict[str, torch.Tensor]:
    """Adapter weights for a base folder with nonzero A and B, big enough to change the logits visibly."""
    with torch.device("meta"):
        model = Transformer(load_model_args(base_folder))
    inject_lora(model, lora)
    generator = torch.Generator().manual_seed(seed)
    return {name: 0.1 * torch.randn(t.shape, generator=generator) for name, t in lora_state_dict(model).items()}


def write_checkpoint(folder, base_folder, lora: LoRAArgs, state: dict[str, torch.Tensor]):
    """A checkpoint folder as the trainer writes it: lora.safetensors, params.json with `lora`, tokenizer."""
    folder.mkdir(parents=True)
    save_file(state, folder / "lora.safetensors")
    (folder / "params.json").write_text(json.dumps(params_with_lora(base_folder, lora), indent=2))
    shutil.copy(find_tokenizer_file(base_folder), folder)
    return folder
