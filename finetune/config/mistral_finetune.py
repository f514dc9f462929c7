"""mistral-finetune's config keys (its example/7B.yaml, every key of its TrainArgs) translated into tailor's, so
that its users' configs run unchanged; what cannot mean the same here is refused, naming the key and the reason.
"""

from __future__ import annotations

from finetune.config.building import parse_data_sources, shown
from finetune.config.schema import ConfigError
from model.settings import ALL_LINEAR, LoRAArgs

# mistral-finetune's TrainArgs defaults where they differ from tailor's, so that a config of its means what it meant
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
    """Whether a config's mapping is mistral-finetune's: it has `model_id_or_path`, which its TrainArgs requires."""
    return "model_id_or_path" in raw


def translate_mistral_finetune_keys(raw: dict) -> dict:
    """Rewrite mistral-finetune's keys (every key of its TrainArgs) into tailor's; tailor's own keys pass through.

    Returns:
        A new mapping, with its own copy of each section it changes.

    Raises:
        ConfigError: a key that cannot mean the same here, naming it and the reason (docs/config.md).
    """
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
                    f"{section} must be a mapping (mistral-finetune's {old} goes in it), got {shown(target)}"
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
            raise ConfigError(f"model must be a mapping (mistral-finetune's checkpoint goes in it), got {shown(model)}")
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
