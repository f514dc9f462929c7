"""`epochs: N` as optimizer steps: the steps that draw N times the train data's tokens, counted once, early.

One epoch is every token of every train source once (the tokenized cache's counts of whole files, the same on every
rank, so every rank computes the same steps); a step draws seq_len x batch_size x grad_accumulation tokens on each
rank. Training resolves the epochs into max_steps once the data is counted, right after the run's start is chosen
(whose refusals come before any tokenizing) and before anything reads max_steps (whether a resumed run is done,
the schedule, the ETA, the config's record); `tailor validate` prints the same figure.
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction

from finetune.config import TrainConfig
from finetune.data.errors import DataError


def tokens_per_step(cfg: TrainConfig, world_size: int) -> int:
    """Tokens one optimizer step trains on over all ranks."""
    return cfg.seq_len * cfg.batch_size * cfg.grad_accumulation * world_size


def steps_for_epochs(epochs: float, epoch_tokens: int, step_tokens: int) -> int:
    """The fewest steps that draw at least `epochs` x `epoch_tokens` tokens (at least one step).

    Exact: the epochs as the decimal they were written, no float rounding to tip a step either way.

    Args:
        step_tokens: the tokens one step draws over all ranks (tokens_per_step).
    """
    return max(1, math.ceil(Fraction(str(epochs)) * epoch_tokens / step_tokens))


def resolve_epochs(cfg: TrainConfig, epoch_tokens: int, world_size: int) -> TrainConfig:
    """The config with `epochs` made into max_steps (epochs kept, for the record); unchanged without epochs.

    Args:
        epoch_tokens: the tokens of every train source once, as the data report counts them.

    Raises:
        DataError: `epochs` is set and data.train has no tokens to count epochs of.
    """
    if cfg.epochs is None:
        return cfg
    if epoch_tokens == 0:
        raise DataError(f"epochs: {cfg.epochs:g} epochs of data.train, which has no tokens; give it samples")
    steps = steps_for_epochs(cfg.epochs, epoch_tokens, tokens_per_step(cfg, world_size))
    return dataclasses.replace(cfg, max_steps=steps)


def describe_epochs(cfg: TrainConfig, epoch_tokens: int, world_size: int) -> str:
    """`epochs: 3 = 300 steps (...)`, the line of the plan and of `tailor validate`."""
    return (
        f"epochs: {cfg.epochs:g} = {cfg.max_steps:,} steps ({cfg.epochs:g} x {epoch_tokens:,} tokens of data.train "
        f"/ {tokens_per_step(cfg, world_size):,} tokens per step, rounded up)"
    )
