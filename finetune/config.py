"""The training configuration: one YAML file into nested dataclasses, strictly.

Every key is checked against the dataclasses below: an unknown key is an error with a "did you mean",
a wrong type or an impossible value is an error naming the key, all before any heavy work starts.
Command-line overrides use dotted keys (`optim.lr=3e-5 max_steps=50`). mistral-finetune's keys
(example/7B.yaml) are translated first, so its users' configs run unchanged.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import os
import re
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from finetune.data.config import DataConfig, DataSource
from finetune.data.errors import first_line
from model.settings import ALL_LINEAR, BACKENDS, INSTALL_HINT, LoRAArgs


class ConfigError(ValueError):
    """A user mistake in the configuration; the message names the key and the fault."""


MAX_SEQ_LEN = 2**20  # a packed batch holds seq_len tokens: a typo of a few digits would fill the host's memory
MAX_INT = 2**31 - 1  # beyond any step count, length or size a run can have: a typo, or an overflow further on
MAX_YAML_VALUES = 100_000  # in a config or an override: a config holds a few hundred
# Tokens per chunk of the chunked loss (finetune/training/loss.py), kept here so that the memory estimate of
# `tailor validate` reads it without torch. The loss holds two [chunk, vocab] fp32 tensors at a time and the
# unchunked loss three [tokens, vocab] ones, so at 1024 its memory is under 1/8 of the unchunked loss's from about
# 5,500 trained tokens on (the shipped configs train at 8192 to 32768 tokens a sequence; benchmarks/RESULTS.md),
# and a chunk is still a large matmul.
DEFAULT_CHUNK_SIZE = 1024


# Each field's meaning is the comment on its line or just above it: docs/config.md's reference is generated
# from these comments (finetune/config_reference.py), and a test fails on a field without one.


@dataclass
class ModelConfig:
    # required: the model folder, params.json + consolidated*.safetensors + a tokenizer file, or a Hugging Face
    # folder (mistral-finetune: `model_id_or_path`); or a hub id (`mistralai/Mistral-7B-Instruct-v0.3`, with
    # `pip install "tailor[hub]"`): downloaded once into the hub's cache, a folder of that name here winning
    path: str = ""
    # set by tailor when `path` was a hub id: that id, while `path` is recorded as its folder in the hub's cache
    hub_id: str = ""
    # frozen weights and compute: `bf16`; `fp16` for GPUs without bf16 (T4, V100), with dynamic loss scaling;
    # `fp32`; or `auto`: bf16 on a GPU that has it, else fp16, and fp32 on CPU. LoRA weights stay fp32
    dtype: Literal["bf16", "fp32", "fp16", "auto"] = "bf16"
    # `nf4`: QLoRA, every frozen attention and feed-forward weight stored in 4 bits (NormalFloat, torchao; install
    # with `pip install -e ".[qlora]"`) and dequantized per matmul; embeddings, norms and the head stay in `dtype`
    quantize: Literal["none", "nf4"] = "none"
    # `auto` picks the fastest available: `varlen` (flash attention) on a recent GPU, `sdpa` on CPU
    attention: Literal[("auto", *BACKENDS)] = "auto"
    # recompute each block in the backward pass: far less memory (mistral-finetune: `checkpoint`)
    activation_checkpointing: bool = True
    # what is recomputed: `block` (everything, the least memory) or `mlp` (attention activations are kept and only
    # the feed-forward is recomputed: selective checkpointing, more memory for less recomputation)
    checkpointing_scope: Literal["block", "mlp"] = "block"
    compile: bool = False  # `torch.compile` each block (with FSDP2 and checkpointing too)
    # with several GPUs: how many blocks ahead (forward) and behind (backward) to all-gather the sharded weights of,
    # while the current one computes; 2 hides more communication for one block's weights more memory
    fsdp_prefetch: int = 1


@dataclass
class OptimConfig:
    lr: float = 1e-4  # peak learning rate, reached at the end of the warmup
    min_lr: float = 0.0  # learning rate at the end of the cosine decay
    weight_decay: float = 0.1  # AdamW's, on the LoRA weights
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # AdamW's
    eps: float = 1e-8  # AdamW's
    max_grad_norm: float = 1.0  # gradients are clipped to this norm (mistral-finetune: `max_norm`)
    warmup_steps: int | None = None  # linear warmup steps; wins over warmup_fraction when set
    warmup_fraction: float = 0.05  # warmup as a share of max_steps (mistral-finetune: `optim.pct_start`)
    # steps in a row skipped for a non-finite loss or gradient before the run stops
    max_consecutive_nonfinite: int = 5
    # with model.dtype fp16: finite steps in a row after which the loss scale doubles (it halves on an overflow)
    loss_scale_growth_interval: int = 2000


@dataclass
class EvalConfig:
    enabled: bool = True  # evaluate on data.eval (mistral-finetune: `no_eval`, inverted)
    # steps between evaluations; there is always one at the end, and 0 means only there (mistral-finetune:
    # `eval_freq`)
    freq: int = 100
    max_batches: int | None = None  # evaluate on at most this many batches; null: the whole eval set
    # greedy answers to the first N chats of each eval and retain source at every eval, scored against the
    # reference answers (exact match; tool calls), in run_dir/eval_generations.jsonl; 0: none
    generate: int = 0
    # warn when the retain loss (data.retain) has risen by more than this share over the base model's
    retain_warn: float = 0.10


@dataclass
class CheckpointConfig:
    enabled: bool = True  # save checkpoints (mistral-finetune: `no_ckpt`, inverted)
    # steps between checkpoints; there is always one at the end, and 0 means only there (mistral-finetune:
    # `ckpt_freq`)
    freq: int = 100
    # the newest N intact checkpoints are kept; a damaged one is renamed aside (`.damaged`), never counted
    # (mistral-finetune: `num_ckpt_keep`)
    keep: int = 3
    # false: write the merged full model instead of the adapters (mistral-finetune: `save_adapters`)
    save_adapters: bool = True


@dataclass
class WandbConfig:
    project: str = ""  # W&B project; empty: W&B off (mistral-finetune: `wandb.project`)
    run_name: str = ""  # W&B run name; empty: W&B picks one (mistral-finetune: `wandb.run_name`)
    offline: bool = False  # log locally, sync later (mistral-finetune: `wandb.offline`)


@dataclass
class MlflowConfig:
    tracking_uri: str = ""  # MLflow server; empty: MLflow off (mistral-finetune: `mlflow.tracking_uri`)
    experiment_name: str = "tailor"  # MLflow experiment (mistral-finetune: `mlflow.experiment_name`)


@dataclass
class LoggingConfig:
    freq: int = 1  # steps between log lines and metrics.jsonl records (mistral-finetune: `log_freq`)
    tensorboard: bool = False  # TensorBoard events in run_dir/tensorboard
    wandb: WandbConfig = field(default_factory=WandbConfig)  # Weights & Biases, when installed
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)  # MLflow, when installed


@dataclass
class TrainConfig:
    run_dir: str = ""  # required: the folder of config.yaml, metrics.jsonl and checkpoints/
    model: ModelConfig = field(default_factory=ModelConfig)  # the base model
    data: DataConfig = field(default_factory=DataConfig)  # JSONL files, tokenized, packed
    lora: LoRAArgs = field(default_factory=LoRAArgs)  # the adapters (mistral-finetune's `lora.enable: true` too)
    optim: OptimConfig = field(default_factory=OptimConfig)  # AdamW, linear warmup then cosine decay
    eval: EvalConfig = field(default_factory=EvalConfig)  # eval loss, perplexity, token accuracy
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)  # adapters, and state for resume
    logging: LoggingConfig = field(default_factory=LoggingConfig)  # metrics.jsonl always, and trackers
    seed: int = 0  # data order and LoRA initialisation
    seq_len: int = 2048  # tokens per packed sequence
    batch_size: int = 1  # sequences of seq_len tokens per rank per micro-batch
    grad_accumulation: int = 1  # micro-batches per optimizer step (mistral-finetune: `num_microbatches`)
    max_steps: int = 100  # optimizer steps of the whole run; or set `epochs` instead (not both)
    # passes over data.train instead of max_steps (not both; a number, 1.5 too): the steps are computed from the
    # data's tokens (all train sources once = one epoch) and the tokens per step, rounded up, and printed before
    # step 1 as `epochs: N = S steps`; `tailor validate` prints the same
    epochs: float | None = None
    # `auto`: continue from the newest intact checkpoint in run_dir; `false`: refuse a run_dir that holds a run;
    # or a checkpoint folder to continue from
    resume: str = "auto"
    # resume on a base model other than the one the checkpoint was trained on (same shape, other weights): refused
    # unless true
    resume_other_base: bool = False


# ---------------------------------------------------------------------------------------------------
# Reading


def load_config(path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    """Read a YAML file, apply `key.sub=value` overrides, and return a checked TrainConfig."""
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
    """A YAML file's top-level mapping: UTF-8 (a leading byte-order mark is fine), no key twice in one mapping."""
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
    """yaml.safe_load with a key twice in one mapping an error, and a bound on what the text stands for: aliases let
    a few hundred bytes stand for billions of values (a "billion laughs"), which copying the value or quoting it in an
    error would expand. A ConfigError naming `where` when there are more than MAX_YAML_VALUES."""
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


def refuse_secrets(raw: dict, source: str) -> None:
    """An API key in a config would be copied into run_dir/config.yaml and the trackers' run parameters: W&B
    reads its key from the environment instead. An empty key (mistral-finetune's `key: ""`) holds no secret."""
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


def apply_override(raw: dict, item: str) -> None:
    """`optim.lr=3e-5` sets raw["optim"]["lr"]; the value is parsed as YAML (numbers, lists, booleans)."""
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


def _build(cls, raw: Any, prefix: str, source: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'top level'} must be a mapping, got {_shown(raw)}")
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


def _shown(value: Any) -> str:
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
            raise ConfigError(f"{source}: {key} is {_shown(value)}; expected one of {choices}")
        return value
    if origin in (list, tuple):  # tuple[X, ...] is a list in YAML
        inner = args[0]
        if inner is DataSource:
            return parse_data_sources(value, key, source)
        if not isinstance(value, list):
            example = f" in brackets, e.g. [{value}]" if isinstance(value, str) else ""
            raise ConfigError(f"{source}: {key} must be a list{example}, got {_shown(value)}")
        return origin(_convert(v, inner, f"{key}[{i}]", source) for i, v in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key} must be true or false, got {_shown(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {key} must be an integer, got {_shown(value)}")
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
            raise ConfigError(f"{source}: {key} must be a number, got {_shown(value)}")
        if not math.isfinite(value):  # .inf or .nan in YAML: accepted, they train nothing but non-finite numbers
            raise ConfigError(f"{source}: {key} must be a finite number, got {value}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {key} must be a string, got {_shown(value)}")
        return value
    raise TypeError(f"unsupported config type {hint} for {key}")


def parse_data_sources(value: Any, key: str, source: str = "config") -> list[DataSource]:
    """A list of {path, weight}, one path, or mistral-finetune's "a.jsonl:2,b.jsonl:1"."""
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


# ---------------------------------------------------------------------------------------------------
# mistral-finetune compatibility

# mistral-finetune's TrainArgs defaults (its finetune/args.py, finetune/data/args.py, model/args.py) where they
# differ from tailor's. A config of its, one with `model_id_or_path` (which TrainArgs requires), means what it meant
# there: no evaluation unless asked, eval and checkpoint only at the end, its learning rate, warmup and LoRA size.
MISTRAL_FINETUNE_DEFAULTS = [  # (its key, its default, tailor's keys that set the same and so win over the default)
    ("no_eval", True, ["eval.enabled"]),
    ("eval_freq", 0, ["eval.freq"]),
    ("ckpt_freq", 0, ["checkpoint.freq"]),
    ("optim.lr", 3e-4, []),
    ("optim.pct_start", 0.3, ["optim.warmup_fraction", "optim.warmup_steps"]),
    ("lora.rank", 16, []),
    ("lora.scaling", 2.0, ["lora.alpha"]),
]


def _has_key(raw: dict, dotted: str) -> bool:
    node = raw
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def is_mistral_finetune_config(raw: dict) -> bool:
    return "model_id_or_path" in raw


def translate_mistral_finetune_keys(raw: dict) -> dict:
    """Rewrite mistral-finetune's keys (every key of its TrainArgs) into tailor's; tailor's own keys pass through.
    What cannot mean the same here is refused, naming the key and the reason (docs/config.md)."""
    mistral_finetune = is_mistral_finetune_config(raw)
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    if mistral_finetune:
        for key, default, same in MISTRAL_FINETUNE_DEFAULTS:
            if not any(_has_key(raw, k) for k in [key, *same]):
                *sections, leaf = key.split(".")
                node = raw
                for section in sections:
                    node = node.setdefault(section, {})
                if isinstance(node, dict):  # a section of the wrong type is named by the checks later
                    node[leaf] = default

    def move(old: str, new: str, transform=lambda v: v) -> None:
        if old in raw:
            section, _, leaf = new.rpartition(".")
            target = raw.setdefault(section, {}) if section else raw
            if not isinstance(target, dict):
                raise ConfigError(
                    f"{section} must be a mapping (mistral-finetune's {old} goes in it), got {_shown(target)}"
                )
            target[leaf] = transform(raw.pop(old))

    def at_least_one_or_end(value):  # mistral-finetune: a frequency below 1 means "only at the end"
        return max(value, 0) if isinstance(value, int) and not isinstance(value, bool) else value

    def bounded_keep(value):
        if value is None:
            raise ConfigError(
                "num_ckpt_keep: null (keep every checkpoint) is not supported: each kept checkpoint holds the "
                "training state too; give a number, e.g. max_steps / ckpt_freq + 1 to keep them all"
            )
        return value

    if isinstance(raw.get("checkpoint"), bool):  # mistral-finetune: activation checkpointing on/off
        model = raw.setdefault("model", {})
        if not isinstance(model, dict):
            raise ConfigError(
                f"model must be a mapping (mistral-finetune's checkpoint goes in it), got {_shown(model)}"
            )
        model["activation_checkpointing"] = raw.pop("checkpoint")
    move("model_id_or_path", "model.path")
    move("num_microbatches", "grad_accumulation")
    move("max_norm", "optim.max_grad_norm")
    move("log_freq", "logging.freq")
    move("eval_freq", "eval.freq", at_least_one_or_end)
    move("no_eval", "eval.enabled", lambda v: not v if isinstance(v, bool) else v)
    move("ckpt_freq", "checkpoint.freq", at_least_one_or_end)
    move("no_ckpt", "checkpoint.enabled", lambda v: not v if isinstance(v, bool) else v)
    move("save_adapters", "checkpoint.save_adapters")
    move("num_ckpt_keep", "checkpoint.keep", bounded_keep)
    move("wandb", "logging.wandb")
    move("mlflow", "logging.mlflow")
    raw.pop("world_size", None)  # set from the environment in mistral-finetune, never by the YAML; torchrun decides
    logging = raw.get("logging")
    for tracker in ("wandb", "mlflow"):  # mistral-finetune's None: off, or the default name
        section = logging.get(tracker) if isinstance(logging, dict) else None
        if isinstance(section, dict):
            logging[tracker] = {k: v for k, v in section.items() if v is not None}

    optim = raw.get("optim")
    if isinstance(optim, dict) and "pct_start" in optim:
        optim["warmup_fraction"] = optim.pop("pct_start")

    lora = raw.get("lora")
    if isinstance(lora, dict):
        if lora.get("targets") == ALL_LINEAR:  # peft's `target_modules: all-linear`: one name, not a list
            lora["targets"] = [ALL_LINEAR]
        if lora.get("enable") is False:
            raise ConfigError("lora.enable: false (full fine-tuning) is not supported; tailor trains LoRA adapters")
        lora.pop("enable", None)
        if "scaling" in lora:  # mistral-finetune's scaling is alpha / rank
            scaling = lora.pop("scaling")
            lora["alpha"] = float(scaling) * lora.get("rank", LoRAArgs.rank)

    data = raw.get("data")
    if isinstance(data, dict):
        _translate_mistral_finetune_data(data, mistral_finetune)
    return raw


def _translate_mistral_finetune_data(data: dict, mistral_finetune: bool) -> None:
    """Its `instruct_data` and `data` (pretrain) strings become data.train; its shuffles, one per kind of data
    (`data.instruct.shuffle`, default true; `data.shuffle`, pretrain data, default false), become tailor's one
    data.shuffle when the kinds present agree."""
    instruct = data.pop("instruct", None)
    instruct = instruct if isinstance(instruct, dict) else {}
    if instruct.get("dynamic_chunk_fn_call") is False:
        raise ConfigError(
            "data.instruct.dynamic_chunk_fn_call: false is not supported: tailor trains every assistant message and "
            "tool call of a conversation in one sample, which is what mistral-finetune's chunking (true) gives; "
            "remove the key, and give whole conversations rather than chunked ones"
        )
    has_instruct, has_pretrain = bool(data.get("instruct_data")), bool(data.get("data"))
    if mistral_finetune:
        shuffles = {}
        if has_instruct or "shuffle" in instruct:
            shuffles["data.instruct.shuffle"] = instruct.get("shuffle", True)
        if has_pretrain or "shuffle" in data:
            shuffles["data.shuffle (pretrain data)"] = data.pop("shuffle", False)
        if len(set(shuffles.values())) > 1:
            raise ConfigError(
                f"{' and '.join(f'{k}: {str(v).lower()}' for k, v in shuffles.items())} differ: tailor shuffles "
                "all train sources or none (data.shuffle); set both alike"
            )
        if shuffles:
            data["shuffle"] = next(iter(shuffles.values()))
    elif "shuffle" in instruct:
        data.setdefault("shuffle", instruct["shuffle"])
    train = [s for key in ("instruct_data", "data") for s in parse_data_sources(data.pop(key, None), f"data.{key}")]
    if train:
        data["train"] = parse_data_sources(data.get("train"), "data.train") + train
    if "eval_instruct_data" in data:
        data["eval"] = parse_data_sources(data.pop("eval_instruct_data"), "data.eval_instruct_data")


# ---------------------------------------------------------------------------------------------------
# Checks of values (types were checked while building)


def check_config(cfg: TrainConfig, source: str = "config") -> None:
    def require(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(f"{source}: {message}")

    require(bool(cfg.run_dir), "run_dir is required: the folder where checkpoints and logs go")
    require(bool(cfg.model.path), "model.path (or model_id_or_path) is required: the model folder")
    require(bool(cfg.data.train), "data.train is required: at least one .jsonl file or folder")
    for key in ("seq_len", "batch_size", "grad_accumulation", "max_steps"):
        require(getattr(cfg, key) >= 1, f"{key} must be >= 1, got {getattr(cfg, key)}")
    require(cfg.epochs is None or cfg.epochs > 0, f"epochs must be > 0, got {cfg.epochs}")
    require(
        cfg.seq_len <= MAX_SEQ_LEN,
        f"seq_len must be at most {MAX_SEQ_LEN:,} (2**20; no Mistral model has a longer context), got {cfg.seq_len:,}",
    )
    require(cfg.model.fsdp_prefetch >= 1, f"model.fsdp_prefetch must be >= 1, got {cfg.model.fsdp_prefetch}")
    o = cfg.optim
    require(0 <= cfg.seed < 2**32, f"seed must be in [0, 2**32), got {cfg.seed}")
    require(0 < o.lr <= 1, f"optim.lr must be in (0, 1], got {o.lr}")
    require(0 <= o.min_lr <= o.lr, f"optim.min_lr must be in [0, optim.lr], got {o.min_lr}")
    require(o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}")
    require(  # AdamW multiplies the weights by 1 - lr * weight_decay every step
        o.lr * o.weight_decay < 1,
        f"optim.weight_decay {o.weight_decay} times optim.lr {o.lr} must be < 1, or every step zeroes the weights",
    )
    require(
        len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas),
        f"optim.betas must be two numbers in [0, 1), got {o.betas}",
    )
    require(o.eps > 0, f"optim.eps must be > 0, got {o.eps}")
    require(o.max_grad_norm > 0, f"optim.max_grad_norm must be > 0, got {o.max_grad_norm}")
    require(o.warmup_steps is None or o.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {o.warmup_steps}")
    require(0 <= o.warmup_fraction <= 1, f"optim.warmup_fraction must be in [0, 1], got {o.warmup_fraction}")
    require(
        o.max_consecutive_nonfinite >= 1,
        f"optim.max_consecutive_nonfinite must be >= 1, got {o.max_consecutive_nonfinite}",
    )
    require(
        o.loss_scale_growth_interval >= 1,
        f"optim.loss_scale_growth_interval must be >= 1, got {o.loss_scale_growth_interval}",
    )
    require(bool(cfg.resume), "resume must be auto, false, or a checkpoint folder; got an empty string")
    require(cfg.eval.freq >= 0, f"eval.freq must be >= 0 (0: only at the end), got {cfg.eval.freq}")
    require(cfg.eval.max_batches is None or cfg.eval.max_batches >= 1, "eval.max_batches must be >= 1 or null")
    require(
        not cfg.eval.enabled or bool(cfg.data.eval),
        "eval is on but data.eval is empty: add eval files, or set eval.enabled: false",
    )
    require(cfg.eval.generate >= 0, f"eval.generate must be >= 0 (0: no generations), got {cfg.eval.generate}")
    require(cfg.eval.retain_warn >= 0, f"eval.retain_warn must be >= 0, got {cfg.eval.retain_warn}")
    require(
        cfg.eval.enabled or not cfg.data.retain,
        "data.retain is evaluated at each eval, but eval is off: set eval.enabled: true, or remove data.retain",
    )
    require(cfg.checkpoint.freq >= 0, f"checkpoint.freq must be >= 0 (0: only at the end), got {cfg.checkpoint.freq}")
    require(cfg.checkpoint.keep >= 1, f"checkpoint.keep must be >= 1, got {cfg.checkpoint.keep}")
    require(cfg.logging.freq >= 1, f"logging.freq must be >= 1, got {cfg.logging.freq}")
    require(cfg.data.num_workers >= 0, f"data.num_workers must be >= 0, got {cfg.data.num_workers}")
    require(
        0 <= cfg.data.max_bad_fraction <= 1,
        f"data.max_bad_fraction must be in [0, 1], got {cfg.data.max_bad_fraction}",
    )
    if cfg.lora.dora:
        require(
            cfg.model.quantize == "none",
            "lora.dora with model.quantize: nf4 is not supported: DoRA's row norms of W + scaling · B A need each "
            "frozen weight whole in full precision at every step, which undoes what 4 bits save; train DoRA on the "
            "unquantized base, or QLoRA without lora.dora",
        )
        require(
            "output" not in cfg.lora.targets,
            "lora.dora on the output head (lora.targets has output) is not supported: the head's loss is computed "
            "chunk by chunk without its full outputs; leave output out (all-linear does, as peft's)",
        )
    if cfg.model.quantize == "nf4":
        require(
            importlib.util.find_spec("torchao") is not None,
            f"model.quantize is nf4, which needs torchao: {INSTALL_HINT}",
        )
        require(
            cfg.checkpoint.save_adapters,
            "checkpoint.save_adapters: false with model.quantize: nf4 would merge into the 4-bit weights; keep the "
            "adapters and run `tailor merge`, which merges them into the original weights",
        )


def due_at(step: int, freq: int, max_steps: int) -> bool:
    """Whether what is done every `freq` steps (eval.freq, checkpoint.freq) is done at `step`: at each multiple of
    freq, and always at the last step; freq 0 means at the last step only."""
    return step == max_steps or (freq > 0 and step % freq == 0)


def resolve_cache_dir(cfg: TrainConfig) -> Path:
    """Where tokenized data is cached: data.cache_dir, or .tailor_cache beside run_dir, shared by later runs."""
    if cfg.data.cache_dir:
        return Path(cfg.data.cache_dir).expanduser()
    return Path(cfg.run_dir).expanduser().resolve().parent / ".tailor_cache"


def config_to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), encoding="utf-8")
