"""The tokenizer file that merge and the exports copy beside the weights they write."""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

from finetune.data.model_tokenizer import find_tokenizer_file


def copy_tokenizer(folders: Iterable[str | Path], out_dir: Path) -> None:
    """Copy the mistral-common tokenizer file of the first folder that has one into `out_dir`.

    Raises:
        ValueError: no folder has one.
    """
    for folder in folders:
        try:
            source = find_tokenizer_file(folder)
        except FileNotFoundError:
            continue
        shutil.copyfile(source, out_dir / source.name)
        return
    raise ValueError(f"no mistral-common tokenizer file (tokenizer.model.v*, tekken.json) in {list(map(str, folders))}")
