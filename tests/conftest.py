"""Fixtures every test folder shares: one thread per test, and tiny model folders written once per session."""

import pytest
import torch
from multimodal import add_vision_tower

from model.tiny import write_tiny_model


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny matmuls are dominated by thread wake-ups: on a busy 2-core machine a 40x64 matmul takes 15 ms with
    two threads and 15 us with one. Restored after each test."""
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
def multimodal_folder(tiny_folder, tmp_path_factory):
    """`multimodal_folder(layout="native")`: the tiny mistral-7b folder plus a vision tower, written once a session."""
    folders = {}

    def make(layout: str = "native"):
        if layout not in folders:
            folder = tmp_path_factory.mktemp(f"multimodal-{layout}")
            folders[layout] = add_vision_tower(tiny_folder("mistral-7b", layout), folder, layout)
        return folders[layout]

    return make
