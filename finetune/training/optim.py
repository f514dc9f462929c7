"""AdamW on the LoRA parameters, the learning rate of each step (linear warmup, then cosine decay), and the steps
that evaluate or checkpoint.

The schedule is a pure function of the step, so resuming needs nothing but the step number, and it only
ever writes the learning rate: AdamW's betas stay what the config says.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from finetune.config import OptimConfig


def lora_param_groups(model: nn.Module, plus_ratio: float) -> list[torch.nn.Parameter] | list[dict]:
    """The trainable parameters, for `build_optimizer`: one group, or two with LoRA+.

    With `lora.plus_ratio` other than 1, the groups are as peft's `create_loraplus_optimizer` makes them: the A
    matrices at the learning rate, the B matrices and DoRA's magnitudes (peft's 1-D parameters) at `plus_ratio` times
    it (`lr_ratio`, which `set_lr` applies).
    """
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if plus_ratio == 1:
        return [p for _, p in trainable]
    a = [p for name, p in trainable if ".lora_A." in name]
    b = [p for name, p in trainable if ".lora_A." not in name]
    return [dict(params=a, lr_ratio=1.0), dict(params=b, lr_ratio=plus_ratio)]


def build_optimizer(params: Iterable[torch.nn.Parameter] | Iterable[dict], cfg: OptimConfig) -> torch.optim.AdamW:
    """Fused AdamW over the LoRA parameters, with the config's learning rate, betas, eps and weight decay.

    Decayed as the config says: every trainable parameter is a LoRA matrix (there are no biases or norms, which
    usually go undecayed), and decay pulls B·A, the change to the base model, toward zero.

    The parameters are fp32 (LoRA), so the optimizer state is fp32 too. The fused kernel (CPU and CUDA) updates
    every parameter, FSDP's DTensor shards included, in a few launches, and it can skip a non-finite step on the
    device by itself (`found_inf`, finetune/training/train_step.py), so a step never waits for the device to decide.

    Args:
        params: one group of parameters, or `lora_param_groups`' two (LoRA+).
    """
    return torch.optim.AdamW(
        list(params),
        lr=cfg.lr,
        betas=(cfg.betas[0], cfg.betas[1]),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        fused=True,
    )


def warmup_steps_for(cfg: OptimConfig, max_steps: int) -> int:
    """The warmup's steps: optim.warmup_steps (at most max_steps), else warmup_fraction of max_steps."""
    if cfg.warmup_steps is not None:
        return min(cfg.warmup_steps, max_steps)
    return round(cfg.warmup_fraction * max_steps)


def lr_at_step(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """The learning rate of optimizer step `step`, counted from 1.

    Warmup: lr · step / warmup, so step 1 already learns and step `warmup` reaches lr. Then cosine:
    min_lr + (lr − min_lr) · ½ (1 + cos(π · progress)), progress going from 0 just after warmup to 1 at max_steps.
    """
    warmup = warmup_steps_for(cfg, max_steps)
    if step <= warmup:
        return cfg.lr * step / warmup
    progress = (step - warmup) / max(1, max_steps - warmup)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def due_at(step: int, freq: int, max_steps: int) -> bool:
    """Whether what is done every `freq` steps (eval.freq, checkpoint.freq) is done at `step`.

    It is at each multiple of freq, and always at the last step; freq 0 means at the last step only.
    """
    return step == max_steps or (freq > 0 and step % freq == 0)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The step's learning rate in every group, times the group's `lr_ratio` (LoRA+'s B matrices)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_ratio", 1.0)
