"""fp16 for GPUs without bf16, on CPU: dynamic loss scaling follows the fp32 run, an overflow is skipped and backs the
scale off, good steps grow it, and a resumed run goes on with the saved scale."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launching import REPO, records, subprocess_env

from finetune.config import load_config
from finetune.data import build_eval_batches, load_tokenizer
from finetune.data.sources import open_run_data
from finetune.training.distributed import DistInfo
from finetune.training.loss_scale import INITIAL_SCALE, DynamicLossScale, loss_scale_for
from finetune.training.model_setup import build_training_model
from finetune.training.optim import build_optimizer
from finetune.training.precision import compute_dtype
from finetune.training.train_state import Progress
from finetune.training.train_step import train_step
from model.args import load_model_args
from model.lora import lora_state_dict

CPU = torch.device("cpu")


def run_steps(cfg, steps: int, overflow_at: int | None = None):
    """`steps` optimizer steps on the same two sequences; at step `overflow_at` the first block's output is pushed
    past fp16's range (a forward hook: the test's seam). Returns the step outcomes, the scales after each step and
    the adapters."""
    data = open_run_data(cfg.data, load_tokenizer(cfg.model.path), cache_dir=Path(cfg.data.cache_dir))
    batches = build_eval_batches(data, seq_len=cfg.seq_len, batch_size=1, rank=0, world_size=1)[:2]
    torch.manual_seed(0)
    model = build_training_model(cfg, load_model_args(cfg.model.path), DistInfo(0, 1, 0, CPU))
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], cfg.optim)
    loss_scale = loss_scale_for(cfg, Progress(), CPU)
    current_step = [0]

    def overflow(module, inputs, output):
        return output * 1e6 if current_step[0] == overflow_at else output

    model.model.layers[0].register_forward_hook(overflow)
    outcomes, scales = [], []
    for step in range(1, steps + 1):
        current_step[0] = step
        sums = train_step(model, optimizer, batches, CPU, 1.0, 1, loss_scale=loss_scale)
        outcomes.append(sums.outcome())
        scales.append(loss_scale.scale.item() if loss_scale else None)
    adapters = {k: v.detach().clone() for k, v in lora_state_dict(model.model).items()}
    return outcomes, scales, adapters


def test_fp16_with_loss_scaling_follows_fp32_and_an_overflow_is_skipped_and_backs_off(write_config):
    lr = 1e-3
    fp32 = run_steps(load_config(write_config(optim__lr=lr)), 6)
    fp16_cfg = load_config(write_config(optim__lr=lr, model__dtype="fp16"))
    assert compute_dtype(fp16_cfg.model.dtype, CPU) == torch.float16
    fp16 = run_steps(fp16_cfg, 6)
    assert fp32[1] == [None] * 6 and fp16[1] == [INITIAL_SCALE] * 6  # no overflow: the scale stays
    losses32 = torch.tensor([o.loss for o in fp32[0]])
    losses16 = torch.tensor([o.loss for o in fp16[0]])
    torch.testing.assert_close(losses16, losses32, rtol=5e-3, atol=0)
    assert losses16[-1] < losses16[0] - 0.1
    for name, expected in fp32[2].items():
        got = fp16[2][name]
        assert got.dtype == torch.float32, name  # fp32 master weights
        assert (got - expected).abs().max() <= 2 * lr * 6, name
        if "lora_B" in name:
            assert torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0) > 0.98, name

    # An overflow at step 3 is skipped (nothing moves) and halves the scale; the run goes on as if the step had
    # never been: powers of two scale and unscale the other steps' gradients without changing a bit.
    outcomes, scales, adapters = run_steps(fp16_cfg, 7, overflow_at=3)
    assert [o.finite for o in outcomes] == [True, True, False, True, True, True, True]
    assert scales == [INITIAL_SCALE] * 2 + [INITIAL_SCALE / 2] * 5
    assert [o.loss for i, o in enumerate(outcomes) if i != 2] == [o.loss for o in fp16[0]]
    assert all(torch.equal(adapters[name], fp16[2][name]) for name in adapters)


def test_the_scale_halves_on_an_overflow_and_doubles_after_the_growth_interval():
    scale = DynamicLossScale(CPU, growth_interval=3, scale=1024.0)
    seen = []
    for nonfinite in (0, 0, 1, 0, 0, 0, 0, 1, 1):
        scale.update(torch.tensor(float(nonfinite)))
        seen.append(scale.state()["loss_scale"])
    assert seen == [1024, 1024, 512, 512, 512, 1024, 1024, 512, 256]
    assert scale.state() == {"loss_scale": 256.0, "loss_scale_good_steps": 0}
    grads = [torch.tensor([3.0 * 256, -1.5 * 256])]
    param = torch.nn.Parameter(torch.zeros(2))
    param.grad = grads[0]
    scale.unscale_([param])
    assert param.grad.tolist() == [3.0, -1.5]


def test_a_resumed_fp16_run_goes_on_with_the_saved_scale(write_config, tmp_path):
    """At growth interval 3 the scale doubles after step 3, overflows at step 4 and is halved: a resume from step
    3 that started from 2^16 again would skip other steps."""
    config = write_config(
        model__dtype="fp16",
        max_steps=8,
        checkpoint__freq=3,
        checkpoint__keep=3,
        eval__enabled=False,
        optim__loss_scale_growth_interval=3,
    )

    def train(run_dir):
        result = subprocess.run(
            [sys.executable, "train.py", str(config), f"run_dir={run_dir}"],
            cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-5000:]

    def numbers(run_dir):
        return [(r["step"], r["loss"], r["grad_norm"], r["skipped"]) for r in records(run_dir, "train")]

    def saved(run_dir, step):
        progress = json.loads((run_dir / f"checkpoints/checkpoint_{step:06d}/state/progress.json").read_text())
        return progress["loss_scale"], progress["loss_scale_good_steps"], progress["nonfinite_skipped"]

    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    train(whole)
    assert saved(whole, 3) == (2 * INITIAL_SCALE, 0, 0)
    assert [step for step, *_, skipped in numbers(whole) if skipped] == [4, 8]  # overflows
    shutil.copytree(whole, resumed)
    for step in (6, 8):
        shutil.rmtree(resumed / f"checkpoints/checkpoint_{step:06d}")
    train(resumed)
    assert numbers(resumed) == numbers(whole)
    assert saved(resumed, 8) == saved(whole, 8)


@pytest.mark.parametrize("name, expected", [("bf16", torch.bfloat16), ("fp16", torch.float16), ("auto", torch.float32)])
def test_auto_is_fp32_on_cpu(name, expected):
    assert compute_dtype(name, CPU) == expected
