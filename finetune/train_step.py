"""One optimizer step over several micro-batches, normalised by the trained weight of the whole step.

A step whose loss or gradient norm is not finite (a NaN or an inf on any rank) changes nothing: its gradients are
dropped and the optimizer does not step. The loop counts such steps, and stops the run after
`optim.max_consecutive_nonfinite` of them in a row (raise_if_diverged).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from finetune.distributed import all_reduce_sum, is_initialized
from finetune.loss import loss_inputs

if TYPE_CHECKING:
    from finetune.resume import StopSignal


class NonFiniteError(RuntimeError):
    """Too many steps in a row had a non-finite loss or gradient; the message says which and what to try."""


@dataclass
class StepSums:
    """Sums over the step's micro-batches and all ranks; tensors on the device, read only when logging."""

    loss_sum: torch.Tensor
    weight_sum: torch.Tensor
    trained_tokens: torch.Tensor
    tokens: int  # all tokens of the step, all ranks
    grad_norm: torch.Tensor
    finite: bool = True  # the loss and the gradients were finite on every rank, so the optimizer stepped
    stop_requested: bool = False  # some rank was asked to stop (SIGTERM, SIGINT): every rank stops after this step

    @property
    def loss(self) -> torch.Tensor:
        return self.loss_sum / self.weight_sum.clamp_min(1e-12)


def _set_gradient_sync(module: nn.Module, enabled: bool) -> None:
    if hasattr(module, "set_requires_gradient_sync"):  # an FSDP2 module
        module.set_requires_gradient_sync(enabled)


def train_step(loss_model: nn.Module, optimizer: torch.optim.Optimizer, micro_batches: list, device: torch.device,
               max_grad_norm: float, world_size: int, stop: StopSignal | None = None) -> StepSums:
    """Forward and backward every micro-batch, clip, and step the optimizer unless something was not finite.

    The step's loss is Σ weight·CE over all micro-batches and ranks ÷ Σ weights: the divisor is known from the
    data before any forward, so each micro-batch's backward is already scaled right. FSDP averages gradients
    over ranks; multiplying by world_size turns that average back into the sum the formula needs.

    The step waits for the device once, to read two flags agreed by all ranks: whether anything was not finite,
    and whether any rank has been asked to stop (`stop`, read after the backward: a signal that came during the
    step stops the run after this step, not the next).
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
    loss_sum, trained = all_reduce_sum(torch.stack([loss_sum, trained]))
    params = [p for p in loss_model.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    if hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()
    finite = torch.isfinite(loss_sum) & torch.isfinite(grad_norm)
    stop_requested = stop is not None and stop.requested
    flags = torch.stack([(~finite).float(), torch.tensor(float(stop_requested), device=device)])
    if is_initialized():
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    any_nonfinite, any_stop = (flag > 0 for flag in flags.tolist())
    if not any_nonfinite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    tokens = sum(b.tokens.numel() for b in micro_batches) * world_size
    return StepSums(loss_sum, step_weight, trained, tokens, grad_norm, finite=not any_nonfinite,
                    stop_requested=any_stop)


def raise_if_diverged(step: int, in_a_row: int, limit: int, lr: float, newest_checkpoint: Path | None) -> None:
    """Stop the run after `limit` non-finite steps in a row, saying where and what to try."""
    if in_a_row < limit:
        return
    where = (f"resume: auto continues from the newest checkpoint, {newest_checkpoint}" if newest_checkpoint
             else "there is no checkpoint yet, so the next run starts from step 0")
    raise NonFiniteError(
        f"step {step}: the loss or the gradients were not finite in {in_a_row} steps in a row (steps "
        f"{step - in_a_row + 1} to {step}; optim.max_consecutive_nonfinite is {limit}), so the run stops. Things to "
        f"try: a lower optim.lr (this step's was {lr:.3g}) or a longer warmup (optim.warmup_steps); a lower "
        "optim.max_grad_norm; model.dtype bf16 or fp32 if it is fp16; check the data with `tailor validate CONFIG`. "
        f"Then run the same command: {where}.")


# Test hook, the only one: TAILOR_TEST_NONFINITE_STEPS="3,4" makes the loss of optimizer steps 3 and 4 NaN on every
# rank (their trained tokens get NaN loss weights), so tests can check that such steps are skipped, counted and
# stopped on. Nothing else reads it.
NONFINITE_TEST_STEPS = "TAILOR_TEST_NONFINITE_STEPS"


def inject_test_nonfinite(step: int, micro_batches: list) -> list:
    if str(step) not in os.environ.get(NONFINITE_TEST_STEPS, "").split(","):
        return micro_batches
    nan = torch.tensor(float("nan"))
    return [dataclasses.replace(b, weights=torch.where(b.weights > 0, nan, 0.0)) for b in micro_batches]
