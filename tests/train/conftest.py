"""A tiny model folder and small configs over the demo data, for the training tests."""

import sys
from pathlib import Path

import pytest
import yaml

from model.tiny import write_tiny_model

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "model", arch="mistral-7b", tokenizer="v3")


@pytest.fixture
def write_config(tmp_path, tiny_model_dir):
    """`write_config(**overrides)` -> path of a YAML config of a short, learnable run in tmp_path/run."""

    def write(**overrides) -> Path:
        cfg = {
            "run_dir": str(tmp_path / "run"),
            "seed": 0,
            "seq_len": 128,
            "batch_size": 2,
            "max_steps": 16,
            "model": {"path": str(tiny_model_dir), "dtype": "fp32", "attention": "sdpa"},
            "data": {
                "train": str(REPO / "data/demo/train.jsonl"),
                "eval": str(REPO / "data/demo/eval.jsonl"),
                "num_workers": 0,
                "cache_dir": str(tmp_path / "cache"),
            },
            "lora": {"rank": 8, "alpha": 16, "targets": ["wq", "wk", "wv", "wo", "w1", "w2", "w3", "output"]},
            "optim": {"lr": 2e-2, "weight_decay": 0.0, "warmup_steps": 2},
            "eval": {"freq": 8, "max_batches": 2},
            "checkpoint": {"freq": 8, "keep": 2},
            "logging": {"freq": 1},
        }
        for key, value in overrides.items():
            *parents, leaf = key.split("__")
            node = cfg
            for part in parents:
                node = node[part]
            node[leaf] = value
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    return write


def python() -> str:
    return sys.executable
