"""Tiny random models for the model tests: in memory, or written once per session as real model folders."""

from dataclasses import replace

import pytest
import torch

from model.tiny import random_state_dict, tiny_args, write_tiny_model
from model.transformer import Transformer

SMALL_VOCAB = 256  # in-memory models don't need a real tokenizer's vocabulary


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny matmuls are dominated by thread wake-ups: on a busy 2-core machine a 40x64 matmul takes 15 ms with
    two threads and 15 us with one. Restored after each test so other test folders keep their setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """`tiny_folder(arch, layout="native", tokenizer="v3")`: a model folder, written once per session."""
    folders = {}

    def make(arch: str = "mistral-7b", layout: str = "native", tokenizer: str = "v3"):
        key = (arch, layout, tokenizer)
        if key not in folders:
            folder = tmp_path_factory.mktemp(f"{arch}-{layout}-{tokenizer}")
            folders[key] = write_tiny_model(folder, arch=arch, tokenizer=tokenizer, layout=layout)
        return folders[key]

    return make


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
