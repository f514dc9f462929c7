"""Samples that appear more than once in train, and eval samples that train also has, counted per source with the
first few FILE:LINE pairs: found from the hashes the cache keeps (finetune/data/fingerprint.py), reading no file.

Each sample is counted once, as the first of these kinds that it is:
- `repeat`: a train sample the same as an earlier one of train (the same once whitespace is normalised);
- `repeat_other_system`: a train sample whose conversation is an earlier one's, under another system prompt (or none);
- `in_train`: an eval sample the same as a train sample;
- `in_train_other_system`: an eval sample whose conversation a train sample has, under another system prompt.
"Earlier" is the order of data.train: its sources, their files, their lines; an eval sample is paired with the first
train sample it matches. These are warnings: a run goes on, and `tailor validate --fix` leaves the eval ones out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from finetune.data.fingerprint import FINGERPRINT_DTYPE
from finetune.data.sources import TokenizedSource

TRAIN_KINDS = ("repeat", "repeat_other_system")
EVAL_KINDS = ("in_train", "in_train_other_system")
# How many samples of a kind, in words: "3 samples repeat ..."
COUNTED = {
    "repeat": "samples repeat an earlier train sample",
    "repeat_other_system": "samples repeat an earlier train conversation under another system prompt",
    "in_train": "eval samples are also in train",
    "in_train_other_system": "eval samples are in train under another system prompt",
}
# One sample and the one it repeats, in words: "FILE:LINE: warning: the same sample as FILE:LINE ..."
PAIRED = {
    "repeat": "the same sample as {first} (whitespace aside): trained twice as often",
    "repeat_other_system": "the same conversation as {first}, under another system prompt",
    "in_train": "eval sample also in train, at {first}",
    "in_train_other_system": "eval conversation also in train, at {first}, under another system prompt",
}


@dataclass
class Repeat:
    """One sample that repeats an earlier train sample, of one of TRAIN_KINDS or EVAL_KINDS."""

    kind: str
    where: str  # FILE:LINE of the sample
    first: str  # FILE:LINE of the train sample it repeats

    def line(self) -> str:
        """The warning as printed: `FILE:LINE: warning: ...`."""
        return f"{self.where}: warning: {PAIRED[self.kind].format(first=self.first)}"


@dataclass
class SourceRepeats:
    """The repeats found in one source: their counts per kind and the first few of each."""

    split: str  # "train" or "eval"
    source: str  # the source's path, as configured
    counts: dict[str, int] = field(default_factory=dict)  # kind -> samples, for the kinds found
    examples: list[Repeat] = field(default_factory=list)  # the first few of each kind, in file order

    def summary(self) -> str:
        """'3 samples repeat ...; 1 samples repeat ...': the counts in words."""
        return "; ".join(f"{n:,} {COUNTED[kind]}" for kind, n in self.counts.items())


def find_repeats(train: list[TokenizedSource], eval_: list[TokenizedSource], shown: int) -> list[SourceRepeats]:
    """Per source of train, then of eval (in their order), the samples of each kind, with the first `shown` pairs."""
    train_samples, eval_samples = _Samples(train), _Samples(eval_)
    found = []
    for split, sources, samples, (kinds, firsts) in (
        ("train", train, train_samples, _repeats_within(train_samples)),
        ("eval", eval_, eval_samples, _found_in(train_samples, eval_samples)),
    ):
        names = TRAIN_KINDS if split == "train" else EVAL_KINDS
        for k, source in enumerate(sources):
            repeats = SourceRepeats(split, source.name)
            for code, name in enumerate(names, 1):
                hits = np.flatnonzero((samples.source == k) & (kinds == code))
                if len(hits):
                    repeats.counts[name] = len(hits)
                repeats.examples += [
                    Repeat(name, samples.where(i), train_samples.where(firsts[i])) for i in hits[:shown].tolist()
                ]
            found.append(repeats)
    return found


def eval_lines_in_train(train: list[TokenizedSource], eval_: list[TokenizedSource]) -> dict[Path, set[int]]:
    """The lines of each eval file whose sample train has (`in_train` or `in_train_other_system`)."""
    eval_samples = _Samples(eval_)
    kinds, _ = _found_in(_Samples(train), eval_samples)
    lines: dict[Path, set[int]] = {}
    for i in np.flatnonzero(kinds).tolist():
        lines.setdefault(eval_samples.path(i), set()).add(int(eval_samples.line[i]))
    return lines


class _Samples:
    """The cached fingerprints of every sample of some sources, one after the other, with where each comes from."""

    def __init__(self, sources: list[TokenizedSource]):
        files = [f for s in sources for f in s.files]
        self.paths = [f.source for f in files]
        rows = np.concatenate([f.fingerprints for f in files]) if files else np.zeros(0, FINGERPRINT_DTYPE)
        self.file = np.repeat(np.arange(len(files)), [len(f.fingerprints) for f in files])
        self.source = np.repeat(np.arange(len(sources)), [sum(len(f.fingerprints) for f in s.files) for s in sources])
        self.line, self.hashes = rows["line"], {"sample": rows["sample"], "conversation": rows["conversation"]}
        self.sorted: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.line)

    def path(self, i: int) -> Path:
        return self.paths[self.file[i]]

    def where(self, i: int) -> str:
        return f"{self.path(i)}:{self.line[i]}"

    def distinct(self, column: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """np.unique of a hash column, with its first indices and inverse, computed once for all the lookups.

        Returns:
            The distinct hashes (sorted), the index of each one's first sample, and each sample's hash as an index
            into them. Made from one unstable sort: a stable one, which np.unique needs for the first indices, takes
            several times longer on millions of hashes.
        """
        if column not in self.sorted:
            hashes = self.hashes[column]
            order = np.argsort(hashes)
            in_order = hashes[order]
            starts_group = np.ones(len(hashes), bool)
            starts_group[1:] = in_order[1:] != in_order[:-1]
            starts = np.flatnonzero(starts_group)
            inverse = np.empty(len(hashes), np.int64)
            inverse[order] = np.cumsum(starts_group) - 1
            first = np.minimum.reduceat(order, starts) if len(starts) else starts
            self.sorted[column] = in_order[starts], first, inverse
        return self.sorted[column]


def _repeats_within(samples: _Samples) -> tuple[np.ndarray, np.ndarray]:
    """Per sample, its kind (0: none, 1: repeat, 2: repeat_other_system) and the earlier sample it repeats."""
    index = np.arange(len(samples))
    same, same_conversation = (_first_of_each(samples, column) for column in ("sample", "conversation"))
    kinds = np.where(same != index, 1, np.where(same_conversation != index, 2, 0))
    return kinds, np.where(same != index, same, same_conversation)


def _found_in(train: _Samples, eval_: _Samples) -> tuple[np.ndarray, np.ndarray]:
    """Per eval sample, its kind (0: none, 1: in_train, 2: in_train_other_system) and the first train sample it
    matches."""
    same, first = _lookup(train, eval_, "sample")
    same_conversation, first_conversation = _lookup(train, eval_, "conversation")
    kinds = np.where(same, 1, np.where(same_conversation, 2, 0))
    return kinds, np.where(same, first, first_conversation)


def _first_of_each(samples: _Samples, column: str) -> np.ndarray:
    """For each sample, the index of the first sample with its hash."""
    _, first, inverse = samples.distinct(column)
    return first[inverse]


def _lookup(train: _Samples, eval_: _Samples, column: str) -> tuple[np.ndarray, np.ndarray]:
    """For each eval sample, whether a train sample has its hash, and the first one that does."""
    queries = eval_.hashes[column]
    if not len(train):
        return np.zeros(len(queries), bool), np.zeros(len(queries), np.int64)
    unique, first, _ = train.distinct(column)
    at = np.searchsorted(unique, queries).clip(max=len(unique) - 1)
    return unique[at] == queries, first[at]
