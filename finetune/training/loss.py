"""Cross-entropy over the output head, chunk by chunk, with the gradients computed in the forward pass.

With Nemo's 131072-token vocabulary, the logits of 32768 tokens are 17 GB in fp32. Here each chunk of
`chunk_size` tokens is projected, upcast and reduced to its loss, and while its softmax is at hand the chunk's
gradients with respect to its hidden states (and the head's weight, and the head's LoRA, when they are trained)
are computed and kept; then the chunk's logits are dropped. Backward only scales what was stored, as fused linear
cross-entropy kernels do: no logits are recomputed, so the head runs two large matmuls per chunk where recomputing
them in backward ran three, and the peak memory stays that of one chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from finetune.config import DEFAULT_CHUNK_SIZE
from model.attention import to_device
from model.lora import LoRALinear


@dataclass
class LossSums:
    """Sums, not means, so ranks and micro-batches add up before the one division of a step."""

    loss_sum: torch.Tensor  # Σ weight · CE, fp32, differentiable
    weight_sum: torch.Tensor  # Σ weight
    n_trained: torch.Tensor  # targets with weight > 0
    correct: torch.Tensor | None  # trained targets whose argmax is the target; counted when asked for (eval)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Σ weight · CE of `hidden @ weight.T + scaling · (lora_input @ lora_a.T) @ lora_b.T`, chunk by chunk, and the
    number of trained targets whose argmax is right when `accuracy`. With `take_grads`, the gradient of every input
    that requires one is made in forward; backward multiplies them by the incoming gradient, in place, once."""

    @staticmethod
    def forward(
        ctx, hidden, lora_input, weight, lora_a, lora_b, targets, weights, scaling, chunk_size, take_grads, accuracy
    ):
        inputs = (hidden, lora_input, weight, lora_a, lora_b)
        wants = [take_grads and need for need in ctx.needs_input_grad[:5]]
        # Each chunk writes its rows of the hidden states' gradient, the others add up from zero (LoRA's in fp32): an
        # empty batch still gives the head its gradient, and FSDP's reduce-scatters stay matched across ranks.
        grads = [
            None
            if not want
            else torch.empty_like(t)
            if i == 0
            else torch.zeros_like(t, dtype=torch.float32 if i > 2 else None)
            for i, (t, want) in enumerate(zip(inputs, wants))
        ]
        grad_hidden, grad_lora_input, grad_weight, grad_a, grad_b = grads
        shared_input = lora_input is hidden  # no dropout on the head's adapter: one input, one gradient
        if shared_input:
            grad_lora_input = grad_hidden
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        correct = torch.zeros((), dtype=torch.long, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            chunk = slice(start, start + chunk_size)
            h, t, w = hidden[chunk], targets[chunk, None], weights[chunk, None]
            logits = F.linear(h, weight)
            if lora_a is not None:
                x = lora_input[chunk]
                u = F.linear(x, lora_a)
                logits.addmm_(u, lora_b.t(), alpha=scaling)
            if accuracy:
                correct += ((logits.argmax(-1, keepdim=True) == t) & (w > 0)).sum()
            log_probs = torch.log_softmax(logits.float(), dim=-1)
            del logits
            loss_sum -= (log_probs.gather(1, t) * w).sum()
            if not any(wants):
                del log_probs
                continue
            # d(Σ w·CE)/d logits = w · (softmax - one_hot(target)), made in place of the log-probabilities, and cast
            # to the compute dtype as autograd casts it back through `.float()`
            grad_logits = log_probs.exp_().mul_(w).scatter_add_(1, t, -w).to(hidden.dtype)
            if grad_hidden is not None:
                torch.mm(grad_logits, weight, out=grad_hidden[chunk])
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.t(), h)
            if lora_a is not None:
                if grad_b is not None:
                    grad_b.add_(grad_logits.t().mm(u), alpha=scaling)
                grad_u = grad_logits.mm(lora_b).mul_(scaling)
                if grad_lora_input is not None:
                    grad_lora_input[chunk].addmm_(grad_u, lora_a)
                if grad_a is not None:
                    grad_a.add_(grad_u.t().mm(x))
            del log_probs, grad_logits  # before the next chunk's logits: two [chunk, vocab] tensors at most
        if grad_a is not None:
            grad_a = grad_a.to(lora_a.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(lora_b.dtype)
        ctx.grads = (grad_hidden, None if shared_input else grad_lora_input, grad_weight, grad_a, grad_b)
        ctx.mark_non_differentiable(correct)
        return loss_sum, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct):
        grads = [None if g is None else g.mul_(grad_loss) for g in ctx.grads]
        ctx.grads = None  # scaled in place: a second backward through the same loss has nothing left
        return (*grads, *[None] * 6)


def chunked_cross_entropy(
    hidden: torch.Tensor,
    output: nn.Module | torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    accuracy: bool = False,
) -> LossSums:
    """Weighted cross-entropy of `output(hidden)` against `targets`, chunk by chunk (the module docstring).

    Args:
        hidden: the hidden states of the trained positions, [tokens, dim].
        output: the head (an nn.Linear, or a LoRALinear computed as its forward does) or its weight [vocab, dim].
        weights: each target's weight; 0 leaves it out.
        chunk_size: tokens projected to the vocabulary at a time.
        accuracy: also count the trained targets whose argmax is right (eval's token accuracy), an argmax over the
            vocabulary per token that training does not need.

    Returns:
        The sums of the batch: Σ weight · CE (differentiable), Σ weight, the trained targets, and the right ones
        with `accuracy`.

    Raises:
        ValueError: `output` is a DoRA head, which the chunked loss does not compute.
    """
    lora_input = lora_a = lora_b = None
    scaling = 0.0
    if isinstance(output, torch.Tensor):
        weight = output
    else:
        weight = output.weight
        if isinstance(output, LoRALinear) and not output.merged:
            if output.lora_magnitude is not None:  # refused by the config's checks; never computed as plain LoRA
                raise ValueError("DoRA on the output head is not supported by the chunked loss")
            # as LoRALinear.forward: its fp32 factors cast to the activations' dtype (differentiably), dropout first
            lora_input = output.dropout(hidden)
            lora_a, lora_b = output.lora_A.weight.to(hidden.dtype), output.lora_B.weight.to(hidden.dtype)
            scaling = output.scaling
    weights = weights.float()
    loss_sum, correct = _FusedLinearCrossEntropy.apply(
        hidden,
        lora_input,
        weight,
        lora_a,
        lora_b,
        targets,
        weights,
        scaling,
        chunk_size,
        torch.is_grad_enabled(),
        accuracy,
    )
    return LossSums(loss_sum, weights.sum(), (weights > 0).sum(), correct if accuracy else None)


class CausalLMWithLoss(nn.Module):
    """The model and its loss in one forward.

    FSDP2, applied with this as root, so keeps the output head unsharded for exactly as long as the chunked loss
    needs it.
    """

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
        accuracy: bool = False,
    ) -> LossSums:
        """The loss sums of a packed batch, its logits computed at the trained positions only.

        In instruction data most targets are prompt tokens with weight 0: their logits are never computed.

        Args:
            seqlens: the lengths of the documents packed in `tokens`, which attend only within themselves.
            positions: the indices of the trained targets (weight > 0); `targets` and `weights` are theirs.
            accuracy: also count the trained targets whose argmax is right (eval).
        """
        hidden = self.model.hidden_states(tokens, seqlens)[positions]
        return chunked_cross_entropy(hidden, self.model.output, targets, weights, self.chunk_size, accuracy)

    def logits(self, tokens: torch.Tensor, seqlens: list[int], cache=None) -> torch.Tensor:
        """The model's logits, for generation at an eval; under FSDP2 a forward method of the root (parallel.py)."""
        return self.model(tokens, seqlens, cache)


def loss_inputs(batch, device: torch.device) -> dict:
    """A Batch as CausalLMWithLoss's arguments, on `device`.

    The trained positions are found on the CPU, where the batch is, and everything goes to the device through pinned
    memory, so the host never waits for the device here.
    """
    positions = batch.weights.nonzero().squeeze(1)
    return dict(
        tokens=to_device(batch.tokens, device),
        seqlens=batch.seqlens,
        positions=to_device(positions, device),
        targets=to_device(batch.targets[positions], device),
        weights=to_device(batch.weights[positions], device),
    )
