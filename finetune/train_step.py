"""One optimizer step over several micro-batches, normalised by the trained weight of the whole step."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from finetune.distributed import all_reduce_sum
from finetune.loss import loss_inputs


@dataclass
class StepSums:
    """Sums over the step's micro-batches and all ranks; tensors on the device, read only when logging."""

    loss_sum: torch.Tensor
    weight_sum: torch.Tensor
    trained_tokens: torch.Tensor
    tokens: int  # all tokens of the step, all ranks
    grad_norm: torch.Tensor

    @property
    def loss(self) -> torch.Tensor:
        return self.loss_sum / self.weight_sum.clamp_min(1e-12)


def _set_gradient_sync(module: nn.Module, enabled: bool) -> None:
    if hasattr(module, "set_requires_gradient_sync"):  # an FSDP2 module
        module.set_requires_gradient_sync(enabled)


def train_step(loss_model: nn.Module, optimizer: torch.optim.Optimizer, micro_batches: list, device: torch.device,
               max_grad_norm: float, world_size: int) -> StepSums:
    """Forward and backward every micro-batch, clip, and step the optimizer.

    The step's loss is Σ weight·CE over all micro-batches and ranks ÷ Σ weights: the divisor is known from the
    data before any forward, so each micro-batch's backward is already scaled right. FSDP averages gradients
    over ranks; multiplying by world_size turns that average back into the sum the formula needs.
    """
    weights = torch.stack([b.weights.sum() for b in micro_batches]).sum().to(device, torch.float32)
    step_weight = all_reduce_sum(weights).clamp_min(1e-12)
    loss_sum = torch.zeros((), device=device)
    trained = torch.zeros((), device=device)
    for i, batch in enumerate(micro_batches):
        _set_gradient_sync(loss_model, i == len(micro_batches) - 1)
        sums = loss_model(**loss_inputs(batch, device))
        (sums.loss_sum * (world_size / step_weight)).backward()
        loss_sum += sums.loss_sum.detach()
        trained += sums.n_trained
    params = [p for p in loss_model.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    if hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    tokens = sum(b.tokens.numel() for b in micro_batches) * world_size
    return StepSums(all_reduce_sum(loss_sum), step_weight, all_reduce_sum(trained), tokens, grad_norm)
