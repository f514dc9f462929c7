"""Runs 3 optimizer steps on fixed batches, in one process or as one of N torchrun ranks; rank 0 saves
the losses and the adapters. One process takes every batch as a micro-batch of one step; N ranks take one
batch each: the same global batch, so the numbers must agree.

    python tests/train/step_worker.py CONFIG OUT.pt
"""

import sys
from pathlib import Path

import torch

from finetune.config import load_config
from finetune.data import build_eval_batches, load_tokenizer
from finetune.data.sources import open_run_data
from finetune.training.distributed import destroy, init_distributed
from finetune.training.model_setup import build_training_model
from finetune.training.optim import build_optimizer
from finetune.training.parallel import full_state
from finetune.training.train_step import train_step
from model.args import load_model_args
from model.lora import lora_state_dict


def main(config: str, out: str) -> None:
    cfg = load_config(config)
    dist_info = init_distributed()
    tokenizer = load_tokenizer(cfg.model.path)
    batches = build_eval_batches(
        open_run_data(cfg.data, tokenizer, cache_dir=Path(cfg.data.cache_dir)),
        seq_len=cfg.seq_len,
        batch_size=1,
        rank=0,
        world_size=1,
    )[:2]
    mine = batches if dist_info.world_size == 1 else [batches[dist_info.rank]]
    model = build_training_model(cfg, load_model_args(cfg.model.path), dist_info)
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], cfg.optim)
    losses, grad_norms = [], []
    for _ in range(3):
        sums = train_step(model, optimizer, mine, dist_info.device, max_grad_norm=1.0, world_size=dist_info.world_size)
        losses.append(sums.outcome().loss)
        grad_norms.append(sums.outcome().grad_norm)
    adapters = full_state(lora_state_dict(model.model))
    if dist_info.is_main:
        torch.save({"losses": losses, "grad_norms": grad_norms, "adapters": adapters}, out)
    destroy()


if __name__ == "__main__":
    main(*sys.argv[1:])
