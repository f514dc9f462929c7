"""The schedule's values at known steps, the steps that evaluate and checkpoint, AdamW's betas left alone, and a
non-finite step skipped on the device."""

import math

import pytest
import torch

from finetune.config import OptimConfig
from finetune.training.optim import build_optimizer, due_at, lr_at_step, set_lr, warmup_steps_for
from finetune.training.train_step import skip_step_if_nonfinite


def test_warmup_then_cosine_at_known_steps():
    cfg = OptimConfig(lr=1e-4, min_lr=1e-5, warmup_steps=10)
    assert lr_at_step(1, cfg, 110) == pytest.approx(1e-5)  # the first step already learns
    assert lr_at_step(5, cfg, 110) == pytest.approx(5e-5)
    assert lr_at_step(10, cfg, 110) == pytest.approx(1e-4)  # the end of warmup reaches lr
    assert lr_at_step(60, cfg, 110) == pytest.approx(1e-5 + 9e-5 * 0.5)  # halfway through the decay
    assert lr_at_step(35, cfg, 110) == pytest.approx(1e-5 + 9e-5 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at_step(110, cfg, 110) == pytest.approx(1e-5)  # min_lr at the last step


def test_warmup_fraction_mistral_finetune_pct_start():
    cfg = OptimConfig(lr=6e-5, warmup_fraction=0.05)
    assert warmup_steps_for(cfg, 300) == 15
    assert lr_at_step(15, cfg, 300) == pytest.approx(6e-5)
    assert lr_at_step(3, cfg, 300) == pytest.approx(6e-5 * 3 / 15)
    assert warmup_steps_for(OptimConfig(warmup_steps=0), 10) == 0
    assert lr_at_step(1, OptimConfig(lr=1.0, warmup_steps=0), 11) == pytest.approx(0.5 * (1 + math.cos(math.pi / 11)))


def test_the_scheduler_never_touches_betas():
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = build_optimizer([param], OptimConfig(betas=[0.9, 0.95], weight_decay=0.1))
    for step in range(1, 30):
        set_lr(optimizer, lr_at_step(step, OptimConfig(), 30))
        param.grad = torch.ones(3)
        optimizer.step()
    group = optimizer.param_groups[0]
    assert group["betas"] == (0.9, 0.95)
    assert group["weight_decay"] == 0.1
    assert group["lr"] == pytest.approx(lr_at_step(29, OptimConfig(), 30))


def test_a_nonfinite_step_changes_nothing_and_the_next_one_steps():
    """The skip is decided on the device (fused AdamW's found_inf): weights, moments and step count stay put."""
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = build_optimizer([param], OptimConfig(lr=0.1))
    assert optimizer.defaults["fused"] is True
    param.grad = torch.tensor([1.0, -2.0, 3.0])
    skip_step_if_nonfinite(optimizer, torch.tensor(0.0))
    after_one = param.detach().clone(), {k: v.clone() for k, v in optimizer.state[param].items()}
    assert not torch.equal(after_one[0], torch.ones(3))

    param.grad = torch.tensor([float("nan"), 1.0, float("inf")])
    skip_step_if_nonfinite(optimizer, torch.tensor(1.0))
    assert torch.equal(param.detach(), after_one[0])
    for key, value in optimizer.state[param].items():
        assert torch.equal(value, after_one[1][key]), key
    assert float(optimizer.state[param]["step"]) == 1.0

    param.grad = torch.tensor([1.0, -2.0, 3.0])
    skip_step_if_nonfinite(optimizer, torch.tensor(0.0))
    assert float(optimizer.state[param]["step"]) == 2.0
    assert (param.detach() - after_one[0]).abs().min() > 0.05


def test_eval_and_checkpoint_steps_are_every_freq_steps_and_the_last_and_freq_0_is_the_last_only():
    assert [step for step in range(1, 11) if due_at(step, 4, 10)] == [4, 8, 10]
    assert [step for step in range(1, 9) if due_at(step, 4, 8)] == [4, 8]
    assert [step for step in range(1, 11) if due_at(step, 0, 10)] == [10]
