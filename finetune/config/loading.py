"""A config file read: YAML into a mapping (UTF-8, no key twice, bounded in size), `key=value` overrides applied,
mistral-finetune's keys translated, then built into a checked TrainConfig; and a config written back as YAML.

Command-line overrides use dotted keys (`optim.lr=3e-5 max_steps=50`); an error about a key an override set names
that override, any other the file.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path
from typing import Any

import yaml

from finetune.config.building import config_from_dict
from finetune.config.mistral_finetune import translate_mistral_finetune_keys
from finetune.config.schema import ConfigError, TrainConfig
from finetune.data.errors import first_line

MAX_YAML_VALUES = 100_000  # in a config or an override: a config holds a few hundred


def load_config(path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    """Read a YAML file, apply `key.sub=value` overrides, and return a checked TrainConfig.

    Raises:
        ConfigError: naming the file (or the override at fault) and the key: no such file, not UTF-8 YAML, an
            unknown key, a wrong value, max_steps and epochs both set.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    raw = read_yaml_mapping(path)
    try:
        raw = translate_mistral_finetune_keys(raw)
        for item in overrides:
            apply_override(raw, item)
        if "max_steps" in raw and raw["max_steps"] is None:  # `max_steps=null` on the command line hands over to epochs
            del raw["max_steps"]
        if raw.get("epochs") is not None and "max_steps" in raw:
            overridden = {item.partition("=")[0].strip() for item in overrides}
            key = "epochs" if "epochs" in overridden else "max_steps"  # the key at fault, for _blame_override
            raise ConfigError(
                f"{path}: {key}: max_steps and epochs are both set; keep one (epochs: N trains N passes over "
                "data.train, max_steps that many steps)"
            )
        return config_from_dict(raw, source=str(path))
    except ConfigError as error:
        raise _blame_override(error, str(path), overrides) from None


def read_yaml_mapping(path: Path) -> dict:
    """A YAML file's top-level mapping: UTF-8 (a leading byte-order mark is fine), no key twice in one mapping.

    Raises:
        ConfigError: naming the file (and line where known): unreadable, not UTF-8, not YAML, or not a mapping.
    """
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror or e})") from None
    if data.startswith((b"\xff\xfe", b"\xfe\xff")) or data[:2].count(0) == 1:
        raise ConfigError(f"{path}: the file is UTF-16, not UTF-8; save it as UTF-8")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x}); save the file as UTF-8"
        ) from None
    try:
        raw = load_yaml(text, str(path)) or {}
    except yaml.YAMLError as e:
        mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML: {problem or first_line(e)}") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid YAML: nested too deeply") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, not {type(raw).__name__}")
    return raw


def load_yaml(text: str, where: str) -> Any:
    """yaml.safe_load, with a key twice in one mapping an error and a bound on what the text stands for.

    Aliases let a few hundred bytes stand for billions of values (a "billion laughs"), which copying the value or
    quoting it in an error would expand.

    Raises:
        ConfigError: naming `where`, the text stands for more than MAX_YAML_VALUES values.
        yaml.YAMLError: not valid YAML, or a key twice in one mapping.
    """
    value = yaml.load(text, Loader=_UniqueKeyLoader)
    count, pending = 0, [value]
    while pending:  # every value counted each time it is reached, as a copy or a message would reach it
        node = pending.pop()
        count += 1
        if count > MAX_YAML_VALUES:
            raise ConfigError(
                f"{where}: the YAML stands for more than {MAX_YAML_VALUES:,} values (aliases repeating aliases?); a "
                "config holds a few hundred"
            )
        if isinstance(node, dict):
            pending += [*node.keys(), *node.values()]
        elif isinstance(node, list):
            pending += node
    return value


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice in one mapping is an error: YAML would keep the last silently;
    and merge keys (`<<: *anchor`) may not expand a mapping past MAX_YAML_VALUES pairs while it is built."""

    def flatten_mapping(self, node):
        super().flatten_mapping(node)
        if len(node.value) > MAX_YAML_VALUES:
            raise yaml.constructor.ConstructorError(
                None, None, f"merge keys (<<) expand a mapping past {MAX_YAML_VALUES:,} keys", node.start_mark
            )

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: its keys may be overridden, as YAML says
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, typing.Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping; keep one", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def _blame_override(error: ConfigError, source: str, overrides: list[str]) -> ConfigError:
    """An error about a key set on the command line names that override; any other names the YAML file. The key at
    fault is the one the message starts with (or its `unknown key '...'`): a key named further on (`run_dir` in
    "would be saved in run_dir/config.yaml") is not at fault."""
    if str(error).startswith("override "):
        return error
    message = str(error).removeprefix(f"{source}: ")
    match = re.match(r"unknown key '([^']+)'|([A-Za-z_][\w.]*)", message)
    faulty = (match[1] or match[2]) if match else None
    for item in overrides:
        key = item.partition("=")[0].strip()
        # optim=... sets optim.lr; optim.lr.x=... sets optim.lr to a mapping
        if faulty and (key == faulty or faulty.startswith(key + ".") or key.startswith(faulty + ".")):
            return ConfigError(f"override {item!r}: {message}")
    return ConfigError(f"{source}: {message}")


def apply_override(raw: dict, item: str) -> None:
    """Apply one override: `optim.lr=3e-5` sets raw["optim"]["lr"]; the value is parsed as YAML.

    Raises:
        ConfigError: naming the override: not key=value, a key under something that is not a section, or a value
            that is not valid YAML.
    """
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optim.lr=3e-5)")
    *parents, leaf = key.strip().split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part} is not a section")
    try:
        node[leaf] = load_yaml(value, f"override {item!r}") if value.strip() else ""
    except yaml.YAMLError:
        raise ConfigError(f"override {item!r}: the value is not valid YAML (quote it if it is a string)") from None
    translated = translate_mistral_finetune_keys(raw)
    raw.clear()
    raw.update(translated)


def config_to_dict(cfg: TrainConfig) -> dict:
    """The config as plain dicts and lists, as run_dir/config.yaml records it."""
    return dataclasses.asdict(cfg)


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write the config as YAML, in the schema's key order."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), encoding="utf-8")
