"""mistral-common's bundled tokenizer files (`mistral_common/data/`): which file a short name ("v1", "v3", "v7",
"tekken") means, the name it takes in a model folder, and its vocabulary. Tiny model folders (model/tiny.py) and
extend-vocab's v3 tokenizer are copies of them, so nothing is downloaded."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import mistral_common


class TokenizerFile(NamedTuple):
    """One tokenizer file bundled with mistral-common."""

    source: str  # file name in mistral_common/data/
    filename: str  # name written in the model folder
    vocab_size: int


TOKENIZER_FILES = {
    "v1": TokenizerFile("tokenizer.model.v1", "tokenizer.model.v1", 32000),
    "v3": TokenizerFile("mistral_instruct_tokenizer_240323.model.v3", "tokenizer.model.v3", 32768),
    "v7": TokenizerFile("mistral_instruct_tokenizer_241114.model.v7", "tokenizer.model.v7", 32768),
    "tekken": TokenizerFile("tekken_240911.json", "tekken.json", 131072),
}


def tokenizer_path(name: str) -> Path:
    """The bundled mistral-common file behind a short tokenizer name ("v1", "v3", "v7", "tekken").

    Raises:
        ValueError: an unknown name.
    """
    if name not in TOKENIZER_FILES:
        raise ValueError(f"unknown tokenizer {name!r}; expected one of {sorted(TOKENIZER_FILES)}")
    return Path(mistral_common.__file__).parent / "data" / TOKENIZER_FILES[name].source
