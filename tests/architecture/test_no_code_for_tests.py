"""No code for tests in the product: every function, class and method defined under finetune/ and model/ is used by
the product itself (train.py, finetune/, model/, or the benchmarks), not only by tests. Tests reach in through their
own seams: monkeypatching, or a hook that wraps a function in a process they start (tests/train/launching.py).

Names are matched, not call graphs: a function counts as used when its name appears anywhere in the product's code
outside its own definition. That misses a test-only function whose name is also a common word, but never blames one
the product calls.
"""

import ast
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# called by PyTorch, not by name in tailor's code
CALLED_BY_FRAMEWORKS = {"forward", "extra_repr"}


def product_files(root: Path) -> list[Path]:
    return [root / "train.py", *(root / "finetune").rglob("*.py"), *(root / "model").rglob("*.py")]


def definitions(root: Path, files: list[Path]) -> list[tuple[str, str]]:
    found = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                found.append((path.relative_to(root).as_posix(), node.name))
    return found


def names_used(files: list[Path]) -> Counter:
    """Every name a piece of code refers to: variables, attributes, imports, and the `module:function` strings of
    finetune/cli.py's table. A definition's own name is not a use of it."""
    used = Counter()
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Name):
                used[node.id] += 1
            elif isinstance(node, ast.Attribute):
                used[node.attr] += 1
            elif isinstance(node, ast.alias):
                used[node.name.rpartition(".")[2]] += 1
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                used.update(node.value.replace(":", " ").replace(".", " ").split())
    return used


def used_only_by_tests(root: Path) -> list[str]:
    product = product_files(root)
    used = names_used(product + sorted((root / "benchmarks").glob("*.py")))
    return sorted(
        f"{path}: {name}"
        for path, name in definitions(root, product)
        if not (name.startswith("__") and name.endswith("__")) and name not in CALLED_BY_FRAMEWORKS and not used[name]
    )


def test_the_product_defines_nothing_that_only_tests_use():
    unused = used_only_by_tests(REPO)
    assert not unused, f"defined in the product but used only by tests (or by nothing): {unused}"


def test_a_function_only_tests_call_is_found(tmp_path):
    (tmp_path / "finetune").mkdir()
    (tmp_path / "model").mkdir()
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "train.py").write_text("from finetune.a import used\nused()\n")
    (tmp_path / "finetune" / "a.py").write_text(
        "def used():\n    return helper()\ndef helper():\n    pass\ndef for_tests():\n    pass\n"
        "class Thing:\n    def forward(self):\n        pass\n    def probe(self):\n        pass\n"
    )
    (tmp_path / "model" / "b.py").write_text("COMMANDS = ['finetune.a:Thing']\n")
    assert used_only_by_tests(tmp_path) == ["finetune/a.py: for_tests", "finetune/a.py: probe"]
