"""A built config's values checked against each other and against what a run can do (types were checked while
building): each fault an error naming the key.
"""

from __future__ import annotations

import importlib.util

from finetune.config.schema import ConfigError, TrainConfig
from model.settings import INSTALL_HINT

MAX_SEQ_LEN = 2**20  # a packed batch holds seq_len tokens: a typo of a few digits would fill the host's memory


def check_config(cfg: TrainConfig, source: str = "config") -> None:
    """Check a built config's values against each other and against what a run can do.

    Raises:
        ConfigError: the first fault, naming `source` and the key.
    """

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
