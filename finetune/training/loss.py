"""Cross-entropy over the output head, chunk by chunk, so the fp32 logits of a whole sequence never exist.

With Nemo's 131072-token vocabulary, the logits of 32768 tokens are 17 GB in fp32. Here each chunk of
`chunk_size` tokens is projected, upcast, reduced to its loss, and dropped; backward recomputes the chunk's
logits (activation checkpointing per chunk), so peak memory is that of one chunk, forward and backward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.attention import to_device

DEFAULT_CHUNK_SIZE = 2048


@dataclass
class LossSums:
    """Sums, not means, so ranks and micro-batches add up before the one division of a step."""

    loss_sum: torch.Tensor  # Σ weight · CE, fp32, differentiable
    weight_sum: torch.Tensor  # Σ weight
    correct: torch.Tensor  # trained targets (weight > 0) whose argmax is the target
    n_trained: torch.Tensor  # targets with weight > 0


def _chunk_loss(
    project: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    logits = project(hidden).float()
    ce = F.cross_entropy(logits, targets, reduction="none")
    correct = ((logits.argmax(-1) == targets) & (weights > 0)).sum()
    return (ce * weights).sum(), correct


def chunked_cross_entropy(
    hidden: torch.Tensor,
    output: nn.Module | torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> LossSums:
    """Weighted CE of `output(hidden)` against `targets`; `output` is the head module or its weight [V, dim]."""
    project = output if isinstance(output, nn.Module) else (lambda h: F.linear(h, output))
    weights = weights.float()
    loss_sum = hidden.new_zeros((), dtype=torch.float32)
    correct = torch.zeros((), dtype=torch.long, device=hidden.device)
    # No trained target at all still runs one empty chunk: the loss stays differentiable (backward works) and the
    # head joins backward on every rank, so FSDP's gradient reduce-scatters stay matched across ranks.
    for start in range(0, hidden.shape[0], chunk_size) or [0]:
        chunk = slice(start, start + chunk_size)
        args = (project, hidden[chunk], targets[chunk], weights[chunk])
        if torch.is_grad_enabled():
            loss, right = checkpoint(_chunk_loss, *args, use_reentrant=False)
        else:
            loss, right = _chunk_loss(*args)
        loss_sum = loss_sum + loss
        correct = correct + right
    return LossSums(loss_sum, weights.sum(), correct, (weights > 0).sum())


class CausalLMWithLoss(nn.Module):
    """The model and its loss in one forward, so FSDP2 (applied with this as root) keeps the output head
    unsharded for exactly as long as the chunked loss needs it."""

    def __init__(self, model: nn.Module, chunk_size: int = DEFAULT_CHUNK_SIZE):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def forward(
        self,
        tokens: torch.Tensor,
        seqlens: list[int],
        positions: torch.Tensor,
        targets: torch.Tensor,
        weights: torch.Tensor,
    ) -> LossSums:
        """`positions` are the indices of the trained targets (weight > 0); `targets` and `weights` are theirs.
        In instruction data most targets are prompt tokens with weight 0: their logits are never computed."""
        hidden = self.model.hidden_states(tokens, seqlens)[positions]
        return chunked_cross_entropy(hidden, self.model.output, targets, weights, self.chunk_size)


def loss_inputs(batch, device: torch.device) -> dict:
    """A Batch as CausalLMWithLoss's arguments. The trained positions are found on the CPU, where the batch is,
    and everything goes to the device through pinned memory, so the host never waits for the device here."""
    positions = batch.weights.nonzero().squeeze(1)
    return dict(
        tokens=to_device(batch.tokens, device),
        seqlens=batch.seqlens,
        positions=to_device(positions, device),
        targets=to_device(batch.targets[positions], device),
        weights=to_device(batch.weights[positions], device),
    )
