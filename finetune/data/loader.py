"""Batches for training (endless, mixed, sharded, resumable) and for evaluation (finite, rank-independent).

Train: each source is packed on its own, and every sequence comes from one source drawn with probability
proportional to the source weights, so weights are shares of tokens, as in mistral-finetune. In epoch e a
source's samples are permuted by (seed, source, e) and rank r takes every world_size-th of them: ranks read
disjoint shares that together cover the data, and every epoch is reshuffled. The draw of sequence k
depends only on (seed, rank, k), and the feeds' positions are integers, so `state_dict()` is small and a
loader that loads it continues with exactly the next batch.

Eval: all eval samples in file order are packed into one global list of sequences, the same for any world
size; rank r takes sequences r, r + world_size, ...; every rank gets the same number of batches, padded
with batches of weight 0, because FSDP needs the same number of forward calls on every rank.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np

from finetune.data.errors import DataError, DataFaults
from finetune.data.packing import Batch, DocumentFeed, Piece, make_batch, pack_sequence
from finetune.data.sources import RunData, TokenizedSource, check_bad_samples, check_bad_shares


def epoch_order(n: int, seed: int, source_index: int, rank: int, world_size: int, shuffle: bool):
    """order(epoch): this rank's share of a source's n samples in that epoch, reshuffled every epoch."""

    def order(epoch: int) -> np.ndarray:
        samples = np.random.default_rng([seed, source_index, epoch]).permutation(n) if shuffle else np.arange(n)
        return samples[rank::world_size]

    return order


class TrainLoader:
    """Endless iterator of Batch for one rank; see the module docstring for the order.

    Args:
        bad_samples: the sources' bad lines skipped, by kind, for `report`.
        overlong: data.overlong: "split", "truncate" or "drop".
        seed: with the rank and the sequence's index, draws each sequence's source; with the source and the epoch,
            shuffles its samples.
    """

    def __init__(
        self,
        sources: list[TokenizedSource],
        bad_samples: Counter,
        *,
        seq_len: int,
        batch_size: int,
        overlong: str,
        rank: int,
        world_size: int,
        seed: int,
        shuffle: bool,
    ):
        self.sources = sources
        self.seq_len, self.batch_size, self.overlong = seq_len, batch_size, overlong
        self.seed, self.rank = seed, rank
        self.feeds = [
            DocumentFeed(epoch_order(len(s), seed, i, rank, world_size, shuffle)) for i, s in enumerate(sources)
        ]
        weights = np.array([s.weight for s in sources], np.float64)
        self.cumulative_weights = np.cumsum(weights / weights.sum())
        self.bad_samples = bad_samples
        self.counts: Counter = Counter()
        self.sequences = 0  # sequences yielded so far: the index of the next draw

    def __iter__(self) -> TrainLoader:
        return self

    def __next__(self) -> Batch:
        return make_batch([self._next_sequence() for _ in range(self.batch_size)], self.seq_len)

    def _next_sequence(self) -> tuple[TokenizedSource, list[Piece]]:
        draw = np.random.default_rng([self.seed, self.rank, self.sequences]).random()
        k = min(int(np.searchsorted(self.cumulative_weights, draw, side="right")), len(self.sources) - 1)
        self.sequences += 1
        return self.sources[k], pack_sequence(self.feeds[k], self.sources[k], self.seq_len, self.overlong, self.counts)

    def state_dict(self) -> dict:
        """The position in the data: a few integers, from which a loader continues with exactly the next batch."""
        return {
            "sequences": self.sequences,
            "counts": dict(self.counts),
            "feeds": [feed.state_dict() for feed in self.feeds],
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a `state_dict`.

        Raises:
            ValueError: the state has another number of sources than data.train.
            DataError: the saved position is past what this rank reads of a source now: the source changed.
        """
        if len(state["feeds"]) != len(self.feeds):
            raise ValueError(
                f"the saved data position has {len(state['feeds'])} sources but data.train has "
                f"{len(self.feeds)}; resume with the same data.train"
            )
        self.sequences = state["sequences"]
        self.counts = Counter(state["counts"])
        for feed, saved, source in zip(self.feeds, state["feeds"], self.sources):
            feed.load_state_dict(saved)
            docs = feed.order(feed.epoch)
            past = feed.position >= len(docs) or any(p >= len(docs) for p in feed.taken)
            if past or (feed.offset and feed.offset >= source.predictions(int(docs[feed.position]))):
                raise DataError(
                    f"the saved data position (sample {feed.position} of epoch {feed.epoch} of {source.name}) is "
                    f"past what this rank reads of it now ({len(docs):,} samples): {source.name} changed since the "
                    "checkpoint; resume with the data it was trained on, or start a new run_dir"
                )

    def report(self) -> dict:
        """What this rank's data looked like so far.

        Returns:
            Bad samples skipped (whole files, the same on every rank), overlong samples met so far, and the epochs
            begun in each source.
        """
        return {
            "skipped_bad_samples": dict(self.bad_samples),
            "overlong": dict(self.counts),
            "epochs_begun": {s.name: f.epoch + 1 for s, f in zip(self.sources, self.feeds)},
        }


def build_train_loader(
    data: RunData, *, seq_len: int, batch_size: int, rank: int, world_size: int, seed: int
) -> TrainLoader:
    """This rank's endless batches of data.train.

    Raises:
        DataFaults: a bad line while data.on_bad_sample is "error", a source's share of bad lines above
            data.max_bad_fraction (TooManyBadLines), a source with no usable sample or fewer than `world_size`.
        DataError: every sample of a source (that this rank reads) is overlong and data.overlong is "drop".
    """
    cfg, sources = data.config, data.train
    bad = check_bad_samples(sources, cfg.on_bad_sample)
    check_bad_shares(sources, cfg.max_bad_fraction)
    for source in sources:
        if len(source) == 0:
            lines = sum(f.meta["n_lines"] for f in source.files)
            raise DataFaults(
                f"{source.name}: no usable sample in {lines:,} lines (bad lines skipped, or samples with nothing to "
                "train left out); `tailor validate` lists them"
            )
        if len(source) < world_size:
            raise DataFaults(f"{source.name}: {len(source)} usable samples cannot be shared by {world_size} ranks")
        fits = source.lengths - 1 <= seq_len
        if cfg.overlong == "drop" and not np.any(fits if cfg.shuffle else fits[rank::world_size]):
            raise DataError(
                f"{source.name}: every sample (of rank {rank}) is longer than seq_len {seq_len} and overlong is drop"
            )
    return TrainLoader(
        sources,
        bad,
        seq_len=seq_len,
        batch_size=batch_size,
        overlong=cfg.overlong,
        rank=rank,
        world_size=world_size,
        seed=seed,
        shuffle=cfg.shuffle,
    )


def build_eval_batches(
    data: RunData, *, seq_len: int, batch_size: int, rank: int, world_size: int, group: str = "eval"
) -> list[Batch]:
    """This rank's batches of data.eval, or of data.retain with `group="retain"`.

    Every rank gets the same number of batches, padded with batches of weight 0.

    Raises:
        DataFaults: a bad line while data.on_bad_sample is "error", a source's share of bad lines above
            data.max_bad_fraction (TooManyBadLines), or a source with no usable sample.
    """
    cfg, sources = data.config, getattr(data, group)
    check_bad_samples(sources, cfg.on_bad_sample)
    check_bad_shares(sources, cfg.max_bad_fraction)
    for source in sources:
        if len(source) == 0:
            raise DataFaults(
                f"{source.name}: no usable sample to evaluate on; remove it from data.{group}, or set eval.enabled: "
                "false"
            )
    counts: Counter = Counter()
    sequences = []  # the global list, identical on every rank
    for source in sources:
        n = len(source)
        feed = DocumentFeed(lambda epoch, n=n: np.arange(n) if epoch == 0 else None)
        while pieces := pack_sequence(feed, source, seq_len, cfg.overlong, counts):
            sequences.append((source, pieces))
    mine = sequences[rank::world_size]
    n_batches = math.ceil(math.ceil(len(sequences) / world_size) / batch_size)
    padding = (sources[0] if sources else None, [])  # a sequence of padding only
    mine += [padding] * (n_batches * batch_size - len(mine))
    return [make_batch(mine[b * batch_size : (b + 1) * batch_size], seq_len) for b in range(n_batches)]
