"""The chunked loss equals the naive weighted cross-entropy, in value, gradients and eval metrics, in a fraction of
its memory."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.live_bytes import PeakLiveBytes
from finetune.training import loss as loss_module
from finetune.training.eval import evaluate
from finetune.training.loss import CausalLMWithLoss, chunked_cross_entropy, loss_inputs
from model.lora import LoRALinear


def naive(hidden, weight, targets, weights):
    logits = (hidden @ weight.T).float()
    return (F.cross_entropy(logits, targets, reduction="none") * weights).sum(), logits


@pytest.mark.parametrize("chunk_size", [1, 8, 36, 37, 64])
@pytest.mark.parametrize("head_trained", [True, False])
def test_chunked_loss_and_gradients_equal_the_naive_path(chunk_size, head_trained):
    """Every chunk boundary (one token per chunk, chunks that do not divide the tokens, one chunk for all), a
    trained and a frozen head, fractional and zero loss weights; backward scaled as the training step scales it."""
    torch.manual_seed(0)
    n, dim, vocab = 37, 16, 50
    hidden = torch.randn(n, dim, requires_grad=True)
    weight = torch.randn(vocab, dim, requires_grad=head_trained)
    targets = torch.randint(0, vocab, (n,))
    weights = torch.rand(n)
    weights[::3] = 0.0  # untrained targets
    weights[1] = 0.25  # a fractional weight

    sums = chunked_cross_entropy(hidden, weight, targets, weights, chunk_size=chunk_size, accuracy=True)
    (sums.loss_sum * 0.3).backward()
    grads = hidden.grad.clone(), weight.grad
    hidden.grad = weight.grad = None
    expected, logits = naive(hidden, weight, targets, weights)
    (expected * 0.3).backward()

    torch.testing.assert_close(sums.loss_sum, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0], hidden.grad, rtol=1e-5, atol=1e-6)
    if head_trained:
        torch.testing.assert_close(grads[1], weight.grad, rtol=1e-5, atol=1e-6)
    else:
        assert grads[1] is None
    trained = weights > 0
    assert sums.n_trained.item() == int(trained.sum()) == 24
    assert sums.correct.item() == int(((logits.argmax(-1) == targets) & trained).sum())
    assert sums.weight_sum.item() == float(weights.sum())


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("head_trained", [True, False])
def test_a_lora_head_gets_the_gradients_of_its_own_forward(dropout, head_trained):
    """LoRA on the head (`output` in lora.targets), with and without the adapter's dropout, with the head's weight
    frozen (as in training) or trained: loss and every gradient as autograd through LoRALinear.forward gives them."""
    torch.manual_seed(0)
    n, dim, vocab = 29, 12, 40
    head = LoRALinear(nn.Linear(dim, vocab, bias=False), rank=4, alpha=8.0, dropout=dropout)
    nn.init.normal_(head.lora_B.weight)  # B starts at zero; a non-zero B gives A and the input a gradient
    head.weight.requires_grad_(head_trained)
    hidden = torch.randn(n, dim, requires_grad=True)
    targets, weights = torch.randint(0, vocab, (n,)), torch.rand(n)
    weights[::4] = 0.0
    params = [hidden, head.lora_A.weight, head.lora_B.weight] + ([head.weight] if head_trained else [])

    torch.manual_seed(1)  # the same dropout mask in both paths
    sums = chunked_cross_entropy(hidden, head, targets, weights, chunk_size=8)
    (sums.loss_sum * 2.0).backward()
    grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    torch.manual_seed(1)
    expected = (F.cross_entropy(head(hidden), targets, reduction="none") * weights).sum()
    (expected * 2.0).backward()

    torch.testing.assert_close(sums.loss_sum, expected, rtol=1e-5, atol=1e-5)
    for got, p in zip(grads, params):
        torch.testing.assert_close(got, p.grad, rtol=1e-5, atol=1e-5)
    assert head.weight.grad is None or head_trained


def test_a_head_module_is_called_chunk_by_chunk():
    torch.manual_seed(0)
    head = nn.Linear(8, 20, bias=False)
    hidden, targets, weights = torch.randn(10, 8), torch.randint(0, 20, (10,)), torch.ones(10)
    by_module = chunked_cross_entropy(hidden, head, targets, weights, chunk_size=3).loss_sum
    by_weight = chunked_cross_entropy(hidden, head.weight, targets, weights, chunk_size=10).loss_sum
    torch.testing.assert_close(by_module, by_weight)


def test_only_trained_positions_reach_the_head(monkeypatch):
    """Targets of weight 0 (prompts) never get logits: the loss model projects only the trained positions."""

    class OneHotLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.output = nn.Linear(4, 11, bias=False)

        def hidden_states(self, tokens, seqlens):
            return torch.nn.functional.one_hot(tokens, 4).float()

    rows = []

    def recording(hidden, *args):
        rows.append(hidden.shape[0])
        return chunked_cross_entropy(hidden, *args)

    monkeypatch.setattr(loss_module, "chunked_cross_entropy", recording)
    batch = type("Batch", (), {})()
    batch.tokens = torch.tensor([0, 1, 2, 3, 0, 1])
    batch.targets = torch.tensor([1, 2, 3, 0, 1, 2])
    batch.weights = torch.tensor([0.0, 0.0, 1.0, 0.5, 0.0, 1.0])
    batch.seqlens = [4, 2]
    model = OneHotLM()
    sums = CausalLMWithLoss(model)(**loss_inputs(batch, torch.device("cpu")))
    assert rows == [3]
    logits = model.output.weight.T[batch.tokens]
    expected = (F.cross_entropy(logits, batch.targets, reduction="none") * batch.weights).sum()
    torch.testing.assert_close(sums.loss_sum, expected)


def test_a_batch_without_trained_targets_still_has_a_differentiable_loss():
    """Every rank must run backward through the head even when it has nothing to train, or FSDP's gradient
    collectives would wait forever for it."""
    hidden = torch.randn(0, 8, requires_grad=True)  # no trained positions
    head = nn.Linear(8, 20, bias=False)
    sums = chunked_cross_entropy(hidden, head, torch.zeros(0, dtype=torch.long), torch.zeros(0))
    (sums.loss_sum * 3.0).backward()
    assert sums.loss_sum.item() == 0.0 and sums.n_trained.item() == 0 and sums.correct is None
    assert head.weight.grad is not None and head.weight.grad.abs().sum().item() == 0.0


def test_peak_memory_is_under_an_eighth_of_the_naive_path():
    torch.manual_seed(0)
    n, dim, vocab, chunk = 2048, 32, 8192, 128
    hidden = torch.randn(n, dim, requires_grad=True)
    weight = torch.randn(vocab, dim, requires_grad=True)
    targets, weights = torch.randint(0, vocab, (n,)), torch.ones(n)

    with PeakLiveBytes() as naive_peak:
        naive(hidden, weight, targets, weights)[0].backward()
    with PeakLiveBytes() as chunked_peak:
        chunked_cross_entropy(hidden, weight, targets, weights, chunk_size=chunk).loss_sum.backward()

    logits_bytes = n * vocab * 4
    assert naive_peak.peak >= 3 * logits_bytes  # the tracker sees the naive path's fp32 logits, log-probs and grads
    assert chunked_peak.peak <= naive_peak.peak / 8
    # What remains is two [chunk, vocab] fp32 tensors (log-probabilities, the next chunk's logits), and the inputs'
    # gradients with their temporaries: stored in forward, scaled in backward.
    assert chunked_peak.peak <= 2 * chunk * vocab * 4 + 3 * (n + vocab) * dim * 4


def test_eval_metrics_are_token_weighted_over_all_batches():
    class EmbeddingLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.output = nn.Embedding(12, 6), nn.Linear(6, 12, bias=False)
            self.modes = []

        def hidden_states(self, tokens, seqlens):
            self.modes.append(self.training)
            return self.embed(tokens)

    torch.manual_seed(0)
    model = EmbeddingLM()
    batches = [
        SimpleNamespace(
            tokens=torch.tensor([1, 2, 3, 4]),
            targets=torch.tensor([2, 3, 4, 5]),
            weights=torch.tensor([0.0, 1.0, 0.5, 1.0]),
            seqlens=[4],
        ),
        SimpleNamespace(
            tokens=torch.tensor([5, 6]), targets=torch.tensor([6, 7]), weights=torch.tensor([0.0, 1.0]), seqlens=[2]
        ),
    ]
    loss_model = CausalLMWithLoss(model).train()
    metrics = evaluate(loss_model, batches, torch.device("cpu"))

    tokens, targets, weights = (torch.cat([getattr(b, k) for b in batches]) for k in ("tokens", "targets", "weights"))
    with torch.no_grad():
        loss_sum, logits = naive(model.embed(tokens), model.output.weight, targets, weights)
    trained = weights > 0
    assert metrics["eval_loss"] == pytest.approx(loss_sum.item() / 3.5, rel=1e-6)  # Σ w·CE ÷ Σ w, one division
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]), rel=1e-9)
    correct = int(((logits.argmax(-1) == targets) & trained).sum())
    assert metrics["eval_token_accuracy"] == pytest.approx(correct / 4)
    assert metrics["eval_tokens"] == 4
    assert model.modes == [False, False] and loss_model.training  # dropout off in eval, training mode given back
