"""One step over micro-batches and ranks: token-weighted loss, the same numbers on 1 or 2 ranks, only adapters move."""

import subprocess
import sys
from pathlib import Path

import torch

from finetune.config import load_config
from finetune.data import build_eval_batches, load_tokenizer
from finetune.distributed import DistInfo
from finetune.loss import loss_inputs
from finetune.model_setup import build_training_model
from finetune.optim import build_optimizer
from finetune.train_step import train_step
from launching import REPO, free_port, subprocess_env

WORKER = Path(__file__).with_name("step_worker.py")


def run_worker(config: Path, out: Path, ranks: int) -> dict:
    launcher = [] if ranks == 1 else ["-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
                                      "--master-port", str(free_port())]
    result = subprocess.run([sys.executable, *launcher, str(WORKER), str(config), str(out)], env=subprocess_env(), cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    return torch.load(out, weights_only=True)


def test_one_and_two_ranks_give_the_same_losses_and_adapters(write_config, tmp_path):
    config = write_config(optim__lr=1e-3)
    one = run_worker(config, tmp_path / "one.pt", ranks=1)
    two = run_worker(config, tmp_path / "two.pt", ranks=2)
    assert one["losses"][0] > 9.0 and one["losses"][2] < one["losses"][0]
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), rtol=1e-4, atol=1e-4)
    assert one["adapters"].keys() == two["adapters"].keys()
    for name, tensor in one["adapters"].items():
        torch.testing.assert_close(two["adapters"][name], tensor, rtol=1e-3, atol=1e-5, msg=name)


def test_step_loss_is_token_weighted_and_only_adapters_change(write_config):
    cfg = load_config(write_config())
    tokenizer = load_tokenizer(cfg.model.path)
    batches = build_eval_batches(cfg.data, tokenizer, seq_len=cfg.seq_len, batch_size=1, rank=0, world_size=1,
                                 cache_dir=Path(cfg.data.cache_dir))[:2]
    batches[1].weights[batches[1].weights > 0] *= 0.5  # unequal weights tell a token mean from a mean of means
    device = torch.device("cpu")
    model = build_training_model(cfg, DistInfo(0, 1, 0, device))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}

    with torch.no_grad():
        per_batch = [model(**loss_inputs(b, device)) for b in batches]
    expected = sum(s.loss_sum for s in per_batch) / sum(s.weight_sum for s in per_batch)

    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], cfg.optim)
    sums = train_step(model, optimizer, batches, device, max_grad_norm=1.0, world_size=1)
    torch.testing.assert_close(sums.loss, expected)
    assert sums.tokens == 2 * cfg.seq_len
    assert int(sums.trained_tokens) == sum(int((b.weights > 0).sum()) for b in batches)

    # B starts at zero, so the first step moves every B and (without weight decay) nothing else, A included.
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed == {name for name in before if name.endswith("lora_B.weight")}
    assert len(changed) == 2 * 7 + 1


def test_activation_checkpointing_changes_memory_not_numbers(write_config):
    """No checkpointing, whole blocks recomputed, or only the feed-forward: the same loss and gradients."""
    results = []
    for overrides in (dict(model__activation_checkpointing=False), dict(model__checkpointing_scope="block"),
                      dict(model__checkpointing_scope="mlp")):
        cfg = load_config(write_config(**overrides))
        tokenizer = load_tokenizer(cfg.model.path)
        batch = build_eval_batches(cfg.data, tokenizer, seq_len=cfg.seq_len, batch_size=1, rank=0, world_size=1,
                                   cache_dir=Path(cfg.data.cache_dir))[0]
        model = build_training_model(cfg, DistInfo(0, 1, 0, torch.device("cpu")))
        model.model.layers[0].attention.wq.lora_B.weight.data.fill_(0.01)  # so that every LoRA A gets a gradient
        sums = model(**loss_inputs(batch, torch.device("cpu")))
        sums.loss_sum.backward()
        results.append((sums.loss_sum.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    for loss, grads in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=0, atol=0)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, results[0][1][name], rtol=1e-6, atol=1e-7, msg=name)
