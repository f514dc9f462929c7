"""A config's mapping (read from YAML, or a run's record) built into a TrainConfig, strictly: every key checked against
the dataclasses (an unknown key is an error with a "did you mean"), every value against its field's type, naming the
key; then the values checked together (finetune/config/checks.py) and `~` expanded in paths.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import reprlib
import types
import typing
from typing import Any, Literal

from finetune.config.checks import check_config
from finetune.config.schema import ConfigError, TrainConfig
from finetune.data.config import DataSource

MAX_INT = 2**31 - 1  # beyond any step count, length or size a run can have: a typo, or an overflow further on


def refuse_secrets(raw: dict, source: str) -> None:
    """Refuse an API key in a config's mapping; drop an empty one.

    A key would be copied into run_dir/config.yaml and the trackers' run parameters: W&B reads its key from the
    environment instead. An empty key (mistral-finetune's `key: ""`) holds no secret.

    Raises:
        ConfigError: logging.wandb.key holds a key.
    """
    wandb = raw.get("logging", {}).get("wandb") if isinstance(raw.get("logging"), dict) else None
    if isinstance(wandb, dict) and "key" in wandb:
        if wandb["key"]:
            raise ConfigError(
                f"{source}: logging.wandb.key: an API key is not read from a config, where it would be saved in "
                "run_dir/config.yaml and sent with the run's settings; remove it and set the WANDB_API_KEY "
                "environment variable (or run `wandb login` once)"
            )
        wandb.pop("key")


def config_from_dict(raw: dict, source: str = "config") -> TrainConfig:
    """Build a checked TrainConfig from a config's mapping (read from YAML, or a run's record).

    Args:
        source: what errors name first (the config file).

    Raises:
        ConfigError: an unknown key, a value of the wrong type, or values that do not go together, naming the key.
    """
    if isinstance(raw.get("resume"), bool):  # YAML reads `resume: false` as a boolean; true means auto
        raw = dict(raw, resume="auto" if raw["resume"] else "false")
    refuse_secrets(raw, source)
    cfg = _build(TrainConfig, raw, prefix="", source=source)
    check_config(cfg, source)
    _expand_home(cfg)
    return cfg


def _expand_home(cfg: TrainConfig) -> None:
    """`~` and `~user` at the start of every path of the config mean the home folder, as in a shell, for training and
    `tailor validate` alike (and in run_dir/config.yaml): never a folder named `~`."""
    cfg.run_dir = os.path.expanduser(cfg.run_dir)
    cfg.model.path = os.path.expanduser(cfg.model.path)
    for source in [*cfg.data.train, *cfg.data.eval]:
        source.path = os.path.expanduser(source.path)
    if cfg.data.cache_dir:
        cfg.data.cache_dir = os.path.expanduser(cfg.data.cache_dir)
    if cfg.resume not in ("auto", "false"):
        cfg.resume = os.path.expanduser(cfg.resume)


def _build(cls, raw: Any, prefix: str, source: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'top level'} must be a mapping, got {shown(raw)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in raw.items():
        if key not in names:
            raise ConfigError(f"{source}: unknown key '{prefix}{key}'{_suggest(key, names, prefix)}")
        values[key] = _convert(value, hints[key], f"{prefix}{key}", source)
    try:
        return cls(**values)
    except ValueError as e:  # a section that checks its own values (model.lora.LoRAArgs) names the field first
        raise ConfigError(f"{source}: {prefix}{e}") from None


def shown(value: Any) -> str:
    """A value as an error quotes it: its repr, shortened past a few lines (a list of 100,000 paths is not quoted)."""
    return _SHORT_REPR.repr(value)


_SHORT_REPR = reprlib.Repr()  # Python 3.11's takes no arguments
_SHORT_REPR.maxlevel, _SHORT_REPR.maxstring, _SHORT_REPR.maxother = 4, 300, 300
_SHORT_REPR.maxdict = _SHORT_REPR.maxlist = _SHORT_REPR.maxtuple = 20


def _suggest(key: str, names: list[str], prefix: str) -> str:
    close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
    if close:
        return f"; did you mean '{prefix}{close[0]}'?"
    return f"; known keys here: {', '.join(names)}"


def _convert(value: Any, hint: Any, key: str, source: str):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        if hint is DataSource:
            return _data_source(value, key, source)
        return _build(hint, value, prefix=f"{key}.", source=source)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(value, inner, key, source)
    if origin is Literal:
        if value not in args:
            choices = " | ".join(str(a) for a in args)
            raise ConfigError(f"{source}: {key} is {shown(value)}; expected one of {choices}")
        return value
    if origin in (list, tuple):  # tuple[X, ...] is a list in YAML
        inner = args[0]
        if inner is DataSource:
            return parse_data_sources(value, key, source)
        if not isinstance(value, list):
            example = f" in brackets, e.g. [{value}]" if isinstance(value, str) else ""
            raise ConfigError(f"{source}: {key} must be a list{example}, got {shown(value)}")
        return origin(_convert(v, inner, f"{key}[{i}]", source) for i, v in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key} must be true or false, got {shown(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {key} must be an integer, got {shown(value)}")
        if abs(value) > MAX_INT:
            raise ConfigError(f"{source}: {key} is {value}; no setting here takes a number beyond {MAX_INT:,}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML reads 6e-5 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {key} must be a number, got {shown(value)}")
        if not math.isfinite(value):  # .inf or .nan in YAML: accepted, they train nothing but non-finite numbers
            raise ConfigError(f"{source}: {key} must be a finite number, got {value}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {key} must be a string, got {shown(value)}")
        return value
    raise TypeError(f"unsupported config type {hint} for {key}")


def parse_data_sources(value: Any, key: str, source: str = "config") -> list[DataSource]:
    """Data sources from a list of {path, weight}, one path, or mistral-finetune's "a.jsonl:2,b.jsonl:1".

    Raises:
        ConfigError: naming `key`: another kind of value, an empty path, or a weight that is not > 0.
    """
    if value is None or value == "":
        return []
    if isinstance(value, str):
        sources = []
        for part in (p.strip() for p in value.split(",")):
            if not part:
                continue
            path, sep, weight = part.rpartition(":")
            if sep and _is_number(weight):
                sources.append(DataSource(path, float(weight)))
            else:
                sources.append(DataSource(part))
        return [_data_source(s, key, source) for s in sources]
    if isinstance(value, list):
        return [_data_source(v, f"{key}[{i}]", source) for i, v in enumerate(value)]
    raise ConfigError(f"{source}: {key} must be a list of {{path, weight}} or a 'file:weight,...' string")


def _data_source(value: Any, key: str, source: str) -> DataSource:
    if isinstance(value, DataSource):
        ds = value
    elif isinstance(value, str):
        ds = DataSource(value)
    else:
        ds = _build(DataSource, value, prefix=f"{key}.", source=source)
    if not ds.path:
        raise ConfigError(f"{source}: {key} has an empty path")
    if not ds.weight > 0:
        raise ConfigError(f"{source}: {key} ({ds.path}) has weight {ds.weight}; weights must be > 0")
    return ds


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False
