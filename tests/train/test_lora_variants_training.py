"""The LoRA variants and `epochs` in training: LoRA+'s optimizer step against peft's, the config's checks, and a
2-rank run (gloo, FSDP2) of DoRA + rsLoRA + LoRA+ planned in epochs, stopped and resumed exactly."""

import json
import math
import signal
import subprocess

import pytest
import torch
from launching import REPO, records, subprocess_env, torchrun
from safetensors.torch import load_file
from torch import nn

import train as train_script
from finetune import exit_codes
from finetune.cli import main as tailor
from finetune.config import ConfigError, OptimConfig, load_config
from finetune.data import load_tokenizer, tokenize_sample
from finetune.planning.epochs import steps_for_epochs
from finetune.planning.memory_estimate import lora_parameters
from finetune.training.distributed import DistInfo
from finetune.training.model_setup import build_training_model
from finetune.training.optim import build_optimizer, lora_param_groups, set_lr
from model.args import load_model_args
from model.lora import LoRALinear

peft = pytest.importorskip("peft")
TIMEOUT = 300


class OneLayer(nn.Module):
    def __init__(self, proj: nn.Module):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


def test_lora_plus_step_equals_peft_loraplus_optimizer():
    """One AdamW step with B and DoRA's magnitudes at 4 x lr: the weights after it are peft's."""
    from peft.optimizers import create_loraplus_optimizer

    weight = torch.randn(24, 16, generator=torch.Generator().manual_seed(0))
    base = nn.Linear(16, 24, bias=False)
    base.weight.data.copy_(weight)
    config = peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["proj"], init_lora_weights=False)
    reference = peft.get_peft_model(OneLayer(base), config)
    layer = reference.base_model.model.proj
    ours = OneLayer(LoRALinear(nn.Linear(16, 24, bias=False), 4, 8.0, dora=True))
    with torch.no_grad():
        ours.proj.weight.copy_(weight)
        ours.proj.lora_A.weight.copy_(layer.lora_A["default"].weight)
        ours.proj.lora_B.weight.copy_(layer.lora_B["default"].weight)
        ours.proj.lora_magnitude.weight.copy_(layer.lora_magnitude_vector["default"].weight)
    ours.proj.weight.requires_grad_(False)

    cfg = OptimConfig(lr=1e-2, weight_decay=0.1, betas=[0.9, 0.95], eps=1e-8)
    optimizer = build_optimizer(lora_param_groups(ours, plus_ratio=4.0), cfg)
    set_lr(optimizer, cfg.lr)
    assert [g["lr"] for g in optimizer.param_groups] == [1e-2, 4e-2]
    theirs = create_loraplus_optimizer(
        reference, torch.optim.AdamW, lr=1e-2, loraplus_lr_ratio=4.0, loraplus_weight_decay=0.1, betas=(0.9, 0.95)
    )
    x = torch.randn(9, 16, generator=torch.Generator().manual_seed(1))
    for model, opt in ((reference, theirs), (ours, optimizer)):
        (model(x) ** 2).sum().backward()
        opt.step()
    pairs = [
        (ours.proj.lora_A.weight, layer.lora_A["default"].weight),
        (ours.proj.lora_B.weight, layer.lora_B["default"].weight),
        (ours.proj.lora_magnitude.weight, layer.lora_magnitude_vector["default"].weight),
    ]
    for mine, peft_weight in pairs:
        torch.testing.assert_close(mine, peft_weight, rtol=1e-6, atol=1e-6)
    assert lora_param_groups(ours, plus_ratio=1.0) == [p for p in ours.parameters() if p.requires_grad]


def test_steps_for_epochs_are_exact():
    assert steps_for_epochs(0.3, 1000, 100) == 3  # 0.3 * 1000 is 300.00000000000006 in floats
    assert steps_for_epochs(3, 1000, 300) == 10
    assert steps_for_epochs(2, 1001, 1000) == 3
    assert steps_for_epochs(0.001, 10, 1000) == 1


def test_config_checks_of_epochs_and_the_variants(write_config, capsys):
    config = write_config(epochs=2)  # write_config sets max_steps too
    assert train_script.run([str(config)]) == exit_codes.USAGE
    assert f"error: {config}: max_steps: max_steps and epochs are both set; keep one" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="override 'epochs=2': epochs: max_steps and epochs are both set"):
        load_config(write_config(), ["epochs=2"])
    with pytest.raises(ConfigError, match="epochs must be > 0, got 0.0"):
        load_config(write_config(max_steps=None), ["epochs=0"])

    cfg = load_config(write_config(), ["lora.targets=all-linear", "lora.dora=true"])
    assert cfg.lora.targets == ("wq", "wk", "wv", "wo", "w1", "w2", "w3") and cfg.lora.dora
    assert load_config(write_config(), ["lora.targets=[q_proj, lm_head]"]).lora.targets == ("wq", "output")
    with pytest.raises(ConfigError, match="lora.dora on the output head"):
        load_config(write_config(), ["lora.dora=true"])  # write_config's targets include output
    with pytest.raises(ConfigError, match="lora.dora with model.quantize: nf4 is not supported"):
        load_config(write_config(), ["lora.dora=true", "lora.targets=all-linear", "model.quantize=nf4"])
    with pytest.raises(ConfigError, match="lora.plus_ratio must be > 0"):
        load_config(write_config(), ["lora.plus_ratio=0"])


def test_a_dora_training_model_starts_with_the_row_norms_of_the_loaded_weights(write_config):
    cfg = load_config(write_config(), ["lora.dora=true", "lora.targets=all-linear"])
    model = build_training_model(
        cfg, load_model_args(cfg.model.path), DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    )
    adapted = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(adapted) == 2 * 7
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == lora_parameters(load_model_args(cfg.model.path), cfg)  # the memory estimate counts them all
    for module in adapted:
        assert module.lora_magnitude.weight.requires_grad
        torch.testing.assert_close(module.lora_magnitude.weight, module.weight.norm(dim=1), rtol=1e-6, atol=0)
        assert module.lora_magnitude.weight.min() > 0 and module.lora_B.weight.abs().max() == 0


def demo_tokens(model_dir) -> int:
    tokenizer = load_tokenizer(model_dir)
    lines = (REPO / "data/demo/train.jsonl").read_text().splitlines()
    return sum(len(tokenize_sample(json.loads(line), tokenizer).tokens) for line in lines)


@pytest.mark.slow
def test_two_ranks_train_dora_rslora_lora_plus_in_epochs_and_resume_exactly(
    write_config, tiny_model_dir, tmp_path, capsys
):
    variants = dict(
        max_steps=None,  # null: not set, so that epochs plans the run
        epochs=0.2,
        batch_size=1,
        eval__enabled=False,
        checkpoint__freq=100,
        lora__dropout=0.1,  # DoRA's dropout formula, and the generator state a resume must restore
        lora__targets="all-linear",
        lora__rslora=True,
        lora__dora=True,
        lora__plus_ratio=4.0,
    )
    steps = math.ceil(0.2 * demo_tokens(tiny_model_dir) / (128 * 2))  # seq_len x 1 sequence x 2 ranks
    reference = tmp_path / "reference"
    config = write_config(run_dir=str(reference), **variants)
    result = subprocess.run(
        torchrun(config), cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=TIMEOUT
    )
    assert result.returncode == 0, result.stderr[-3000:]
    plan = f"epochs: 0.2 = {steps} steps (0.2 x {demo_tokens(tiny_model_dir):,} tokens of data.train / 256 tokens"
    assert plan in result.stdout, result.stdout[-3000:]
    assert "rank 8, alpha 16, rsLoRA, DoRA, LoRA+ (B's learning rate x 4) on wq wk wv wo w1 w2 w3" in result.stdout
    train = records(reference, "train")
    assert [r["step"] for r in train] == list(range(1, steps + 1)) and train[-1]["max_steps"] == steps

    final = reference / "checkpoints" / f"checkpoint_{steps:06d}"
    adapter = load_file(final / "lora.safetensors")
    magnitude = adapter["layers.1.feed_forward.w2.lora_magnitude.weight"]
    assert magnitude.shape == (64,) and len(adapter) == 3 * 2 * 7
    entry = json.loads((final / "params.json").read_text())["lora"]
    assert (entry["rslora"], entry["dora"], entry["scaling"]) == (True, True, 16 / math.sqrt(8))

    # `tailor validate --gpus 2` plans the same steps
    capsys.readouterr()
    tailor(["validate", str(config), "--gpus", "2", "--device", "cpu"])
    assert plan in capsys.readouterr().out

    # stopped by SIGTERM after step 2 and resumed: the same adapters, losses and gradient norms as without a stop
    config = write_config(**variants)
    run_dir = tmp_path / "run"
    agent = subprocess.Popen(
        torchrun(config), cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    wait_for(lambda: any(r["step"] >= 2 for r in records(run_dir, "train")), agent)
    agent.send_signal(signal.SIGTERM)
    agent.communicate(timeout=TIMEOUT)
    stopped = max(r["step"] for r in records(run_dir, "train"))
    assert stopped < steps, "the run ended before the signal"
    result = subprocess.run(
        torchrun(config), cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=TIMEOUT
    )
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = f"resuming from {run_dir / 'checkpoints' / f'checkpoint_{stopped:06d}'} (step {stopped} of a run of 0.2"
    assert resumed in result.stdout and plan in result.stdout
    name = f"checkpoints/checkpoint_{steps:06d}/lora.safetensors"
    assert (run_dir / name).read_bytes() == (reference / name).read_bytes(), f"stopped at step {stopped}"
    numbers = [(r["step"], r["loss"], r["grad_norm"]) for r in records(run_dir, "train")]
    assert numbers == [(r["step"], r["loss"], r["grad_norm"]) for r in train]


def wait_for(condition, process: subprocess.Popen) -> None:
    import time

    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert process.poll() is None, f"the run ended early:\n{process.stdout.read()[-3000:]}"
        assert time.monotonic() < deadline
        time.sleep(0.01)
