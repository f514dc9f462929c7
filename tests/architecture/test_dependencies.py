"""Every package the product imports is declared in pyproject.toml: one imported whenever its module is, in the
dependencies; one imported inside a function or a `try`, there or in an optional extra. Nothing arrives only
because another package happened to bring it."""

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import tomllib
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
FIRST_PARTY = {"finetune", "model", "__future__"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def distribution(module: str) -> str:
    """The distribution that installs a top-level module (its own name when it is not installed here)."""
    return canonical(importlib.metadata.packages_distributions().get(module, [module])[0])


def product_imports() -> dict[str, bool]:
    """Top-level module of every third-party import -> whether some module imports it unconditionally (a statement
    of the module's body, not in a function, a `try` or an `if`)."""
    found: dict[str, bool] = {}
    for path in [REPO / "train.py", *(REPO / "finetune").rglob("*.py"), *(REPO / "model").rglob("*.py")]:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        unconditional = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in FIRST_PARTY and top not in sys.stdlib_module_names:
                    found[top] = found.get(top, False) or id(node) in unconditional
    return found


def declared() -> tuple[set[str], set[str]]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    core = {canonical(Requirement(r).name) for r in project["dependencies"]}
    extras = {canonical(Requirement(r).name) for group in project["optional-dependencies"].values() for r in group}
    return core, extras


def test_every_imported_package_is_declared():
    imports, (core, extras) = product_imports(), declared()
    assert {"torch", "numpy", "tiktoken", "mistral_common", "yaml"} <= set(imports)
    missing = sorted(m for m, always in imports.items() if distribution(m) not in (core if always else core | extras))
    assert not missing, f"imported by finetune/, model/ or train.py but not declared in pyproject.toml: {missing}"


def test_imports_are_found_and_sorted_by_where_they_run(tmp_path, monkeypatch):
    (tmp_path / "train.py").write_text("import numpy as np\nfrom os import path\n")
    (tmp_path / "finetune").mkdir()
    (tmp_path / "finetune" / "a.py").write_text("try:\n    import xformers.ops\nexcept ImportError:\n    pass\n")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "b.py").write_text("from model.args import X\ndef f():\n    import matplotlib.pyplot\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    assert product_imports() == {"numpy": True, "xformers": False, "matplotlib": False}
