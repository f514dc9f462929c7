"""Fine-tune LoRA adapters on a Mistral model: the entry of `train.py` and `tailor train`.

    tailor train CONFIG.yaml [key=value ...]                            one process: CPU or one GPU
    tailor train CONFIG.yaml [key=value ...] --gpus 8                   one node, eight GPUs (under torchrun)
    python train.py CONFIG.yaml [key=value ...]                         the same, from a checkout
    torchrun --nproc-per-node 8 train.py CONFIG.yaml [key=value ...]     the same, eight GPUs

The same command resumes a run that was stopped, killed or preempted (`resume: auto`, the default); SIGTERM or
Ctrl-C finishes the step (with several ranks, also the one queued behind it), saves a checkpoint and exits 0.

The wiring of the data path, nothing more: config ► data ► model ► loop. docs/architecture.md maps every module.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import torch
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from finetune import exit_codes
from finetune.config import TrainConfig, load_config
from finetune.data import build_eval_batches, build_train_loader
from finetune.data.config import resolve_cache_dir
from finetune.data.data_report import data_report
from finetune.data.sources import open_run_data
from finetune.planning.epochs import resolve_epochs
from finetune.training.checkpointing import Checkpointer
from finetune.training.config_record import record_config
from finetune.training.console import Console
from finetune.training.distributed import (
    DistInfo,
    barrier,
    destroy,
    exit_process,
    init_distributed,
    launch_rank,
    launch_world_size,
)
from finetune.training.evaluator import build_evaluator
from finetune.training.loss_scale import loss_scale_for
from finetune.training.model_hub import resolve_hub_model
from finetune.training.model_setup import build_training_model
from finetune.training.monitoring import MetricsLogger, format_summary
from finetune.training.optim import build_optimizer, due_at, lora_param_groups, lr_at_step, set_lr
from finetune.training.preflight import missing_folders, remove_unused_folders, run_preflight_checks
from finetune.training.rng import train_data_seed
from finetune.training.run_lock import RunLockedError, lock_run_dir
from finetune.training.run_preview import describe_run, train_data_tokens
from finetune.training.run_start import prepare_run_dir
from finetune.training.run_status import FINISHED, STOPPED, RunRecord, recording_failure, write_run_status
from finetune.training.step_reader import StepReader
from finetune.training.stop_signal import StopSignal, resume_command
from finetune.training.trace import trace_before_start
from finetune.training.train_state import Progress
from finetune.training.train_step import StepRunner, out_of_memory_message
from model.args import ModelArgs


def main(argv: list[str], launcher: list[str]) -> int:
    """Train from the command line's config and overrides: check, lock run_dir, fine-tune.

    A run refused before it writes anything removes the run_dir folders it created.

    Args:
        argv: CONFIG.yaml, then `key=value` overrides.
        launcher: the words before CONFIG that started the run, for the lock and the resume command.

    Returns:
        The exit code: 0, or USAGE when no config is named.

    Raises:
        ConfigError, PreflightError, ResumeError, DataFaults: the config, model folder, checkpoint or data is wrong.
        RunLockedError: another run holds run_dir.
        NonFiniteError: the loss or the gradients stayed non-finite.
    """
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        if argv:
            return 0
        print(
            "error: no config file: name the training YAML after the command, e.g. configs/demo.yaml", file=sys.stderr
        )
        return exit_codes.USAGE
    cfg = resolve_hub_model(load_config(argv[0], argv[1:]))  # model.path as a hub id: its folder in the hub's cache
    created = missing_folders(Path(cfg.run_dir))  # a run refused before it writes anything leaves no run_dir
    command = [*launcher, *argv]
    try:
        tokenizer, model_args = run_preflight_checks(cfg)  # paths, tokenizer, seq_len, disk: before heavy work
        if launch_rank() == 0 and (line := trace_before_start(cfg, model_args, launch_world_size())):
            print(line, flush=True)  # the peak this run will reach, forecast on fake tensors (model.trace)
        dist_info = init_distributed()
        # one run per run_dir (another one exits 3); how it ends goes to run_dir/status.json, for `tailor runs`
        with lock_run_dir(Path(cfg.run_dir), dist_info, command=" ".join(map(shlex.quote, command))):
            with recording_failure(Path(cfg.run_dir), dist_info.is_main) as record:
                return fine_tune(cfg, tokenizer, model_args, dist_info, command, record)
    except RunLockedError:
        raise  # the folder is another run's, which may have just created it
    except BaseException:
        remove_unused_folders(created)
        raise


def fine_tune(
    cfg: TrainConfig,
    tokenizer: MistralTokenizer,
    model_args: ModelArgs,
    dist_info: DistInfo,
    command: list[str],
    record: RunRecord,
) -> int:
    """Run the checked config: data, model, optimizer, then the loop to max_steps or a stop signal.

    Each rank runs it; only the main rank logs, prints and writes status.json.

    Args:
        command: the command line that started the run, for the resume command a stopped run prints.
        record: the run's status.json, accepted once the run's settings are on record.

    Returns:
        0: trained to max_steps, stopped with a checkpoint saved, or nothing left to train.
    """
    start = prepare_run_dir(cfg, dist_info)  # None: from step 0; else the checkpoint to resume from
    # The data's report: every line skipped or left out, every sample cut, counted before step 1, and the tokens of
    # an epoch, which make `epochs: N` the max_steps that everything after reads.
    cache_dir = resolve_cache_dir(cfg.data, cfg.run_dir)
    data = open_run_data(cfg.data, tokenizer, cache_dir=cache_dir, with_eval=cfg.eval.enabled)
    report = data_report(data, seq_len=cfg.seq_len)
    if dist_info.is_main:
        print("\n".join(report.lines()), flush=True)
    cfg = resolve_epochs(cfg, report.train_tokens, dist_info.world_size)
    if start is not None and start.step >= cfg.max_steps:
        if dist_info.is_main:
            print(
                f"nothing to train: {start.folder} is at step {start.step}, and max_steps is {cfg.max_steps}; a "
                "higher max_steps trains on, another run_dir starts afresh"
            )
            write_run_status(Path(cfg.run_dir), FINISHED, start.step)
        destroy()
        return 0
    torch.manual_seed(cfg.seed)
    run_dir = Path(cfg.run_dir)

    # Data: endless packed train batches, a fixed eval set.
    batches = dict(seq_len=cfg.seq_len, batch_size=cfg.batch_size, rank=dist_info.rank, world_size=dist_info.world_size)
    seed = train_data_seed(cfg.seed, start, dist_info.world_size)
    train_batches = build_train_loader(data, seed=seed, **batches)
    eval_batches = build_eval_batches(data, **batches)[: cfg.eval.max_batches] if cfg.eval.enabled else []
    retain_batches = build_eval_batches(data, group="retain", **batches)[: cfg.eval.max_batches] if eval_batches else []
    evaluator = build_evaluator(cfg, tokenizer, dist_info, eval_batches, retain_batches, resumed=start is not None)

    # Model: LoRA on a frozen base, sharded over the ranks, with its loss; a resumed run's state loaded into it.
    loss_model = build_training_model(cfg, model_args, dist_info)
    optimizer = build_optimizer(lora_param_groups(loss_model, cfg.lora.plus_ratio), cfg.optim)
    checkpointer = Checkpointer(cfg, loss_model, optimizer, train_batches, dist_info)
    progress = checkpointer.resume(start) if start else Progress()
    loss_scale = loss_scale_for(cfg, progress, dist_info.device)  # fp16 only
    if dist_info.is_main:  # the run is accepted: its settings are on record, and what it will do is shown
        record_config(cfg, start)
        print(describe_run(cfg, model_args, dist_info, loss_model, train_batches, eval_batches), flush=True)
    record.accept()  # from here on, how the run ends is its status.json (tailor runs)
    logger = MetricsLogger(run_dir, cfg) if dist_info.is_main else None
    if logger:
        logger.log(report.record(progress.step))
    console = Console(cfg.max_steps, progress.step, train_data_tokens(train_batches)) if dist_info.is_main else None
    if evaluator and start is None:  # what the base model does on the same sets, for every eval to be set against
        evaluator.evaluate_base(loss_model, logger, console)

    # The loop. The device runs one step ahead of the host: a step's outcome is read once the next one is queued.
    stop = StopSignal.install()
    run_step = StepRunner(
        loss_model, optimizer, dist_info.device, cfg.optim.max_grad_norm, dist_info.world_size, stop, loss_scale
    )
    reader = StepReader(cfg, progress, logger, dist_info.device, console)
    last_eval, checkpoint_dir = None, None
    for step in range(progress.step + 1, cfg.max_steps + 1):
        lr = lr_at_step(step, cfg.optim, cfg.max_steps)
        set_lr(optimizer, lr)
        micro_batches = [next(train_batches) for _ in range(cfg.grad_accumulation)]
        queued = run_step(micro_batches)
        evaluates = evaluator is not None and due_at(step, cfg.eval.freq, cfg.max_steps)
        saves = cfg.checkpoint.enabled and due_at(step, cfg.checkpoint.freq, cfg.max_steps)
        stopping_alone = stop.requested and dist_info.world_size == 1  # no other rank to agree with: stop now
        reader.add(step, lr, queued, read_now=evaluates or saves or stopping_alone)
        stopping = reader.stop_requested or stopping_alone  # several ranks stop on the step they agreed on

        if evaluates and not stopping:
            last_eval = evaluator.evaluate(loss_model, step, logger, console)

        if saves or stopping:
            checkpoint_dir = checkpointer.save(progress, loss_scale)
        if stopping:
            break

    if logger:
        console.close()
        write_run_status(run_dir, STOPPED if progress.step < cfg.max_steps else FINISHED, progress.step)
        if progress.step < cfg.max_steps:
            print(
                f"stopped at step {progress.step} ({stop.name or 'a signal to another rank'}): saved "
                f"{checkpoint_dir}\nresume with: {resume_command(command)}",
                flush=True,
            )
        else:
            print(
                format_summary(
                    steps=cfg.max_steps,
                    tokens=progress.tokens,
                    seconds=progress.elapsed_s,
                    train_loss=reader.last_loss,
                    eval_metrics=last_eval,
                    checkpoint=checkpoint_dir,
                    run_dir=run_dir,
                    model_dir=Path(cfg.model.path) if cfg.checkpoint.save_adapters else None,  # else: a merged model
                    base=evaluator.base if evaluator else None,
                ),
                flush=True,
            )
            print("\n".join(f"  {line}" for line in report.summary(train_batches.counts)), flush=True)
            if progress.nonfinite_skipped:
                print(f"  {progress.nonfinite_skipped} steps skipped: the loss or the gradients were not finite")
        logger.close()
    barrier()
    destroy()
    return 0


def run(argv: list[str], launcher: list[str] | None = None) -> int:
    """Run main, with the errors a user can cause ending in `error: ...` and their exit code.

    The codes are finetune/exit_codes.py's exit_code_of; any other error is a bug in tailor and keeps its traceback.

    Args:
        launcher: the words before CONFIG that started the run (default: this script), for the lock and the resume
            command.
    """
    try:
        return main(argv, launcher or [sys.argv[0]])
    except BaseException as error:
        if (code := exit_codes.exit_code_of(error)) is None:  # a bug in tailor: its traceback
            raise
        print(f"error: {_message(error, code)}", file=sys.stderr)
        return code
    finally:
        destroy()  # with several ranks, an error too leaves the process group closed: no abort at exit


def _message(error: BaseException, code: int) -> str:
    if code == exit_codes.INTERRUPTED:  # Ctrl-C before the loop, which saves and stops on its own once it runs
        return (
            "interrupted (Ctrl-C) before the first step of this run: nothing was trained or saved by it, and its "
            "earlier checkpoints are as they were; run the same command to start again"
        )
    if code == exit_codes.OUT_OF_MEMORY:
        return out_of_memory_message(error)
    if code == exit_codes.WRITE_FAILED and isinstance(error, OSError):
        written = error.filename2 or error.filename  # a copy names its source first, its destination second
        where = f"{written}: " if written else ""
        return f"{where}{error.strerror}; free some space, then run the same command"
    return str(error)


if __name__ == "__main__":  # each rank of `tailor train --gpus N`: torchrun ... -m finetune.training.entry
    exit_process(run(sys.argv[1:], ["tailor", "train"]))
