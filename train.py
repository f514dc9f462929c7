"""Fine-tune LoRA adapters on a Mistral model.

    python train.py CONFIG.yaml [key=value ...]                         one process: CPU or one GPU
    torchrun --nproc-per-node 8 train.py CONFIG.yaml [key=value ...]     one node, eight GPUs

The same command resumes a run that was stopped, killed or preempted (`resume: auto`, the default); SIGTERM or
Ctrl-C finishes the step (with several ranks, also the one queued behind it), saves a checkpoint and exits 0.

The wiring of the data path, nothing more: config ► data ► model ► loop. docs/architecture.md maps every module.
"""

from __future__ import annotations

import errno
import shlex
import sys
from pathlib import Path

import torch
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from finetune import exit_codes
from finetune.checkpoints.folders import CheckpointWriteError
from finetune.checkpoints.training_state import Progress, ResumeError, load_training_state, save_checkpoint
from finetune.config import ConfigError, TrainConfig, due_at, load_config, resolve_cache_dir
from finetune.data import DataError, build_eval_batches, build_train_loader
from finetune.data.report import data_report
from finetune.training.config_record import record_config
from finetune.training.console import Console
from finetune.training.distributed import DistInfo, barrier, destroy, exit_process, init_distributed
from finetune.training.eval import evaluate
from finetune.training.loss_scale import loss_scale_for
from finetune.training.model_setup import build_training_model
from finetune.training.monitoring import MetricsLogger, format_eval_line, format_summary
from finetune.training.optim import build_optimizer, lr_at_step, set_lr
from finetune.training.preflight import PreflightError, run_preflight_checks
from finetune.training.report import describe_run, train_data_tokens
from finetune.training.rng import train_data_seed
from finetune.training.run_lock import RunLockedError, lock_run_dir
from finetune.training.run_start import prepare_run_dir
from finetune.training.step_log import StepLog
from finetune.training.stop_signal import StopSignal, resume_command
from finetune.training.train_step import NonFiniteError, out_of_memory_message, train_step


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    cfg = load_config(argv[0], argv[1:])
    tokenizer = run_preflight_checks(cfg)  # paths, tokenizer, seq_len, disk: before any heavy work
    dist_info = init_distributed()
    with lock_run_dir(Path(cfg.run_dir), dist_info, command=" ".join(map(shlex.quote, [sys.argv[0], *argv]))):
        return fine_tune(cfg, tokenizer, dist_info, argv)  # one run per run_dir: another one exits 3


def fine_tune(cfg: TrainConfig, tokenizer: MistralTokenizer, dist_info: DistInfo, argv: list[str]) -> int:
    start = prepare_run_dir(cfg, dist_info)  # None: from step 0; else the checkpoint to resume from
    if start is not None and start.step >= cfg.max_steps:
        if dist_info.is_main:
            print(
                f"nothing to train: {start.folder} is at step {start.step}, and max_steps is {cfg.max_steps}; a "
                "higher max_steps trains on, another run_dir starts afresh"
            )
        destroy()
        return 0
    torch.manual_seed(cfg.seed)
    run_dir = Path(cfg.run_dir)

    # Data: endless packed train batches, a fixed eval set.
    cache_dir = resolve_cache_dir(cfg)
    shard = dict(rank=dist_info.rank, world_size=dist_info.world_size, cache_dir=cache_dir)
    train_batches = build_train_loader(
        cfg.data,
        tokenizer,
        seq_len=cfg.seq_len,
        batch_size=cfg.batch_size,
        seed=train_data_seed(cfg.seed, start, dist_info.world_size),
        **shard,
    )
    eval_batches = (
        build_eval_batches(cfg.data, tokenizer, seq_len=cfg.seq_len, batch_size=cfg.batch_size, **shard)
        if cfg.eval.enabled
        else []
    )
    if cfg.eval.max_batches is not None:
        eval_batches = eval_batches[: cfg.eval.max_batches]
    data = data_report(cfg.data, tokenizer, seq_len=cfg.seq_len, cache_dir=cache_dir, with_eval=cfg.eval.enabled)
    if dist_info.is_main:  # every line skipped or left out, every sample cut, counted before step 1
        print("\n".join(data.lines()), flush=True)

    # Model: LoRA on a frozen base, sharded over the ranks, with its loss; a resumed run's state loaded into it.
    loss_model = build_training_model(cfg, dist_info)
    optimizer = build_optimizer([p for p in loss_model.parameters() if p.requires_grad], cfg.optim)
    progress = (
        load_training_state(start, loss_model, optimizer, train_batches, cfg.seed, dist_info) if start else Progress()
    )
    loss_scale = loss_scale_for(cfg, progress, dist_info.device)  # fp16 only
    if dist_info.is_main:  # the run is accepted: its settings are on record, and what it will do is shown
        record_config(cfg, start)
        print(describe_run(cfg, dist_info, loss_model, train_batches, eval_batches), flush=True)
    logger = MetricsLogger(run_dir, cfg) if dist_info.is_main else None
    if logger:
        logger.log(data.record(progress.step))
    console = Console(cfg.max_steps, progress.step, train_data_tokens(train_batches)) if dist_info.is_main else None

    # The loop. The device runs one step ahead of the host: a step's outcome is read once the next one is queued.
    stop = StopSignal.install()
    steps = StepLog(cfg, progress, logger, dist_info.device, console)
    last_eval, checkpoint_dir = None, None
    for step in range(progress.step + 1, cfg.max_steps + 1):
        lr = lr_at_step(step, cfg.optim, cfg.max_steps)
        set_lr(optimizer, lr)
        micro_batches = [next(train_batches) for _ in range(cfg.grad_accumulation)]
        sums = train_step(
            loss_model,
            optimizer,
            micro_batches,
            dist_info.device,
            cfg.optim.max_grad_norm,
            dist_info.world_size,
            stop,
            loss_scale,
        )
        evaluates = bool(eval_batches) and due_at(step, cfg.eval.freq, cfg.max_steps)
        saves = cfg.checkpoint.enabled and due_at(step, cfg.checkpoint.freq, cfg.max_steps)
        stopping_alone = stop.requested and dist_info.world_size == 1  # no other rank to agree with: stop now
        steps.add(step, lr, sums, read_now=evaluates or saves or stopping_alone)
        stopping = steps.stop_requested or stopping_alone  # several ranks stop on the step they agreed on

        if evaluates and not stopping:
            last_eval = evaluate(loss_model, eval_batches, dist_info.device)
            if logger:
                logger.log(dict(kind="eval", step=step, **last_eval))
                console.print(format_eval_line(dict(step=step, **last_eval)))

        if saves or stopping:
            checkpoint_dir = save_checkpoint(cfg, loss_model, optimizer, train_batches, progress, dist_info, loss_scale)
        if stopping:
            break

    if logger:
        console.close()
        if progress.step < cfg.max_steps:
            print(
                f"stopped at step {progress.step} ({stop.name or 'a signal to another rank'}): saved "
                f"{checkpoint_dir}\nresume with: {resume_command([sys.argv[0], *argv])}",
                flush=True,
            )
        else:
            print(
                format_summary(
                    steps=cfg.max_steps,
                    tokens=progress.tokens,
                    seconds=progress.elapsed_s,
                    train_loss=steps.last_loss,
                    eval_metrics=last_eval,
                    checkpoint=checkpoint_dir,
                    run_dir=run_dir,
                    model_dir=Path(cfg.model.path) if cfg.checkpoint.save_adapters else None,  # else: a merged model
                ),
                flush=True,
            )
            print("\n".join(f"  {line}" for line in data.summary(train_batches.counts)), flush=True)
            if progress.nonfinite_skipped:
                print(f"  {progress.nonfinite_skipped} steps skipped: the loss or the gradients were not finite")
        logger.close()
    barrier()
    destroy()
    return 0


def run(argv: list[str]) -> int:
    """main, with the errors a user can cause ending in `error: ...` and an exit code of finetune/exit_codes.py."""
    try:
        return main(argv)
    except (ConfigError, DataError, PreflightError, ResumeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return exit_codes.USAGE
    except RunLockedError as error:
        print(f"error: {error}", file=sys.stderr)
        return exit_codes.RUN_LOCKED
    except CheckpointWriteError as error:
        print(f"error: {error}", file=sys.stderr)
        return exit_codes.WRITE_FAILED
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f"{error.filename}: " if error.filename else ""
        print(f"error: {where}{error.strerror}; free some space, then run the same command", file=sys.stderr)
        return exit_codes.WRITE_FAILED
    except NonFiniteError as error:
        print(f"error: {error}", file=sys.stderr)
        return exit_codes.NOT_FINITE
    except torch.OutOfMemoryError as error:
        print(f"error: {out_of_memory_message(error)}", file=sys.stderr)
        return exit_codes.OUT_OF_MEMORY
    finally:
        destroy()  # with several ranks, an error too leaves the process group closed: no abort at exit


if __name__ == "__main__":
    exit_process(run(sys.argv[1:]))
