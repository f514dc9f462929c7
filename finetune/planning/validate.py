"""`tailor validate CONFIG`: every fault of every train and eval file, repeated samples and eval samples that train
has, statistics, epochs and an ETA.

The run's plan on top of the data's checks (finetune/data/validate.py): the sources training would refuse, what
max_steps or epochs make of the data, the ETA. Here, above the data path, because it reads the whole config, which
names the model's settings: the data path never imports it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from finetune import exit_codes
from finetune.config import TrainConfig
from finetune.data.cache import open_tokenized_files
from finetune.data.cache_entry import TokenizedFile
from finetune.data.config import DataSource
from finetune.data.duplicates import eval_lines_in_train
from finetune.data.errors import DataError
from finetune.data.model_tokenizer import check_tokenizer_vocab, load_tokenizer
from finetune.data.sources import TokenizedSource, check_holds_none_of, source_files
from finetune.data.validate import (
    print_bad_shares_training_refuses,
    print_faults,
    print_repeats,
    print_statistics,
    print_warnings,
    write_fixed_files,
)
from finetune.planning.epochs import describe_epochs, resolve_epochs, tokens_per_step
from finetune.planning.eta import format_eta
from model.args import read_vocab_size

Throughput = Callable[[str], tuple[float, str]]  # model folder -> (tokens / s / GPU, where it comes from)


def validate(
    cfg: TrainConfig,
    *,
    cache_dir: Path,
    throughput: Throughput | None,
    device: str,
    gpus: int = 1,
    fix_dir: Path | None = None,
    max_per_kind: int = 10,
    price: float | None = None,
    out: TextIO | None = None,
) -> int:
    """Print a config's data faults, statistics, epochs and ETA; write fixed files when asked.

    `cache_dir` and `throughput` are passed in: the command picks them from its arguments.

    Args:
        cache_dir: the tokenized cache (finetune.data.config.resolve_cache_dir).
        throughput: model folder -> (tokens / s / GPU, where it comes from) on `device` (finetune.planning.eta's
            tokens_per_second_per_gpu); None: no ETA (a CPU).
        device: the GPU kind the ETA is for, as printed.
        gpus: the ranks training would run on: the ETA's, and the samples each train source must have.
        fix_dir: where to write every train and eval file, bad lines repaired or removed; None: write nothing.
        max_per_kind: faults (and warnings, repeats) printed of each kind.
        price: per GPU-hour, for the ETA's cost; None: no cost.
        out: where the report goes (default stdout); errors go to stderr.

    Returns:
        The exit status (finetune/exit_codes.py): DATA_FAULTS when training would refuse the data or skip lines of
        it, USAGE when the model folder's tokenizer cannot be read or a data path is wrong, else OK.
    """
    out = out or sys.stdout
    try:
        tokenizer = load_tokenizer(cfg.model.path)
        check_tokenizer_vocab(tokenizer, read_vocab_size(cfg.model.path), cfg.model.path)
    except (OSError, ValueError) as e:
        print(f"error: model.path: {e}", file=sys.stderr)
        return exit_codes.USAGE
    try:
        written = {"run_dir": Path(cfg.run_dir), "data.cache_dir": cache_dir}  # what training refuses to read
        splits = {
            split: _split_files(split, sources, written)
            for split, sources in (("train", cfg.data.train), ("eval", cfg.data.eval))
        }
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return exit_codes.USAGE
    paths = list(dict.fromkeys(splits["train"] + splits["eval"]))
    files = dict(zip(paths, open_tokenized_files(paths, tokenizer, cfg.data.train_on, cache_dir, cfg.data.num_workers)))
    faults = print_faults(files, max_per_kind, out, fixing=fix_dir is not None)
    print_warnings(files, max_per_kind, out)
    train, eval_ = (
        [TokenizedSource(s.path, s.weight, [files[p] for p in source_files(s)]) for s in sources]
        for sources in (cfg.data.train, cfg.data.eval)
    )
    print_repeats(train, eval_, max_per_kind, out)
    print_statistics(splits, files, cfg.seq_len, out)
    refused = print_sources_training_refuses(cfg, files, gpus, out)
    if cfg.data.on_bad_sample == "skip":  # with `error`, training refuses any bad line: the faults above say so
        print_bad_shares_training_refuses(train + eval_, cfg.data.max_bad_fraction, out)
    print_epochs_and_eta(cfg, files, gpus, device, throughput, out, price)
    if fix_dir is not None:
        write_fixed_files(cfg.data, files, tokenizer, fix_dir, out, eval_lines_in_train(train, eval_))
        return exit_codes.DATA_FAULTS if refused else exit_codes.OK
    return exit_codes.DATA_FAULTS if faults or refused else exit_codes.OK


def _split_files(split: str, sources: list[DataSource], written: dict[str, Path]) -> list[Path]:
    """The files of a split's sources; a missing path, or a folder holding one of the `written` folders, is named by
    its key, as training's pre-flight names it."""
    files = []
    for i, source in enumerate(sources):
        try:
            check_holds_none_of(source, written)
            files += source_files(source)
        except DataError as error:
            raise DataError(f"data.{split}[{i}]: {error}") from None
    return files


def print_sources_training_refuses(cfg: TrainConfig, files: dict[Path, TokenizedFile], ranks: int, out: TextIO) -> int:
    """Print the sources training would refuse before its first step, so that validation fails on them too.

    Those are train sources with fewer usable samples than ranks (an empty file, one whose every line is bad), and
    eval sources without one while eval is on.

    Returns:
        How many sources training would refuse.
    """
    refused = 0
    for source in cfg.data.train:
        samples = sum(files[p].meta["n_samples"] for p in source_files(source))
        if samples < ranks:
            refused += 1
            print(
                f"{source.path}: {samples} usable samples cannot be shared by {ranks} rank(s): training refuses "
                "this train source",
                file=out,
            )
    for source in cfg.data.eval if cfg.eval.enabled else []:
        if not sum(files[p].meta["n_samples"] for p in source_files(source)):
            refused += 1
            print(f"{source.path}: no usable sample to evaluate on: training refuses this eval source", file=out)
    if refused:
        print(file=out)
    return refused


def print_epochs_and_eta(
    cfg: TrainConfig,
    files: dict[Path, TokenizedFile],
    gpus: int,
    device: str,
    throughput: Throughput | None,
    out: TextIO,
    price: float | None = None,
) -> None:
    """Print what epochs or max_steps make of the data: tokens, each train source's epochs, the ETA and its cost.

    Args:
        throughput: as validate's; None: the ETA is not estimated.
        price: per GPU-hour; None: no cost.
    """
    epoch_tokens = sum(files[p].meta["n_tokens"] for source in cfg.data.train for p in source_files(source))
    if cfg.epochs is not None:
        if not epoch_tokens:
            print(f"epochs: {cfg.epochs:g} of data.train, which has no usable tokens: training refuses it", file=out)
            return
        cfg = resolve_epochs(cfg, epoch_tokens, gpus)  # the max_steps training will run, on `gpus` ranks
        print(describe_epochs(cfg, epoch_tokens, gpus), file=out)
    total = tokens_per_step(cfg, gpus) * cfg.max_steps
    print(
        f"max_steps {cfg.max_steps} x {gpus} rank(s) x batch_size {cfg.batch_size} x grad_accumulation "
        f"{cfg.grad_accumulation} x seq_len {cfg.seq_len} = {total:,} tokens",
        file=out,
    )
    weight_sum = sum(s.weight for s in cfg.data.train)
    for source in cfg.data.train:
        tokens = sum(files[p].meta["n_tokens"] for p in source_files(source))
        share = source.weight / weight_sum
        epochs = f"{total * share / tokens:.2f} epochs" if tokens else "no usable samples"
        print(f"  {source.path} (weight {source.weight:g}, {share:.0%} of tokens): {epochs}", file=out)
    if throughput is None:
        print(
            f"ETA on {gpus} x {device}: not estimated, tailor has no figures for the {device}; --device h100, h200 "
            "or a100 gives the ETA on one of those GPUs",
            file=out,
        )
        if price is not None:
            print("cost: not estimated without an ETA", file=out)
        return
    try:
        rate, origin = throughput(cfg.model.path)
    except (OSError, KeyError, ValueError) as e:
        print(f"ETA: unknown ({e})", file=out)
        return
    seconds = total / (rate * gpus)
    print(f"ETA on {gpus} x {device}: {format_eta(seconds)} at {rate:,.0f} tokens/s per GPU ({origin})", file=out)
    if price is not None:
        gpu_hours = seconds / 3600 * gpus
        print(f"cost: {gpu_hours * price:,.2f} ({gpu_hours:,.2f} GPU-hours at {price:g} per GPU-hour)", file=out)
