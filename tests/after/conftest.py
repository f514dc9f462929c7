"""Tiny model folders and adapter checkpoints in the trainer's format, for the after-training tools' tests."""

import pytest
import torch
from adapters import random_adapter, write_checkpoint

from finetune.checkpoints.adapter import read_adapter
from model.loading import load_model
from model.lora import LoRAArgs, load_lora_state_dict

ALL_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "output")


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
