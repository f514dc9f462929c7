"""The rules of the house that are about imports, checked where they matter: at run time, in a fresh interpreter,
and over every import statement (lazy ones inside functions included).

- `model/` imports nothing from `finetune/`: the model is usable alone, for inference and export.
- `finetune/data/` imports nothing from `model/`, nor the config (which names the model's settings), not even for
  types: data knows the tokenizer, never the network; what needs the whole config is in `finetune/planning/`.
- `finetune/planning/` (validate's orchestration, epochs, ETA, memory estimate) imports nothing of the loop
  (`finetune/training/`), not even for types: the loop uses the plan, never the other way round.
- `finetune/after/` (merge, export, chat, ...) loads nothing from `finetune/training/`: it reads what training left.
- `finetune/checkpoints/` (what a checkpoint is) imports nothing of `finetune/` outside itself, not even for types:
  the loop (`finetune/training/`) builds on it, never the other way round. Two exceptions, narrow, each a leaf that
  imports nothing but the standard library: the atomic writer `finetune/atomic_files.py`, shared by checkpoints,
  data, training and the commands after it, and the exit codes `finetune/exit_codes.py`, which every error a user can
  cause names its code from.
- No import cycle between modules, even through an import inside a function. Imports under `if TYPE_CHECKING:`
  never run and are left out.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("finetune", "model")
ATOMIC_WRITER = "finetune.atomic_files"
LEAVES = (ATOMIC_WRITER, "finetune.exit_codes")  # what checkpoints/ may import of finetune/ outside itself


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def product_modules() -> list[str]:
    return sorted(module_name(p) for package in PACKAGES for p in (REPO / package).rglob("*.py"))


def loaded_after(statement: str, prefixes: tuple[str, ...] = PACKAGES) -> list[str]:
    """The modules of this repository (or under `prefixes`) in sys.modules after running `statement` in a fresh
    interpreter."""
    code = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(REPO), "PATH": ""},
    )
    return [
        m for m in json.loads(result.stdout) if m == prefixes or m.split(".")[0] in prefixes or m.startswith(prefixes)
    ]


def test_importing_the_data_path_loads_no_model_module():
    data_modules = [m for m in product_modules() if m.startswith("finetune.data")]
    assert len(data_modules) > 10
    loaded = loaded_after("\n".join(f"import {m}" for m in data_modules))
    assert set(data_modules) <= set(loaded)
    assert [m for m in loaded if m.split(".")[0] == "model"] == []
    assert [m for m in loaded_after("import finetune.data") if m.split(".")[0] == "model"] == []


def test_the_data_path_imports_neither_the_model_nor_the_config_not_even_for_types():
    graph = import_graph(every_import)
    data_modules = [m for m in graph if m.startswith("finetune.data")]
    assert len(data_modules) > 10
    outside = {
        m: sorted(t for t in graph[m] if t.split(".")[0] == "model" or t.startswith("finetune.config"))
        for m in data_modules
    }
    assert {m: targets for m, targets in outside.items() if targets} == {}
    assert "finetune.config" in graph["finetune.planning.epochs"]  # the config is seen where it is imported


def test_the_plan_imports_nothing_of_the_loop_not_even_for_types():
    graph = import_graph(every_import)
    planning_modules = [m for m in graph if m.startswith("finetune.planning.")]
    assert len(planning_modules) >= 4
    outside = {m: sorted(t for t in graph[m] if t.startswith("finetune.training")) for m in planning_modules}
    assert {m: targets for m, targets in outside.items() if targets} == {}


def test_importing_the_model_loads_nothing_from_finetune():
    model_modules = [m for m in product_modules() if m.startswith("model")]
    loaded = loaded_after("\n".join(f"import {m}" for m in model_modules))
    assert set(model_modules) <= set(loaded)
    assert [m for m in loaded if m.split(".")[0] == "finetune"] == []


def test_the_commands_after_training_load_nothing_of_the_training_loop():
    """finetune/after/ reads what training left (checkpoints, model folders): a change to the loop cannot break it."""
    after_modules = [m for m in product_modules() if m.startswith("finetune.after.")]
    loaded = loaded_after("\n".join(f"import {m}" for m in after_modules))
    assert set(after_modules) <= set(loaded) and len(after_modules) > 5
    assert [m for m in loaded if m.startswith("finetune.training")] == []


def test_checkpoints_import_nothing_of_the_loop_or_the_data_not_even_for_types():
    graph = import_graph(every_import)
    checkpoint_modules = [m for m in graph if m.startswith("finetune.checkpoints.")]
    assert len(checkpoint_modules) > 5
    outside = {
        m: sorted(
            t
            for t in graph[m]
            if t.startswith("finetune.") and not t.startswith("finetune.checkpoints") and t not in LEAVES
        )
        for m in checkpoint_modules
    }
    assert {m: targets for m, targets in outside.items() if targets} == {}
    # type-only imports count here: loss_scale names Progress for its annotations only
    assert "finetune.training.train_state" in graph["finetune.training.loss_scale"]
    assert "finetune.training.train_state" not in import_graph()["finetune.training.loss_scale"]


def test_the_atomic_writer_and_the_exit_codes_are_leaves_of_the_standard_library_alone():
    """What lets checkpoints/ (and everything else) import them without importing anything else."""
    for leaf in LEAVES:
        tree = ast.parse((REPO / (leaf.replace(".", "/") + ".py")).read_text(encoding="utf-8"))
        imported = {
            (a.name if isinstance(n, ast.Import) else "." * n.level + (n.module or "")).split(".")[0] or "(relative)"
            for n in every_import(tree)
            for a in n.names
        }
        assert imported - {"__future__"} <= set(sys.stdlib_module_names), imported - set(sys.stdlib_module_names)
    assert "finetune.atomic_files" in import_graph()["finetune.checkpoints.manifest"]


def test_importing_the_checkpoint_folders_loads_no_data_loop_or_distributed_machinery():
    before = set(loaded_after("import torch", prefixes=("torch.distributed",)))
    loaded = loaded_after(
        "import torch\nimport finetune.checkpoints.folders", prefixes=(*PACKAGES, "torch.distributed")
    )
    assert "finetune.checkpoints.folders" in loaded
    assert [m for m in loaded if m.startswith(("finetune.data", "finetune.training", "finetune.config"))] == []
    assert [m for m in loaded if m.startswith("torch.distributed") and m not in before] == []


def test_importing_the_model_package_loads_only_what_is_asked_for():
    # model.lora and the settings it implements (LoRAArgs), nothing else of the package
    assert loaded_after("import model.lora") == ["model", "model.lora", "model.settings"]


def imports_that_run(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, at the top or inside a function, except those under `if TYPE_CHECKING:`."""
    found = []
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            found += [n for child in node.orelse for n in imports_that_run(ast.Module([child], []))]
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        found += imports_that_run(node)
    return found


def every_import(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, those under `if TYPE_CHECKING:` included."""
    return [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]


def import_graph(imports=imports_that_run) -> dict[str, set[str]]:
    """module -> the modules of this repository it imports, at the top or inside a function (`imports` picks the
    statements: those that run, or `every_import`)."""
    modules = set(product_modules())
    graph = {}
    for module in modules:
        path = REPO / Path(*module.split("."))
        path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        edges = set()
        for node in imports(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            edges |= {t for t in targets if t in modules and t != module}
        graph[module] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_even_a_lazy_one():
    graph = import_graph()
    assert graph["finetune.training.model_setup"] >= {"finetune.training.parallel", "model.weights"}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_no_import_cycle_even_through_type_only_imports():
    graph = import_graph(every_import)
    assert graph["finetune.data.tokenize"] >= {"finetune.data.plain_chat"}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_lazy_imports_count_and_type_only_ones_do_not():
    tree = ast.parse("import a\nif TYPE_CHECKING:\n    import b\nelse:\n    import c\ndef f():\n    from d import e\n")
    assert [ast.unparse(n) for n in imports_that_run(tree)] == ["import a", "import c", "from d import e"]
