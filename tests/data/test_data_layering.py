"""House rule: finetune/data/ never imports from model/ (data knows the tokenizer, never the network)."""

from __future__ import annotations

import ast
from pathlib import Path

import finetune.data


def test_data_package_does_not_import_model():
    for path in Path(finetune.data.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n == "model" or n.startswith("model.") for n in names), f"{path.name} imports {names}"
