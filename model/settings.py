"""The model's settings a training config chooses, in plain Python: the attention backends' names, NF4's layout and
where torchao comes from, and LoRA's settings (`LoRAArgs`).

They live apart from the modules that implement them (model/attention.py, model/quantize.py, model/lora.py), which
import torch, so that the config and `tailor validate`, which never build a model, read them without loading torch:
over a second of every such command's start-up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

BACKENDS = ("sdpa", "varlen", "flex", "xformers")  # model/attention.py's; `auto` chooses among them

NF4_BLOCK = 64  # weights per absmax scale (QLoRA's)
NF4_SCALER_BLOCK = 256  # scales per 8-bit group of the double quantization (QLoRA's)
NF4_BITS_PER_WEIGHT = 4 + 8 / NF4_BLOCK + 32 / (NF4_BLOCK * NF4_SCALER_BLOCK)
INSTALL_HINT = 'pip install -e ".[qlora]" (or pip install torchao)'  # NF4's optional extra

LORA_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "output")
# Hugging Face's module names of the same layers (model/hf_format.py's mapping), as peft's `target_modules` lists them
HF_LORA_TARGETS = {
    "q_proj": "wq",
    "k_proj": "wk",
    "v_proj": "wv",
    "o_proj": "wo",
    "gate_proj": "w1",
    "down_proj": "w2",
    "up_proj": "w3",
    "lm_head": "output",
}
ALL_LINEAR = "all-linear"  # peft's name for every linear layer but the output head
# Said by `tailor validate` and `tailor export-peft` when `output` is a target: vLLM refuses such an adapter
# ("expected target modules in [...] but received ['lm_head']"), and so do most LoRA servers.
OUTPUT_HEAD_SERVING_NOTE = (
    "LoRA on the output head (lora.targets has 'output'): vLLM and most LoRA servers load adapters on the attention "
    "and MLP projections only and refuse this one; to serve it, merge it (tailor merge, then export-hf or "
    "export-gguf), or train without 'output' in lora.targets"
)


@dataclass
class LoRAArgs:
    """The adapters' settings, defined and checked here once.

    The training config's `lora:` section is this class, and a checkpoint's params.json `lora` entry is read back
    into it. Each field's comment is its documentation (docs/config.md's reference is generated from it).

    Raises:
        ValueError: a setting out of range, or a target that names no adaptable module.
    """

    rank: int = 64  # r in `y = W x + (alpha / r) · B A dropout(x)`
    alpha: float = 128.0  # the update is scaled by alpha / rank (mistral-finetune: `lora.scaling`, that ratio)
    dropout: float = 0.0  # dropout on the adapters' input
    # modules to adapt (every MoE expert included): wq wk wv wo (attention), w1 w2 w3 (MLP), output (the head); or
    # their Hugging Face names (q_proj k_proj v_proj o_proj gate_proj down_proj up_proj lm_head), or `all-linear`
    # (every linear layer but the head, as peft's); recorded in the native names
    targets: tuple[str, ...] = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
    # rsLoRA: scale the update by alpha / sqrt(rank) instead of alpha / rank, so that a higher rank keeps learning
    # as fast (peft's `use_rslora`); it matters at high ranks (64 and more), or when comparing ranks at one lr
    rslora: bool = False
    # LoRA+: B's learning rate (and DoRA's magnitudes') this many times optim.lr, A's at optim.lr (peft's
    # `loraplus_lr_ratio`); 16 is the paper's choice, often with a lower optim.lr; 1: plain LoRA
    plus_ratio: float = 1.0
    # DoRA: each adapted weight split into a trained magnitude per output row and a direction that LoRA updates
    # (peft's `use_dora`): closer to full fine-tuning at low rank, for the row norms of every adapted weight at each
    # step (more time and memory than LoRA); not with model.quantize nf4 or the `output` target
    dora: bool = False

    def __post_init__(self) -> None:
        self.targets = normalize_targets(self.targets)
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if not self.alpha > 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.plus_ratio > 0:
            raise ValueError(f"plus_ratio must be > 0, got {self.plus_ratio}")
        if not self.targets:
            raise ValueError("targets must name at least one module")

    @property
    def scaling(self) -> float:
        """What the update B A is multiplied by: alpha / rank, or alpha / sqrt(rank) with rsLoRA."""
        return lora_scaling(self.rank, self.alpha, self.rslora)


def lora_scaling(rank: int, alpha: float, rslora: bool) -> float:
    """What the update B A is multiplied by: alpha / rank, or alpha / sqrt(rank) with rsLoRA."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def normalize_targets(targets: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Targets in native names, in LORA_TARGETS' order, each once: Hugging Face names translated, `all-linear` expanded.

    Raises:
        ValueError: a name that is neither native nor Hugging Face's, listing both kinds.
    """
    native = set()
    for target in targets:
        if target == ALL_LINEAR:
            native.update(t for t in LORA_TARGETS if t != "output")
        elif target in LORA_TARGETS or target in HF_LORA_TARGETS:
            native.add(HF_LORA_TARGETS.get(target, target))
        else:
            raise ValueError(
                f"targets has {target!r}; expected some of {' '.join(LORA_TARGETS)}, their Hugging Face names "
                f"{' '.join(HF_LORA_TARGETS)}, or {ALL_LINEAR}"
            )
    return tuple(t for t in LORA_TARGETS if t in native)
