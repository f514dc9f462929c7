"""docs/config.md's config reference is the one generated from finetune/config/, and documents every key."""

import ast
import dataclasses
import inspect
import re
import typing
from pathlib import Path

from finetune.config import TrainConfig, translate_mistral_finetune_keys
from finetune.config_reference import (
    END,
    START,
    config_rows,
    field_comments,
    marked_block,
    render_config_reference,
    write_reference,
)

CONFIG_PAGE = Path(__file__).resolve().parents[2] / "docs" / "config.md"


def all_dataclasses(cls=TrainConfig) -> set[type]:
    found = {cls}
    for hint in typing.get_type_hints(cls).values():
        for inner in (hint, *typing.get_args(hint)):
            if dataclasses.is_dataclass(inner):
                found |= all_dataclasses(inner)
    return found


def test_config_page_holds_the_generated_reference():
    assert marked_block(CONFIG_PAGE.read_text(encoding="utf-8")) == render_config_reference(), (
        "docs/config.md's config reference is stale: run `python -m finetune.config_reference docs/config.md`"
    )


def test_write_reference_replaces_only_the_block(tmp_path):
    page = tmp_path / "config.md"
    page.write_text(f"# x\n\nbefore\n\n{START}\n| old | table |\n{END}\n\nafter\n")
    assert write_reference(page)
    assert page.read_text() == f"# x\n\nbefore\n\n{START}\n{render_config_reference()}\n{END}\n\nafter\n"
    assert not write_reference(page)


def test_every_field_has_a_comment():
    classes = all_dataclasses()
    assert {c.__name__ for c in classes} >= {"TrainConfig", "DataSource", "WandbConfig", "MlflowConfig"}
    undocumented = [f"{c.__name__}.{name}" for c in classes for name, text in field_comments(c).items() if not text]
    assert not undocumented, f"add a comment (its meaning, for the docs) to these fields in schema.py: {undocumented}"
    assert {f.name for c in classes for f in dataclasses.fields(c)} == {
        name for c in classes for name in field_comments(c)
    }


def test_comments_are_read_from_their_line_and_the_lines_above():
    @dataclasses.dataclass
    class Example:
        a: int = 1  # on the line
        # above,
        # on two lines
        b: int = 2
        # above
        c: int = 3  # and on the line
        d: int = 4

    assert field_comments(Example) == {
        "a": "on the line",
        "b": "above, on two lines",
        "c": "above and on the line",
        "d": "",
    }


def test_rows_carry_types_and_yaml_defaults():
    rows = {key: (kind, default) for key, kind, default, _ in config_rows()}
    assert rows["model.dtype"] == ("bf16 / fp32 / fp16 / auto", "`bf16`")
    assert rows["optim.warmup_steps"] == ("integer or null", "`null`")
    assert rows["lora.targets"] == ("list of strings", "`[wq, wk, wv, wo, w1, w2, w3]`")
    assert rows["data.train"] == ("list of {path, weight}", "`[]`")
    assert rows["data.train[].path"] == ("string", "required")
    assert rows["logging.wandb"] == ("section", "")
    assert rows["eval.enabled"] == ("true / false", "`true`")


def mistral_finetune_moves() -> list[tuple[str, str]]:
    """(old, new) of every `move(old, new)` in translate_mistral_finetune_keys."""
    tree = ast.parse(inspect.getsource(translate_mistral_finetune_keys))
    return [
        (node.args[0].value, node.args[1].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "move"
    ]


def test_every_mistral_finetune_key_is_documented_where_it_lands():
    moves = mistral_finetune_moves()
    assert ("model_id_or_path", "model.path") in moves and len(moves) >= 10
    meanings = {key: meaning for key, _, _, meaning in config_rows()}
    for old, new in moves:
        # a key, or a section whose keys name the old section (wandb -> logging.wandb: `wandb.project`)
        mentioned = [k for k, m in meanings.items() if (k == new or k.startswith(new + ".")) and f"`{old}" in m]
        assert mentioned, f"mistral-finetune's `{old}` becomes {new}, but no meaning under {new} mentions it"


def sample_value(hint):
    """A valid YAML value for a key of this type."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return args[0]
    if origin is not None and type(None) in args:
        return sample_value(next(a for a in args if a is not type(None)))
    if origin is list:
        return "a.jsonl" if dataclasses.is_dataclass(args[0]) else []
    return {bool: True, int: 2, float: 2.0, str: "x"}[hint]


def hint_of(key: str):
    cls, hint = TrainConfig, None
    for part in key.split("."):
        hint = typing.get_type_hints(cls)[part]
        cls = hint
    return hint


def test_documented_mistral_finetune_keys_land_on_their_key():
    checked = 0
    for key, kind, _, meaning in config_rows():
        match = re.search(r"\(mistral-finetune: ((?:`[^`]+`(?:, )?)+)", meaning)
        if kind == "section" or not match:
            continue
        for alias in re.findall(r"`([^`]+)`", match.group(1)):
            *parents, leaf = alias.split(".")
            raw = node = {}
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = sample_value(hint_of(key))
            translated = translate_mistral_finetune_keys(raw)
            *sections, name = key.split(".")
            for part in sections:
                translated = translated.get(part, {})
            assert name in translated, f"mistral-finetune's `{alias}` should set {key}"
            checked += 1
    assert checked >= 20
