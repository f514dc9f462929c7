"""The model's settings a training config chooses, in plain Python: the attention backends' names, NF4's layout and
where torchao comes from, and LoRA's settings (`LoRAArgs`).

They live apart from the modules that implement them (model/attention.py, model/quantize.py, model/lora.py), which
import torch, so that the config and `tailor validate`, which never build a model, read them without loading torch:
over a second of every such command's start-up.
"""

from __future__ import annotations

from dataclasses import dataclass

BACKENDS = ("sdpa", "varlen", "flex", "xformers")  # model/attention.py's; `auto` chooses among them

NF4_BLOCK = 64  # weights per absmax scale (QLoRA's)
NF4_SCALER_BLOCK = 256  # scales per 8-bit group of the double quantization (QLoRA's)
NF4_BITS_PER_WEIGHT = 4 + 8 / NF4_BLOCK + 32 / (NF4_BLOCK * NF4_SCALER_BLOCK)
INSTALL_HINT = 'pip install -e ".[qlora]" (or pip install torchao)'  # NF4's optional extra

LORA_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "output")


@dataclass
class LoRAArgs:
    """The adapters' settings, defined and checked here once: the training config's `lora:` section is this class,
    and a checkpoint's params.json `lora` entry is read back into it. Each field's comment is its documentation
    (the README's config reference is generated from it)."""

    rank: int = 64  # r in `y = W x + (alpha / r) · B A dropout(x)`
    alpha: float = 128.0  # the update is scaled by alpha / rank (mistral-finetune: `lora.scaling`, that ratio)
    dropout: float = 0.0  # dropout on the adapters' input
    # modules to adapt (every MoE expert included): wq wk wv wo (attention), w1 w2 w3 (MLP), output (the head)
    targets: tuple[str, ...] = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")

    def __post_init__(self) -> None:
        self.targets = tuple(self.targets)
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if not self.alpha > 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        for target in self.targets:
            if target not in LORA_TARGETS:
                raise ValueError(f"targets has {target!r}; expected some of {', '.join(sorted(LORA_TARGETS))}")
        if not self.targets:
            raise ValueError("targets must name at least one module")
