"""fp16's dynamic loss scaling, for GPUs without bf16 (T4, V100): `model.dtype: fp16`.

fp16 has bf16's precision and more, but a range that ends at 6.1e-5 (normal) and 65504: the gradients of the
activations, small numbers, would flush to zero. So the loss is multiplied by a scale (2^16 to start) before the
backward, and the LoRA gradients (fp32: the master weights are fp32) are divided by it before clipping and the
AdamW step. A scale that makes something overflow gives an inf or NaN gradient: that step is skipped by the
non-finite step machinery that exists (finetune/training/train_step.py) and the scale is halved; after
`optim.loss_scale_growth_interval` finite steps in a row it is doubled, so it stays near the largest that fits.
Powers of two: scaling and unscaling change no bit of a gradient that neither underflows nor overflows.

The scale and its count of good steps live on the device and are updated there by the kernel torch.amp's
GradScaler uses, so a step never waits for the host; a checkpoint saves them (state/progress.json) and a resumed
run goes on with them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from finetune.training.precision import compute_dtype
from model.dtensor import is_dtensor

if TYPE_CHECKING:
    from finetune.config import TrainConfig
    from finetune.training.train_state import Progress

INITIAL_SCALE = 2.0**16
GROWTH_FACTOR = 2.0
BACKOFF_FACTOR = 0.5


class DynamicLossScale:
    """fp16's loss scale and its count of finite steps in a row, both on the device (the module docstring).

    Args:
        growth_interval: finite steps in a row after which the scale doubles (optim.loss_scale_growth_interval).
        scale: the scale to start from: INITIAL_SCALE, or a resumed checkpoint's.
        good_steps: finite steps in a row so far, as a resumed checkpoint saved them.
    """

    def __init__(
        self, device: torch.device, growth_interval: int, scale: float = INITIAL_SCALE, good_steps: int = 0
    ) -> None:
        self.growth_interval = growth_interval
        self.scale = torch.full((), scale, dtype=torch.float32, device=device)
        self.good_steps = torch.full((), good_steps, dtype=torch.int32, device=device)

    def scaled(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss times the scale, to run the backward of."""
        return loss * self.scale

    @torch.no_grad()
    def unscale_(self, params: list[torch.Tensor]) -> None:
        """Divide every gradient by the scale, in place (a sharded gradient shard by shard)."""
        grads = [p.grad.to_local() if is_dtensor(p.grad) else p.grad for p in params if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, self.scale.double().reciprocal().float())

    def update(self, nonfinite: torch.Tensor) -> None:
        """After the step: halve on an overflow (`nonfinite` 1), double after growth_interval good steps."""
        torch._amp_update_scale_(
            self.scale, self.good_steps, nonfinite, GROWTH_FACTOR, BACKOFF_FACTOR, self.growth_interval
        )

    def state(self) -> dict:
        """The scale and its good steps as progress.json saves them (reads the device: a checkpoint waits anyway)."""
        return {"loss_scale": self.scale.item(), "loss_scale_good_steps": int(self.good_steps.item())}


def loss_scale_for(cfg: TrainConfig, progress: Progress, device: torch.device) -> DynamicLossScale | None:
    """The run's loss scale when it computes in fp16 (else None), going on from a resumed checkpoint's."""
    if compute_dtype(cfg.model.dtype, device) != torch.float16:
        return None
    if progress.loss_scale > 0:
        return DynamicLossScale(
            device, cfg.optim.loss_scale_growth_interval, progress.loss_scale, progress.loss_scale_good_steps
        )
    return DynamicLossScale(device, cfg.optim.loss_scale_growth_interval)
