"""A tiny model folder and small configs over the demo data, for the training tests."""

import sys
from pathlib import Path

import pytest
import torch
import yaml

from finetune.config import load_config
from finetune.training.checkpointing import save_training_checkpoint
from model.loading import load_model
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


@pytest.fixture
def tiny_lora_model(write_config, tiny_model_dir):
    """The tiny model in fp32 with the LoRA adapters of write_config's lora section."""
    return load_model(tiny_model_dir, dtype=torch.float32, lora=load_config(write_config()).lora)


@pytest.fixture
def save_checkpoint(write_config, tiny_lora_model):
    """`save_checkpoint(step, keep=3, write_state=None, **config_overrides)` -> the folder that training's own save
    (save_training_checkpoint, in one process) writes under tmp_path/run for tiny_lora_model, whose lora_A weights
    then all hold `step`; `write_state(folder)` writes the files of a training state (none by default)."""

    def save(step: int, keep: int = 3, write_state=None, **overrides) -> Path:
        cfg = load_config(write_config(checkpoint__keep=keep, **overrides))
        with torch.no_grad():
            for name, param in tiny_lora_model.named_parameters():
                if ".lora_A." in name:
                    param.fill_(float(step))
        return save_training_checkpoint(
            cfg, tiny_lora_model, step, is_main=True, write_state=write_state or (lambda _: None)
        )

    return save
