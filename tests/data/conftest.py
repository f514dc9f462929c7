"""Model folders made of a bundled mistral-common tokenizer and a params.json; helpers to write data.

Helpers are fixtures (`write_jsonl`, `chat`) so that no test imports this file by name.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from finetune.data import load_tokenizer
from model.tokenizer_files import TOKENIZER_FILES, tokenizer_path


def make_model_dir(root: Path, version: str) -> Path:
    tokenizer = TOKENIZER_FILES[version]
    model = root / f"model_{version}"
    model.mkdir(parents=True, exist_ok=True)
    shutil.copy(tokenizer_path(version), model / tokenizer.filename)
    (model / "params.json").write_text(
        json.dumps(
            {
                "dim": 64,
                "n_layers": 2,
                "head_dim": 16,
                "hidden_dim": 128,
                "n_heads": 4,
                "n_kv_heads": 2,
                "norm_eps": 1e-5,
                "vocab_size": tokenizer.vocab_size,
                "rope_theta": 1e6,
            }
        )
    )
    return model


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {version: make_model_dir(root, version) for version in TOKENIZER_FILES}


@pytest.fixture(scope="session")
def tokenizers(model_dirs) -> dict:
    return {version: load_tokenizer(path) for version, path in model_dirs.items()}


@pytest.fixture
def write_jsonl():
    return _write_jsonl


@pytest.fixture
def chat():
    return _chat


def _write_jsonl(path: Path, samples: list) -> Path:
    """Samples as JSON lines; a str item is written as the raw line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for s in samples:
            f.write((s if isinstance(s, str) else json.dumps(s)) + "\n")
    return path


def _chat(i: int, turns: int = 1, words: int = 5) -> dict:
    """A small distinct conversation: sample i."""
    messages = []
    for t in range(turns):
        messages.append({"role": "user", "content": f"question {i}.{t} " + "word " * words})
        messages.append({"role": "assistant", "content": f"answer {i}.{t} " + "reply " * words})
    return {"messages": messages}
