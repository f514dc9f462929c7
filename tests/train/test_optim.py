"""The schedule's values at known steps, and AdamW's betas left alone."""

import math

import pytest
import torch

from finetune.config import OptimConfig
from finetune.optim import build_optimizer, lr_at_step, set_lr, warmup_steps_for


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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_fused_kernel_on_gpus_only():
    on_gpu = build_optimizer([torch.nn.Parameter(torch.ones(3, device="cuda"))], OptimConfig())
    on_cpu = build_optimizer([torch.nn.Parameter(torch.ones(3))], OptimConfig())
    assert on_gpu.defaults["fused"] is True and not on_cpu.defaults["fused"]
