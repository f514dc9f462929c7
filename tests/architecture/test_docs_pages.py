"""The README is the front door and docs/ the rooms behind it: every page is reached from the README, every link of
both lands on a file and a heading that exist, every `tailor` command and every exit code is documented."""

import re
from pathlib import Path

from finetune import exit_codes
from finetune.cli import COMMANDS

REPO = Path(__file__).resolve().parents[2]
PAGES = sorted((REPO / "docs").glob("*.md"))
LINK = re.compile(r"\]\(([^)\s]+)\)")


def heading_anchors(markdown: str) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    anchors, in_fence = set(), False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_fence = not in_fence
        elif not in_fence and (match := re.match(r"#{1,6} (.*)", line)):
            anchors.add(re.sub(r"[^\w\- ]", "", match.group(1).lower()).replace(" ", "-"))
    return anchors


def local_links(page: Path) -> list[str]:
    return [link for link in LINK.findall(page.read_text(encoding="utf-8")) if "://" not in link]


def test_heading_anchors_follow_githubs_rule():
    page = "# Resume, preemption, bad numbers\n```\n# not a heading\n```\n## The model package (`model/`)\n"
    assert heading_anchors(page) == {"resume-preemption-bad-numbers", "the-model-package-model"}


def test_every_docs_page_is_linked_from_the_readme():
    readme_links = set(local_links(REPO / "README.md"))
    assert len(PAGES) >= 10
    assert [p.name for p in PAGES if f"docs/{p.name}" not in readme_links] == []


def test_every_local_link_lands_on_a_file_and_a_heading():
    broken = []
    for page in [REPO / "README.md", *PAGES]:
        for link in local_links(page):
            path, _, anchor = link.partition("#")
            target = (page.parent / path).resolve() if path else page
            if not target.exists():
                broken.append(f"{page.name}: {link}")
            elif anchor and target.suffix == ".md" and anchor not in heading_anchors(target.read_text("utf-8")):
                broken.append(f"{page.name}: {link} (no such heading)")
    assert broken == []


def test_every_tailor_command_is_documented():
    text = "\n".join(p.read_text(encoding="utf-8") for p in [REPO / "README.md", *PAGES])
    assert [name for name, *_ in COMMANDS if f"tailor {name}" not in text] == []


def test_every_exit_code_is_in_the_errors_table():
    table = (REPO / "docs" / "errors.md").read_text(encoding="utf-8")
    codes = {value for name, value in vars(exit_codes).items() if name.isupper() and isinstance(value, int)}
    assert len(codes) >= 8
    assert sorted(code for code in codes if f"\n| {code} |" not in table) == []
