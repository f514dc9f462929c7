"""The compute dtype of a run: `model.dtype` as a torch dtype, with `auto` resolved for the device the run is on.

Frozen weights compute in it (and are stored in it unless model.quantize is nf4); LoRA weights and their AdamW
state stay fp32 whatever it is (model/lora.py), and fp16 adds dynamic loss scaling (finetune/training/loss_scale.py).
"""

from __future__ import annotations

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """model.dtype as a torch dtype, `auto` resolved for `device`.

    `auto` is bf16 on a GPU that has it (Ampere and later), fp16 on one without (T4, V100), fp32 on CPU.
    """
    if name != "auto":
        return DTYPES[name]
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
