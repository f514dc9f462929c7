"""Packing keeps every token once and in order, never lets a prediction cross documents, pads with weight 0."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from finetune.data import tokenize_sample
from finetune.data.config import DataSource
from finetune.data.packing import LOOKAHEAD, PAD_TOKEN, DocumentFeed, Piece, make_batch, pack_sequence
from finetune.data.sources import open_sources


class ListStore:
    """Documents given as token lists; token j of document i is 1000 * i + j unless given."""

    def __init__(self, lengths, weights=None):
        self.docs = [np.arange(n) + 1000 * i for i, n in enumerate(lengths)]
        self.weights = weights or [np.r_[0.0, np.ones(n - 1)] for n in lengths]

    def predictions(self, docs):
        if np.ndim(docs) == 0:
            return len(self.docs[docs]) - 1
        return np.array([len(self.docs[doc]) for doc in docs], dtype=np.int64) - 1

    def is_trained(self, doc, begin, end):
        return bool(self.weights[doc][begin + 1 : end + 1].any())

    def write(self, piece, tokens, targets, weights):
        doc = self.docs[piece.doc]
        tokens[:] = doc[piece.begin : piece.end]
        targets[:] = doc[piece.begin + 1 : piece.end + 1]
        weights[:] = self.weights[piece.doc][piece.begin + 1 : piece.end + 1]


def pack_all(store, seq_len, overlong="split"):
    feed = DocumentFeed(lambda epoch: np.arange(len(store.docs)) if epoch == 0 else None)
    counts, sequences = Counter(), []
    while pieces := pack_sequence(feed, store, seq_len, overlong, counts):
        sequences.append(pieces)
    return sequences, counts


def test_every_token_once_in_order_and_no_prediction_crosses_documents():
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 300, size=200).tolist() + [1000, 450]
    store = ListStore(lengths)
    seq_len = 256
    sequences, counts = pack_all(store, seq_len)
    batch = make_batch([(store, pieces) for pieces in sequences], seq_len)
    assert batch.tokens.shape == batch.targets.shape == batch.weights.shape == (len(sequences) * seq_len,)

    inputs, targets = {}, {}
    position = 0
    for pieces in sequences:
        end_of_sequence = position + seq_len
        for piece in pieces:
            n = piece.end - piece.begin
            inputs.setdefault(piece.doc, []).append(batch.tokens[position : position + n].tolist())
            targets.setdefault(piece.doc, []).append(batch.targets[position : position + n].tolist())
            position += n
        assert batch.weights[position:end_of_sequence].sum() == 0  # padding
        assert (batch.tokens[position:end_of_sequence] == PAD_TOKEN).all()
        position = end_of_sequence
    for doc, tokens in enumerate(store.docs):  # each document whole, once, its pieces in order
        assert sum(inputs[doc], []) == tokens[:-1].tolist()
        assert sum(targets[doc], []) == tokens[1:].tolist()
    assert counts == {"overlong_split": sum(n - 1 > seq_len for n in lengths)}
    assert batch.n_trained == sum(n - 1 for n in lengths)


def test_seqlens_sum_to_seq_len_per_sequence():
    store = ListStore([5, 7, 3, 9, 2])
    sequences, _ = pack_all(store, 10)
    batch = make_batch([(store, p) for p in sequences], 10)
    sums, total = [], 0
    for n in batch.seqlens:
        total += n
        if total % 10 == 0:
            sums.append(total)
    assert sum(batch.seqlens) == 10 * len(sequences) and len(sums) == len(sequences)
    # 4 + 6 predictions fill the first sequence exactly; then 2 + 8, then 1 and padding
    assert batch.seqlens == [4, 6, 2, 8, 1, 9]


def test_documents_keep_their_order_when_they_fit():
    store = ListStore([11] * 12)
    sequences, _ = pack_all(store, 30)
    assert [p.doc for pieces in sequences for p in pieces] == list(range(12))


def test_a_later_document_fills_the_room_left():
    store = ListStore([601, 601, 101, 101])
    sequences, _ = pack_all(store, 1000)
    assert [[p.doc for p in pieces] for pieces in sequences] == [[0, 2, 3], [1]]


def test_lookahead_is_bounded():
    store = ListStore([600] + [900] * (LOOKAHEAD + 5) + [101])
    sequences, _ = pack_all(store, 1000)
    assert [p.doc for p in sequences[0]] == [0]  # the small document is beyond the lookahead


def test_overlong_split_starts_a_fresh_sequence():
    store = ListStore([5, 26, 3])
    sequences, counts = pack_all(store, 10, "split")
    assert sequences == [[Piece(0, 0, 4), Piece(2, 0, 2)], [Piece(1, 0, 10)], [Piece(1, 10, 20)], [Piece(1, 20, 25)]]
    assert counts == {"overlong_split": 1}


def test_overlong_split_skips_untrained_pieces():
    weights = [np.r_[np.zeros(15), np.ones(11)]]  # the first 14 targets are untrained
    sequences, counts = pack_all(ListStore([26], weights), 10, "split")
    assert sequences == [[Piece(0, 10, 20)], [Piece(0, 20, 25)]]
    assert counts == {"overlong_split": 1, "overlong_untrained_pieces_skipped": 1}


def test_overlong_truncate_and_drop():
    sequences, counts = pack_all(ListStore([5, 26, 3]), 10, "truncate")
    assert sequences == [[Piece(0, 0, 4), Piece(2, 0, 2)], [Piece(1, 0, 10)]]
    assert counts == {"overlong_truncated": 1}
    sequences, counts = pack_all(ListStore([5, 26, 3]), 10, "drop")
    assert sequences == [[Piece(0, 0, 4), Piece(2, 0, 2)]]
    assert counts == {"overlong_dropped": 1}


def test_feed_state_round_trips():
    store = ListStore([601, 601, 101, 101, 300, 700])
    feed = DocumentFeed(lambda epoch: np.arange(6) if epoch < 3 else None)
    pack_sequence(feed, store, 1000, "split", Counter())
    state = feed.state_dict()
    assert state == {"epoch": 0, "position": 1, "offset": 0, "taken": [2, 3]}
    copy = DocumentFeed(lambda epoch: np.arange(6) if epoch < 3 else None)
    copy.load_state_dict(state)
    for _ in range(8):
        assert pack_sequence(copy, store, 1000, "split", Counter()) == pack_sequence(
            feed, store, 1000, "split", Counter()
        )


def test_cached_store_writes_the_sample_slices(tmp_path, tokenizers, write_jsonl):
    """TokenizedSource.write gives a piece of a cached sample exactly as slicing tokenize_sample's tokens and weights
    does."""
    samples = [
        {
            "messages": [
                {"role": "user", "content": f"q{i} " * (i + 1)},
                {"role": "assistant", "content": f"a{i} " * (2 * i + 1), "weight": 0.25 * (i % 4)},
                {"role": "user", "content": "more?"},
                {"role": "assistant", "content": "yes " * i + "done"},
            ]
        }
        for i in range(6)
    ]
    data = write_jsonl(tmp_path / "d.jsonl", samples)
    (source,) = open_sources([DataSource(str(data))], tokenizers["v3"], "all", tmp_path / "cache", 0)
    rng = np.random.default_rng(0)
    for doc, sample in enumerate(samples):
        expected = tokenize_sample(sample, tokenizers["v3"])
        tokens, weights = np.asarray(expected.tokens), np.asarray(expected.weights, np.float32)
        n = len(tokens) - 1
        for _ in range(20):
            begin = int(rng.integers(0, n))
            end = int(rng.integers(begin + 1, n + 1))
            out = [np.zeros(end - begin, np.int64), np.zeros(end - begin, np.int64), np.zeros(end - begin, np.float32)]
            source.write(Piece(doc, begin, end), *out)
            assert out[0].tolist() == tokens[begin:end].tolist()
            assert out[1].tolist() == tokens[begin + 1 : end + 1].tolist()
            assert out[2].tolist() == weights[begin + 1 : end + 1].tolist()
            assert source.is_trained(doc, begin, end) == bool(weights[begin + 1 : end + 1].any())


@pytest.mark.parametrize("batch_size", [1, 3])
def test_batch_shapes_are_fixed(batch_size):
    store = ListStore([4, 4])
    batch = make_batch([(store, [Piece(0, 0, 3), Piece(1, 0, 3)])] + [(None, [])] * (batch_size - 1), 8)
    assert batch.tokens.shape == (batch_size * 8,)
    assert str(batch.tokens.dtype) == str(batch.targets.dtype) == "torch.int64"
    assert str(batch.weights.dtype) == "torch.float32"
    assert batch.seqlens == [3, 3, 2] + [8] * (batch_size - 1)
    assert batch.n_trained == 6
