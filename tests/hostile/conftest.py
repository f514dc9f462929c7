"""Fixtures the hostile tests share: a tiny model folder, and a short run trained once per module to damage."""

from pathlib import Path

import pytest
from hostile_runs import write_config

import train
from model.tiny import write_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "model", arch="mistral-7b", tokenizer="v3")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, model_dir) -> Path:
    """A run of 2 steps with a checkpoint after each: checkpoint_000001 and checkpoint_000002."""
    folder = tmp_path_factory.mktemp("trained")
    assert train.run([str(write_config(folder, model_dir))]) == 0
    return folder / "run"
