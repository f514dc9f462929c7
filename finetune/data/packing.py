"""Documents -> sequences of exactly seq_len predictions -> Batch.

A document of L tokens t with weights w gives L - 1 predictions: inputs t[:-1], targets t[1:], weights
w[1:]. Whole documents fill a sequence in order, except that a document that does not fit the room left
lets a later one that does go first (looking at most LOOKAHEAD documents ahead); when nothing fits, the
room left is padding (a document of weight 0). A document longer than seq_len follows `overlong`:
- split: cut into pieces of seq_len predictions, each its own document, the first starting a fresh
  sequence so that every piece but the last sees a full seq_len of context; pieces with nothing to train
  are skipped (counted), as they would cost a step and teach nothing;
- truncate: keep its first seq_len predictions;
- drop: leave it out.
Every case is counted in `counts`, which the loader reports.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

PAD_TOKEN = 0  # padding has weight 0, so any id works; 0 keeps it recognisable
LOOKAHEAD = 64  # how far ahead of the next document packing may look for one that fits


@dataclass
class Batch:
    """One micro-batch: batch_size sequences of seq_len predictions, end to end (fixed shapes for compile).

    Document boundaries are in seqlens: attention stays inside a document and positions restart in each.
    """

    tokens: torch.Tensor  # int64 [batch_size * seq_len], the inputs
    targets: torch.Tensor  # int64 [batch_size * seq_len]
    weights: torch.Tensor  # float32 [batch_size * seq_len], loss weight of each target
    seqlens: list[int]  # document lengths, sequence after sequence; each sequence's sum to seq_len
    n_trained: int | None = None  # targets with weight > 0; counted when not given

    def __post_init__(self) -> None:
        if self.n_trained is None:
            self.n_trained = int(torch.count_nonzero(self.weights))


@dataclass(frozen=True)
class Piece:
    """Predictions [begin, end) of document `doc`: inputs tokens[begin:end], targets tokens[begin+1:end+1]."""

    doc: int
    begin: int
    end: int


class DocumentFeed:
    """Documents in packing order, epoch after epoch, with room to take a few of them early.

    `order(epoch)` gives the documents of an epoch (None: no more epochs). `position` is the first document
    not packed yet; `taken` holds the later positions already packed, at most LOOKAHEAD places ahead.
    The state is a few integers, so a resumed run continues at exactly the same document.
    """

    def __init__(self, order: Callable[[int], np.ndarray | None]):
        self.order = order
        self.epoch, self.position, self.offset = 0, 0, 0  # offset: predictions of a split document packed
        self.taken: set[int] = set()
        self._docs_epoch, self._docs = -1, None

    def _documents(self) -> np.ndarray | None:
        if self._docs_epoch != self.epoch:
            self._docs_epoch, self._docs = self.epoch, self.order(self.epoch)
        return self._docs

    def head(self) -> tuple[int, int] | None:
        """(position, document) of the first document not packed yet; None once the feed is exhausted."""
        docs = self._documents()
        return None if docs is None else (self.position, int(docs[self.position]))

    def upcoming(self, limit: int) -> tuple[np.ndarray, np.ndarray]:
        """The positions and documents of the next `limit` documents not packed yet, within this epoch, as arrays."""
        docs = self._documents()
        if docs is None:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        stop = min(len(docs), self.position + limit + len(self.taken))
        positions = np.arange(self.position, stop)
        if self.taken:  # a few positions: a mask beats np.isin's sorting
            keep = np.ones(len(positions), bool)
            keep[[p - self.position for p in self.taken if p < stop]] = False
            positions = positions[keep]
        positions = positions[:limit]
        return positions, docs[positions]

    def take(self, position: int) -> None:
        """Mark the document at `position` packed; the feed moves past it once every earlier one is."""
        if position != self.position:
            self.taken.add(position)
            return
        self.position += 1
        self.offset = 0
        while self.position in self.taken:
            self.taken.remove(self.position)
            self.position += 1
        if self.position == len(self._documents()):
            self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict:
        """The feed's position: epoch, position, offset into a split document, positions taken early."""
        return {"epoch": self.epoch, "position": self.position, "offset": self.offset, "taken": sorted(self.taken)}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a `state_dict`."""
        self.epoch, self.position, self.offset = state["epoch"], state["position"], state["offset"]
        self.taken = set(state["taken"])


class DocumentStore(Protocol):
    """What packing reads documents from (finetune/data/sources.py's TokenizedSource)."""

    def predictions(self, docs: int | np.ndarray) -> int | np.ndarray:
        """Tokens - 1 of a document, or of each."""

    def is_trained(self, doc: int, begin: int, end: int) -> bool:
        """Whether any of targets [begin, end) of document `doc` has a weight > 0."""

    def write(self, piece: Piece, tokens: np.ndarray, targets: np.ndarray, weights: np.ndarray) -> None:
        """Write a piece's inputs, targets and loss weights into the given slices of a batch."""


def pack_sequence(
    feed: DocumentFeed, store: DocumentStore, seq_len: int, overlong: str, counts: Counter
) -> list[Piece]:
    """The pieces of the next sequence; [] once the feed is exhausted.

    Documents go in feed order; when the next one does not fit the room left, a later one (at most
    LOOKAHEAD places ahead) that fits goes first, which keeps padding to a few percent.

    Args:
        overlong: data.overlong: "split", "truncate" or "drop" a document longer than `seq_len`.
        counts: where each overlong case is counted, by kind.
    """
    pieces: list[Piece] = []
    room = seq_len
    while room:
        piece = _next_piece(feed, store, seq_len, room, overlong, counts)
        if piece is None:
            break
        pieces.append(piece)
        room -= piece.end - piece.begin
    return pieces


def _next_piece(
    feed: DocumentFeed, store: DocumentStore, seq_len: int, room: int, overlong: str, counts: Counter
) -> Piece | None:
    """Take from the feed the first piece that fits in `room`; None if nothing fits.

    The next document usually fits. When it does not, the documents of the look-ahead are judged together in a few
    numpy operations: the first that fits, or that needs handling where it stands (an overlong one to drop, or to
    split at the head of a fresh sequence), is the one taken.
    """
    while True:
        head = feed.head()
        if head is None:
            return None
        n = int(store.predictions(head[1]))
        if n <= room and n <= seq_len:  # the usual case, without building the look-ahead
            feed.take(head[0])
            return Piece(head[1], 0, n)
        positions, docs = feed.upcoming(LOOKAHEAD)
        n = store.predictions(docs)
        overlong_docs = n > seq_len
        fits = np.minimum(n, seq_len) <= room
        if overlong == "drop":
            acts = fits | overlong_docs
        elif overlong == "split":
            acts = fits & ~overlong_docs
            acts[0] |= bool(overlong_docs[0]) and room == seq_len  # positions[0] is the head of the feed
        else:  # truncate
            acts = fits
        if not acts.any():
            return None
        i = int(acts.argmax())
        position, doc, length = int(positions[i]), int(docs[i]), int(n[i])
        if length <= seq_len or overlong == "truncate":
            if length > seq_len:
                counts["overlong_truncated"] += 1
            feed.take(position)
            return Piece(doc, 0, min(length, seq_len))
        if overlong == "drop":
            counts["overlong_dropped"] += 1
            feed.take(position)
            continue
        # split: a long document waits at the head of the feed for a fresh sequence
        begin = feed.offset
        if begin == 0:
            counts["overlong_split"] += 1
        end = min(begin + room, length)
        if end == length:
            feed.take(position)
        else:
            feed.offset = end
        if store.is_trained(doc, begin, end):
            return Piece(doc, begin, end)
        counts["overlong_untrained_pieces_skipped"] += 1


def make_batch(sequences: list[tuple[DocumentStore, list[Piece]]], seq_len: int) -> Batch:
    """Lay sequences (each: its store and its pieces) side by side, padding each to seq_len."""
    n = len(sequences) * seq_len
    tokens = np.full(n, PAD_TOKEN, np.int64)
    targets = np.full(n, PAD_TOKEN, np.int64)
    weights = np.zeros(n, np.float32)
    seqlens = []
    for s, (store, pieces) in enumerate(sequences):
        position = s * seq_len
        for piece in pieces:
            length = piece.end - piece.begin
            window = slice(position, position + length)
            store.write(piece, tokens[window], targets[window], weights[window])
            seqlens.append(length)
            position += length
        if position < (s + 1) * seq_len:
            seqlens.append((s + 1) * seq_len - position)
    # counted in numpy: a torch reduction on a small CPU tensor can cost tens of ms in thread wake-ups
    return Batch(
        torch.from_numpy(tokens),
        torch.from_numpy(targets),
        torch.from_numpy(weights),
        seqlens,
        n_trained=int(np.count_nonzero(weights)),
    )
