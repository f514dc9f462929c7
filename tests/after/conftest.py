"""Tiny model folders and adapter checkpoints in the trainer's format, for the after-training tools' tests."""

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from finetune.checkpoints.adapter import params_with_lora, read_adapter
from finetune.data.tokenize import find_tokenizer_file
from model.args import load_model_args
from model.loading import load_model
from model.lora import LoRAArgs, inject_lora, load_lora_state_dict, lora_state_dict
from model.transformer import Transformer

ALL_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "output")


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


@pytest.fixture(scope="session")
def adapter_checkpoint(tiny_folder, tmp_path_factory):
    """`adapter_checkpoint(arch, targets=ALL_TARGETS, rank=4, alpha=8.0)`: (base folder, checkpoint folder) with a
    random nonzero adapter, written once per session."""
    made = {}

    def make(arch: str = "mistral-7b", targets=ALL_TARGETS, rank: int = 4, alpha: float = 8.0, layout="native"):
        key = (arch, tuple(targets), rank, alpha, layout)
        if key not in made:
            base = tiny_folder(arch, layout)
            lora = LoRAArgs(rank=rank, alpha=alpha, targets=tuple(targets))
            folder = tmp_path_factory.mktemp("run") / "checkpoints" / "checkpoint_000100"
            made[key] = base, write_checkpoint(folder, base, lora, random_adapter(base, lora))
        return made[key]

    return make


@pytest.fixture(scope="session")
def adapted_model():
    """`adapted_model(base_folder, checkpoint_folder)`: the fp32 base with the checkpoint's adapter, unmerged, as
    training evaluates it."""

    def make(base_folder, checkpoint_folder):
        state, lora = read_adapter(checkpoint_folder)
        model = load_model(base_folder, dtype=torch.float32, lora=lora)
        load_lora_state_dict(model, state)
        return model.eval()

    return make
