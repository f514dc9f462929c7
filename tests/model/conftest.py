"""Tiny random models in memory for the model tests (model folders: `tiny_folder` in tests/conftest.py)."""

from dataclasses import replace

import pytest
import torch

from model.tiny import random_state_dict, tiny_args
from model.transformer import Transformer

SMALL_VOCAB = 256  # in-memory models don't need a real tokenizer's vocabulary


@pytest.fixture(scope="session")
def make_model():
    """`make_model(arch, seed=0, backend="sdpa", **overrides)`: an fp32 tiny model with random weights, in
    memory, in eval mode; `overrides` replace fields of its ModelArgs."""

    def make(arch: str = "mistral-7b", seed: int = 0, backend: str = "sdpa", **overrides) -> Transformer:
        args = replace(tiny_args(arch, SMALL_VOCAB), **overrides)
        model = Transformer(args, attention_backend=backend)
        model.load_state_dict(random_state_dict(args, seed))
        return model.eval()

    return make


@pytest.fixture(scope="session")
def random_tokens():
    """`random_tokens(n, seed=0)`: n token ids below the in-memory models' vocabulary."""

    def make(n: int, seed: int = 0) -> torch.Tensor:
        return torch.randint(0, SMALL_VOCAB, (n,), generator=torch.Generator().manual_seed(seed))

    return make
