"""The training configuration's schema: nested dataclasses, one per section of the YAML file.

Each field's type is checked and its value converted when a config is built (finetune/config/building.py), and
values are checked against each other after (finetune/config/checks.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from finetune import exit_codes
from finetune.data.config import DataConfig
from model.settings import BACKENDS, LoRAArgs


class ConfigError(ValueError):
    """A user mistake in the configuration; the message names the key and the fault."""

    exit_code = exit_codes.USAGE


# Tokens per chunk of the chunked loss (finetune/training/loss.py), here so `tailor validate` reads it without torch:
# at 1024 the loss holds under 1/8 of the unchunked loss's memory from 5,500 tokens on; a chunk is still a big matmul.
DEFAULT_CHUNK_SIZE = 1024


# Each field's meaning is the comment on its line or just above it: docs/config.md's reference is generated
# from these comments (finetune/config_reference.py), and a test fails on a field without one.


@dataclass
class ModelConfig:
    """The `model:` section: the base model and how it is stored and run."""

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
    # before step 1, one training step of this model traced on tensors that hold no memory (docs/gpu-trace.md): its
    # peak memory by part, FLOPs, host syncs; `auto` on a GPU, `always` on the CPU too (as on an H100), `never`
    trace: Literal["auto", "always", "never"] = "auto"


@dataclass
class OptimConfig:
    """The `optim:` section: AdamW and the learning-rate schedule."""

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
    """The `eval:` section: when and how much to evaluate."""

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
    """The `checkpoint:` section: when to save, what, and how many to keep."""

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
    """The `logging.wandb:` section."""

    project: str = ""  # W&B project; empty: W&B off (mistral-finetune: `wandb.project`)
    run_name: str = ""  # W&B run name; empty: W&B picks one (mistral-finetune: `wandb.run_name`)
    offline: bool = False  # log locally, sync later (mistral-finetune: `wandb.offline`)


@dataclass
class MlflowConfig:
    """The `logging.mlflow:` section."""

    tracking_uri: str = ""  # MLflow server; empty: MLflow off (mistral-finetune: `mlflow.tracking_uri`)
    experiment_name: str = "tailor"  # MLflow experiment (mistral-finetune: `mlflow.experiment_name`)


@dataclass
class LoggingConfig:
    """The `logging:` section: metrics.jsonl's frequency and the trackers."""

    freq: int = 1  # steps between log lines and metrics.jsonl records (mistral-finetune: `log_freq`)
    tensorboard: bool = False  # TensorBoard events in run_dir/tensorboard
    wandb: WandbConfig = field(default_factory=WandbConfig)  # Weights & Biases, when installed
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)  # MLflow, when installed


@dataclass
class TrainConfig:
    """A whole training config: the top-level keys and every section."""

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
