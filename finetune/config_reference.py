"""docs/config.md's reference, generated from the dataclasses of the config (finetune/config/schema.py, with its data
section in finetune/data/config.py and its lora section in model/settings.py).

    python -m finetune.config_reference docs/config.md      rewrite the table between the page's markers

One row per key: its dotted name, type, default, and meaning. The meaning is the field's comment in the schema
(on its line, or the comment lines just above it), so the schema and its documentation are written once, side
by side; tests/train/test_config_reference.py fails when the page's table is stale or a field has no comment.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import sys
import textwrap
import tokenize
import types
import typing
from pathlib import Path
from typing import Literal

from finetune.config import TrainConfig

START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"
TYPE_NAMES = {str: "string", int: "integer", float: "number", bool: "true / false"}


def field_comments(cls: type) -> dict[str, str]:
    """{field name: its comment} for a dataclass, read from its source.

    A field's comment is the comment lines just above it, then the comment on its line; "" for a field with neither.
    """
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    comments = {
        token.start[0]: token.string.lstrip("#").strip()
        for token in tokenize.generate_tokens(io.StringIO(source).readline)
        if token.type == tokenize.COMMENT
    }
    result = {}
    for node in ast.parse(source).body[0].body:
        if not isinstance(node, ast.AnnAssign):
            continue
        above, line = [], node.lineno - 1
        while line in comments and lines[line - 1].lstrip().startswith("#"):
            above.insert(0, comments[line])
            line -= 1
        result[node.target.id] = " ".join(above + [comments.get(node.lineno, "")]).strip()
    return result


def config_rows(cls: type = TrainConfig, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, meaning) of every field of `cls`, keys dotted after `prefix`.

    A section's own keys come first, then its sub-sections, each after a row of its own; a list of sub-records
    (data.train) is followed by rows of their fields (data.train[].path).
    """
    hints, comments = typing.get_type_hints(cls), field_comments(cls)
    keys, sections = [], []
    for f in dataclasses.fields(cls):
        key, hint = prefix + f.name, hints[f.name]
        if dataclasses.is_dataclass(hint):
            sections += [(key, "section", "", comments[f.name]), *config_rows(hint, key + ".")]
            continue
        keys.append((key, type_name(hint), default_text(f), comments[f.name]))
        if typing.get_origin(hint) is list and dataclasses.is_dataclass(typing.get_args(hint)[0]):
            keys += config_rows(typing.get_args(hint)[0], key + "[].")
    return keys + sections


def type_name(hint) -> str:
    """A field's type as the reference names it: `integer`, `a / b` for a Literal, `X or null`, `list of Xs`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return " / ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        (inner,) = [a for a in args if a is not type(None)]
        return f"{type_name(inner)} or null"
    if origin in (list, tuple):  # tuple[X, ...] is a list in YAML
        item = args[0]
        if dataclasses.is_dataclass(item):
            return "list of {" + ", ".join(f.name for f in dataclasses.fields(item)) + "}"
        return f"list of {type_name(item)}s"
    return TYPE_NAMES[hint]


def default_text(f: dataclasses.Field) -> str:
    """The default as it is written in YAML."""
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
        return "required"
    value = f.default_factory() if f.default is dataclasses.MISSING else f.default
    if isinstance(value, (list, tuple)):
        return "`[" + ", ".join(str(v) for v in value) + "]`"
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value}`" if value != "" else '`""`'


def render_config_reference() -> str:
    """The reference as a Markdown table: one row per key, sections in bold."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, kind, default, meaning in config_rows():
        meaning = meaning.replace("|", "\\|")  # a bare | would end the table cell
        if kind == "section":
            lines.append(f"| **`{key}`** | section | | {meaning} |")
        else:
            lines.append(f"| `{key}` | {kind} | {default} | {meaning} |")
    return "\n".join(lines)


def marked_block(page_text: str) -> str:
    """What stands between the markers (stripped).

    Raises:
        ValueError: the page lacks a marker.
    """
    if START not in page_text or END not in page_text:
        raise ValueError(f"the page has no {START} ... {END} block")
    return page_text.split(START, 1)[1].split(END, 1)[0].strip()


def write_reference(path: Path) -> bool:
    """Replace the page's block with the current reference; True when it changed.

    Raises:
        ValueError: the page lacks a marker.
    """
    text = path.read_text(encoding="utf-8")
    old = marked_block(text)
    new = render_config_reference()
    if old == new:
        return False
    head, rest = text.split(START, 1)
    path.write_text(f"{head}{START}\n{new}\n{END}{rest.split(END, 1)[1]}", encoding="utf-8")
    return True


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__)
        sys.exit(2)
    page = Path(sys.argv[1])
    print(f"{page}: {'updated' if write_reference(page) else 'already up to date'}")
