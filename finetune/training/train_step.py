"""One optimizer step over several micro-batches, normalised by the trained weight of the whole step.

A step whose loss or gradient norm is not finite (a NaN or an inf on any rank) changes nothing: its gradients are
dropped and the optimizer does not step. The loop counts such steps, and stops the run after
`optim.max_consecutive_nonfinite` of them in a row (raise_if_diverged).

The step never waits for the device: the skip happens on the device (the fused AdamW kernel's `found_inf`), and
what the host needs to know of the step (finite? a stop asked for? its loss, gradient norm and trained tokens) is
copied back without waiting, to be read when the loop gets to it, one step later (`QueuedStep.outcome()`,
finetune/training/step_reader.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from finetune import exit_codes
from finetune.data.errors import first_line
from finetune.training.distributed import all_reduce_sum, is_initialized
from finetune.training.loss import loss_inputs
from model.attention import to_device

if TYPE_CHECKING:
    from finetune.training.loss_scale import DynamicLossScale
    from finetune.training.stop_signal import StopSignal


class NonFiniteError(RuntimeError):
    """Too many steps in a row had a non-finite loss or gradient; the message says which and what to try."""

    exit_code = exit_codes.NOT_FINITE


class HostCopy:
    """A small device tensor on its way to the host: queued now, read later.

    Reading waits only for the work queued before the copy (a CUDA event on the tensor's stream), not for the steps
    queued since.
    """

    def __init__(self, tensor: torch.Tensor):
        self._ready = None
        if tensor.device.type == "cuda":
            self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self._host.copy_(tensor, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record(torch.cuda.current_stream(tensor.device))
        else:
            self._host = tensor.detach().clone()

    def read(self) -> list:
        """The tensor's values as a list, once the copy has landed."""
        if self._ready is not None:
            self._ready.synchronize()
        return self._host.tolist()


@dataclass
class StepOutcome:
    """What the host needs of a finished step, agreed by all ranks."""

    finite: bool  # the loss and the gradients were finite on every rank, so the optimizer stepped
    stop_requested: bool  # some rank was asked to stop (SIGTERM, SIGINT) by the end of this step's backward
    trained_tokens: int  # all ranks
    loss: float  # Σ weight·CE ÷ Σ weight over the step's micro-batches and ranks
    grad_norm: float  # before clipping

    @classmethod
    def from_values(cls, values: list[float]) -> StepOutcome:
        """Read the five values train_step queues: non-finite, stop asked, trained tokens, loss, gradient norm."""
        nonfinite, stop, trained, loss, grad_norm = values
        return cls(not nonfinite, bool(stop), int(trained), loss, grad_norm)


@dataclass
class QueuedStep:
    """A step as the loop sees it: its tokens, counted on the host, and its outcome on its way from the device."""

    tokens: int  # all tokens of the step, all ranks
    pending: HostCopy  # a StepOutcome's values
    _outcome: StepOutcome | None = None

    def outcome(self) -> StepOutcome:
        """The step's outcome, waiting at most for this step to finish on the device."""
        if self._outcome is None:
            self._outcome = StepOutcome.from_values(self.pending.read())
        return self._outcome


def _set_gradient_sync(module: nn.Module, enabled: bool) -> None:
    if hasattr(module, "set_requires_gradient_sync"):  # an FSDP2 module
        module.set_requires_gradient_sync(enabled)


def train_step(
    loss_model: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: list,
    device: torch.device,
    max_grad_norm: float,
    world_size: int,
    stop: StopSignal | None = None,
    loss_scale: DynamicLossScale | None = None,
) -> QueuedStep:
    """Forward and backward every micro-batch, clip, and step the optimizer unless something was not finite.

    The step's loss is Σ weight·CE over all micro-batches and ranks ÷ Σ weights: the divisor is known from the
    data before any forward, so each micro-batch's backward is already scaled right. FSDP averages gradients
    over ranks; multiplying by world_size turns that average back into the sum the formula needs.

    Nothing here reads the device: the optimizer (fused AdamW, finetune/training/optim.py) skips a non-finite step by
    itself, and `stop` is read on the host after the backward (a signal that came during the step is in this
    step's outcome) and agreed by all ranks on the device. In fp16, `loss_scale` scales each backward and unscales
    the gradients before clipping, and learns from the step's outcome (finetune/training/loss_scale.py).

    Args:
        micro_batches: the step's packed batches, grad_accumulation of them, each with its tokens and weights.
        world_size: the number of ranks, each running this step on its own micro-batches.
        stop: the process's stop signal, agreed by all ranks in the step's outcome.
        loss_scale: fp16's dynamic loss scale; None in bf16 and fp32.

    Returns:
        The step queued on the device: its tokens, and its outcome to be read later.

    Raises:
        ValueError: the optimizer is not fused (skip_step_if_nonfinite).
    """
    weights = torch.stack([b.weights.sum() for b in micro_batches]).sum().float()
    step_weight = all_reduce_sum(to_device(weights, device)).clamp_min(1e-12)
    # float64, as both go in one all-reduce: the count of trained tokens stays exact past 2^24
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    trained = torch.zeros((), device=device, dtype=torch.float64)
    for i, batch in enumerate(micro_batches):
        _set_gradient_sync(loss_model, i == len(micro_batches) - 1)
        micro = loss_model(**loss_inputs(batch, device))
        loss = micro.loss_sum * (world_size / step_weight)
        (loss_scale.scaled(loss) if loss_scale else loss).backward()
        loss_sum += micro.loss_sum.detach()
        trained += micro.n_trained
    loss_sum, trained = all_reduce_sum(torch.stack([loss_sum, trained]))
    loss_sum = loss_sum.float()
    params = [p for p in loss_model.parameters() if p.requires_grad]
    if loss_scale:
        loss_scale.unscale_(params)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    if hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()
    nonfinite = (~(torch.isfinite(loss_sum) & torch.isfinite(grad_norm))).float()
    stop_asked = torch.full((), float(stop is not None and stop.requested), device=device)
    flags = torch.stack([nonfinite, stop_asked])
    if is_initialized():
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)  # the loss and the norm are global already; the stop is not
    skip_step_if_nonfinite(optimizer, flags[0])
    if loss_scale:
        loss_scale.update(flags[0])
    optimizer.zero_grad(set_to_none=True)
    tokens = sum(b.tokens.numel() for b in micro_batches) * world_size
    outcome = torch.stack([*flags.double(), trained, (loss_sum / step_weight).double(), grad_norm.double()])
    return QueuedStep(tokens, pending=HostCopy(outcome))


@dataclass
class StepRunner:
    """The run's training step, holding what stays the same from one step to the next (train_step's arguments)."""

    loss_model: nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    max_grad_norm: float
    world_size: int
    stop: StopSignal | None = None
    loss_scale: DynamicLossScale | None = None

    def __call__(self, micro_batches: list) -> QueuedStep:
        """One optimizer step over `micro_batches` (`train_step`), queued on the device."""
        return train_step(
            self.loss_model,
            self.optimizer,
            micro_batches,
            self.device,
            self.max_grad_norm,
            self.world_size,
            self.stop,
            self.loss_scale,
        )


def skip_step_if_nonfinite(optimizer: torch.optim.Optimizer, nonfinite: torch.Tensor) -> None:
    """Step the optimizer, a no-op on the device where `nonfinite` is 1.

    The fused AdamW kernel reads `nonfinite` as `found_inf`, as with torch.amp's GradScaler, and leaves the weights,
    moments and step count as they were.

    Raises:
        ValueError: the optimizer is not fused.
    """
    if not optimizer.defaults.get("fused"):
        raise ValueError(
            "skipping a non-finite step on the device needs a fused optimizer (finetune/training/optim.py)"
        )
    optimizer.grad_scale, optimizer.found_inf = None, nonfinite
    optimizer.step()


def raise_if_diverged(step: int, in_a_row: int, limit: int, lr: float, newest_checkpoint: Path | None) -> None:
    """Stop the run after `limit` non-finite steps in a row, saying where and what to try.

    Args:
        in_a_row: the non-finite steps in a row up to `step`.
        lr: the step's learning rate, quoted in the advice.
        newest_checkpoint: where `resume: auto` would continue from; None: no checkpoint yet.

    Raises:
        NonFiniteError: `in_a_row` reached `limit`.
    """
    if in_a_row < limit:
        return
    where = (
        f"resume: auto continues from the newest checkpoint, {newest_checkpoint}"
        if newest_checkpoint
        else "there is no checkpoint yet, so the next run starts from step 0"
    )
    raise NonFiniteError(
        f"step {step}: the loss or the gradients were not finite in {in_a_row} steps in a row (steps "
        f"{step - in_a_row + 1} to {step}; optim.max_consecutive_nonfinite is {limit}), so the run stops. Things to "
        f"try: a lower optim.lr (this step's was {lr:.3g}) or a longer warmup (optim.warmup_steps); a lower "
        "optim.max_grad_norm; model.dtype bf16 or fp32 if it is fp16; check the data with `tailor validate CONFIG`. "
        f"Then run the same command: {where}."
    )


def out_of_memory_message(error: BaseException) -> str:
    """What a run that ran out of GPU memory prints: PyTorch's first line, and what to change, largest lever first."""
    return (
        f"out of GPU memory: {first_line(error)}\nThings to try, in this order: a lower seq_len (activation memory "
        "grows with it, and packing keeps shorter sequences full); model.activation_checkpointing: true and "
        "model.checkpointing_scope: block; batch_size: 1 with a higher grad_accumulation (the same batch in more "
        "micro-batches); more GPUs (FSDP shards the weights over them). Checkpoints already saved are kept: with "
        "resume: auto the same command continues from the newest one."
    )
