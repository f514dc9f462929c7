"""Fine-tune LoRA adapters on a Mistral model.

    python train.py CONFIG.yaml [key=value ...]                         one process: CPU or one GPU
    torchrun --nproc-per-node 8 train.py CONFIG.yaml [key=value ...]     one node, eight GPUs

The wiring of the data path, nothing more: config ► data ► model ► loop (see ../shared/DESIGN.md).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from finetune.checkpoint import save_training_checkpoint
from finetune.config import ConfigError, load_config, save_config
from finetune.data import DataError, build_eval_batches, build_train_loader, check_tokenizer_vocab, load_tokenizer
from finetune.distributed import barrier, destroy, init_distributed
from finetune.eval import evaluate
from finetune.model_setup import build_training_model
from finetune.monitoring import MetricsLogger, format_eval_line, format_summary, format_train_line, peak_memory_gib
from finetune.optim import build_optimizer, lr_at_step, set_lr
from finetune.preflight import PreflightError, run_preflight_checks
from finetune.train_step import train_step
from model.args import load_model_args


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    cfg = load_config(argv[0], argv[1:])
    run_preflight_checks(cfg)
    model_args = load_model_args(cfg.model.path)
    dist_info = init_distributed()
    torch.manual_seed(cfg.seed)
    run_dir = Path(cfg.run_dir)
    if dist_info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")

    # Data: the model folder's tokenizer, endless packed train batches, a fixed eval set.
    tokenizer = load_tokenizer(cfg.model.path)
    check_tokenizer_vocab(tokenizer, model_args.vocab_size, cfg.model.path)
    cache_dir = Path(cfg.data.cache_dir or run_dir / "cache")
    shard = dict(rank=dist_info.rank, world_size=dist_info.world_size, cache_dir=cache_dir)
    train_batches = build_train_loader(cfg.data, tokenizer, seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                                       seed=cfg.seed, **shard)
    eval_batches = (build_eval_batches(cfg.data, tokenizer, seq_len=cfg.seq_len, batch_size=cfg.batch_size, **shard)
                    if cfg.eval.enabled else [])
    if cfg.eval.max_batches is not None:
        eval_batches = eval_batches[: cfg.eval.max_batches]

    # Model: LoRA on a frozen base, sharded over the ranks, with its loss.
    loss_model = build_training_model(cfg, dist_info)
    optimizer = build_optimizer([p for p in loss_model.parameters() if p.requires_grad], cfg.optim)
    logger = MetricsLogger(run_dir, cfg) if dist_info.is_main else None

    # The loop.
    started = time.perf_counter()
    tokens_seen, trained_seen, last_eval, checkpoint_dir, last_loss = 0, 0, None, None, None
    for step in range(1, cfg.max_steps + 1):
        lr = lr_at_step(step, cfg.optim, cfg.max_steps)
        set_lr(optimizer, lr)
        micro_batches = [next(train_batches) for _ in range(cfg.grad_accumulation)]
        sums = train_step(loss_model, optimizer, micro_batches, dist_info.device, cfg.optim.max_grad_norm,
                          dist_info.world_size)
        tokens_seen += sums.tokens
        trained_seen += sums.trained_tokens
        is_last = step == cfg.max_steps

        if step % cfg.logging.freq == 0 or is_last:
            elapsed = time.perf_counter() - started
            last_loss = sums.loss.item()
            record = dict(kind="train", step=step, loss=last_loss, lr=lr, grad_norm=sums.grad_norm.item(),
                          tokens=tokens_seen, trained_tokens=int(sums.trained_tokens.item()),
                          tokens_per_s=tokens_seen / elapsed, trained_tokens_per_s=float(trained_seen) / elapsed,
                          elapsed_s=elapsed,
                          peak_memory_gib=peak_memory_gib(dist_info.device), max_steps=cfg.max_steps)
            if logger:
                logger.log(record)
                print(format_train_line(record), flush=True)

        if eval_batches and (step % cfg.eval.freq == 0 or is_last):
            last_eval = evaluate(loss_model, eval_batches, dist_info.device)
            if logger:
                logger.log(dict(kind="eval", step=step, **last_eval))
                print(format_eval_line(dict(step=step, **last_eval)), flush=True)

        if cfg.checkpoint.enabled and (step % cfg.checkpoint.freq == 0 or is_last):
            checkpoint_dir = save_training_checkpoint(cfg, loss_model.model, step, dist_info.is_main)

    if logger:
        print(format_summary(steps=cfg.max_steps, tokens=tokens_seen, seconds=time.perf_counter() - started,
                             train_loss=last_loss, eval_metrics=last_eval, checkpoint=checkpoint_dir), flush=True)
        logger.close()
    barrier()
    destroy()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except (ConfigError, DataError, PreflightError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
