"""The chunked loss equals the naive weighted cross-entropy, in value and gradients."""

import torch
import torch.nn.functional as F
from torch import nn

from finetune.loss import CausalLMWithLoss, chunked_cross_entropy, loss_inputs


def naive(hidden, weight, targets, weights):
    logits = (hidden @ weight.T).float()
    return (F.cross_entropy(logits, targets, reduction="none") * weights).sum(), logits


def test_chunked_loss_and_gradients_equal_the_naive_path():
    torch.manual_seed(0)
    n, dim, vocab = 37, 16, 50
    hidden = torch.randn(n, dim, requires_grad=True)
    weight = torch.randn(vocab, dim, requires_grad=True)
    targets = torch.randint(0, vocab, (n,))
    weights = torch.rand(n)
    weights[::3] = 0.0  # untrained targets
    weights[1] = 0.25  # a fractional weight

    sums = chunked_cross_entropy(hidden, weight, targets, weights, chunk_size=8)
    sums.loss_sum.backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    expected, logits = naive(hidden, weight, targets, weights)
    expected.backward()

    torch.testing.assert_close(sums.loss_sum, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0], hidden.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[1], weight.grad, rtol=1e-5, atol=1e-6)
    trained = weights > 0
    assert sums.n_trained.item() == int(trained.sum()) == 24
    assert sums.correct.item() == int(((logits.argmax(-1) == targets) & trained).sum())
    assert sums.weight_sum.item() == float(weights.sum())


def test_a_head_module_is_called_chunk_by_chunk():
    torch.manual_seed(0)
    head = nn.Linear(8, 20, bias=False)
    hidden, targets, weights = torch.randn(10, 8), torch.randint(0, 20, (10,)), torch.ones(10)
    by_module = chunked_cross_entropy(hidden, head, targets, weights, chunk_size=3).loss_sum
    by_weight = chunked_cross_entropy(hidden, head.weight, targets, weights, chunk_size=10).loss_sum
    torch.testing.assert_close(by_module, by_weight)


def test_only_trained_positions_reach_the_head():
    """Targets of weight 0 (prompts) never get logits: the loss model projects only the trained positions."""

    class Recorder(nn.Module):
        def __init__(self):
            super().__init__()
            self.output = nn.Linear(4, 11, bias=False)
            self.rows = []
            hook = lambda module, args: self.rows.append(args[0].shape[0])  # noqa: E731
            self.output.register_forward_pre_hook(hook)

        def hidden_states(self, tokens, seqlens):
            return torch.nn.functional.one_hot(tokens, 4).float()

    batch = type("Batch", (), {})()
    batch.tokens = torch.tensor([0, 1, 2, 3, 0, 1])
    batch.targets = torch.tensor([1, 2, 3, 0, 1, 2])
    batch.weights = torch.tensor([0.0, 0.0, 1.0, 0.5, 0.0, 1.0])
    batch.seqlens = [4, 2]
    model = Recorder()
    sums = CausalLMWithLoss(model)(**loss_inputs(batch, torch.device("cpu")))
    assert model.rows == [3]
    logits = model.output.weight.T[batch.tokens]
    expected = (F.cross_entropy(logits, batch.targets, reduction="none") * batch.weights).sum()
    torch.testing.assert_close(sums.loss_sum, expected)
