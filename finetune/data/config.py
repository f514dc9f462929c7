"""The `data:` section of the training config: which JSONL files train and evaluate, and how they are read.

Here rather than in finetune/config/ so that the data path reads its settings without importing the rest of the
config, which names the model's settings (model/settings.py: LoRAArgs, the attention backends): data knows the
tokenizer, never the network. finetune/config/ reads, checks and documents these fields with the others.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

# Each field's meaning is the comment on its line or just above it (docs/config.md's reference is made of them).

TRAIN_ON = ("all", "last")  # also `tailor tokenize --train-on`'s choices


@dataclass
class DataSource:
    """One source of samples and its weight."""

    path: str  # a .jsonl file, or a folder of them
    # this source's share of the training tokens, relative to the other sources' weights (eval reads every sample)
    weight: float = 1.0


@dataclass
class DataConfig:
    """The `data:` section of the training config."""

    # required: a list of {path, weight}, one path, or "a.jsonl:2,b.jsonl:1"
    # (mistral-finetune: `data.instruct_data`, `data.data`)
    train: list[DataSource] = field(default_factory=list)
    # the same, for evaluation; required while eval is enabled (mistral-finetune: `data.eval_instruct_data`)
    eval: list[DataSource] = field(default_factory=list)
    # sources the model should not get worse on (general chats), evaluated like data.eval beside it and reported
    # as "retain", with their change against the base model
    retain: list[DataSource] = field(default_factory=list)
    train_on: Literal[TRAIN_ON] = "all"  # train on every assistant message, or only the last one
    # `error` stops before the first step at a bad line, naming file and line; `skip` leaves it out and counts it
    on_bad_sample: Literal["error", "skip"] = "error"
    # with `skip`: the largest share of a source's lines that may be bad (0.05: 5%); a source above it is refused
    # before step 1, exit code 1 (Mistral's API: invalid_sample_skip_percentage); 1 accepts any share
    max_bad_fraction: float = 1.0
    # a sample longer than seq_len: `split` into pieces of seq_len, `truncate`, or `drop`; each case is counted
    overlong: Literal["split", "truncate", "drop"] = "split"
    shuffle: bool = True  # reshuffle the train data every epoch (mistral-finetune: `data.instruct.shuffle`)
    # tokenized data, reused by later runs, `tailor validate` and every rank; null: .tailor_cache beside run_dir
    cache_dir: str | None = None
    # tokenizer processes at most (one per usable core, per two with SentencePiece; never a lone one: see
    # cache.worker_processes); 0 tokenizes in the training process
    num_workers: int = 2


def resolve_cache_dir(data: DataConfig, run_dir: str) -> Path:
    """Where tokenized data is cached: data.cache_dir, or .tailor_cache beside run_dir, shared by later runs."""
    if data.cache_dir:
        return Path(data.cache_dir).expanduser()
    return Path(run_dir).expanduser().resolve().parent / ".tailor_cache"
