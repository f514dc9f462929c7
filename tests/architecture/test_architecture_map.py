"""docs/architecture.md is the map of the house: it names every module of the product (any .py under finetune/ and
model/, and train.py), and nothing else. An empty __init__.py only marks a package and needs no line. The README's
Layout, the user's short map, names every folder of finetune/ and no path that does not exist."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MAP = REPO / "docs" / "architecture.md"
MODULE_PATH = re.compile(r"(?<![\w/.])((?:finetune|model)/[\w/]*\w\.py|train\.py)\b")


def modules_in_tree() -> set[str]:
    found = {"train.py"}
    for package in ("finetune", "model"):
        for path in (REPO / package).rglob("*.py"):
            if path.name == "__init__.py" and not path.read_text(encoding="utf-8").strip():
                continue
            found.add(path.relative_to(REPO).as_posix())
    return found


def modules_on_map(text: str) -> set[str]:
    return set(MODULE_PATH.findall(text))


def test_the_map_names_every_module_and_only_modules_that_exist():
    in_tree, on_map = modules_in_tree(), modules_on_map(MAP.read_text(encoding="utf-8"))
    assert len(in_tree) > 50
    missing, stale = sorted(in_tree - on_map), sorted(on_map - in_tree)
    assert not missing, f"modules docs/architecture.md does not name (add a line for each): {missing}"
    assert not stale, f"docs/architecture.md names modules that do not exist (remove or rename them): {stale}"


def test_a_module_path_is_read_from_the_map_as_written():
    text = "`finetune/data/cache.py` and model/lora.py, train.py; not benchmarks/train_throughput.py or a/model/x.py"
    assert modules_on_map(text) == {"finetune/data/cache.py", "model/lora.py", "train.py"}


def test_the_entry_points_point_at_the_map():
    assert "docs/architecture.md" in (REPO / "train.py").read_text(encoding="utf-8")
    assert "docs/architecture.md" in (REPO / "README.md").read_text(encoding="utf-8")


def readme_layout() -> list[str]:
    """The paths that begin the lines of the README's Layout block."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index("\n## Layout\n") :]
    block = section[section.index("```\n") + 4 :]
    block = block[: block.index("```")]
    return [line.split()[0] for line in block.splitlines() if line and not line.startswith(" ")]


def test_the_readme_layout_names_every_folder_of_the_product_and_only_paths_that_exist():
    listed = readme_layout()
    assert [path for path in listed if not (REPO / path).exists()] == []
    packages = [f"finetune/{p.name}/" for p in (REPO / "finetune").iterdir() if (p / "__init__.py").exists()]
    assert len(packages) >= 4
    assert sorted({*packages, "model/", "train.py", "docs/architecture.md"} - set(listed)) == []
