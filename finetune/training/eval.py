"""Evaluation: loss, perplexity and token accuracy over the whole eval set, the same on 1 or N ranks."""

from __future__ import annotations

import math

import torch
from torch import nn

from finetune.training.distributed import all_reduce_sum
from finetune.training.loss import loss_inputs


@torch.no_grad()
def evaluate(loss_model: nn.Module, batches: list, device: torch.device) -> dict[str, float]:
    """Evaluate on this rank's batches, summed over every rank; a collective.

    Token-weighted over every batch of every rank: Σ weight·CE ÷ Σ weight, not a mean of batch means.

    Returns:
        eval_loss, eval_perplexity, eval_token_accuracy and eval_tokens (the trained targets); the loss and accuracy
        are NaN when nothing is trained.
    """
    was_training = loss_model.training
    loss_model.eval()
    # loss sum, weight sum, correct, trained targets; fp64 so the sums do not depend on the rank count
    totals = torch.zeros(4, dtype=torch.float64, device=device)
    for batch in batches:
        sums = loss_model(**loss_inputs(batch, device), accuracy=True)
        totals += torch.stack([sums.loss_sum, sums.weight_sum, sums.correct, sums.n_trained]).to(totals)
    loss_model.train(was_training)
    loss_sum, weight_sum, correct, trained = all_reduce_sum(totals).tolist()
    loss = loss_sum / weight_sum if weight_sum > 0 else float("nan")
    return dict(
        eval_loss=loss,
        eval_perplexity=math.exp(min(loss, 700.0)),
        eval_token_accuracy=correct / trained if trained else float("nan"),
        eval_tokens=int(trained),
    )
