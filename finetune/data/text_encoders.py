"""Faster, token-identical stand-ins for mistral-common's plain-text `encode`.

mistral-common's chat templates call `tokenizer.encode(text, bos, eos)` for every piece of text. Two
shortcuts give the same tokens in less time; each is used only when a check at load time proves it exact
for the file at hand, and the tests compare both against the originals on every bundled tokenizer:

- SentencePiece: no piece of Mistral's SentencePiece vocabularies holds a '▁' (a space) after another
  character, so BPE never merges across the start of a space-led word. Encoding each word alone and
  concatenating is therefore exact, and words repeat, so a word -> ids memo skips most of the work.
- Tekken: `Encoding.encode` looks for special-token text on every call; Tekken registers none with
  tiktoken, so `encode_ordinary` returns the same ids about three times faster. And rather than adding
  the number of special tokens to every id in Python, we give tiktoken ranks shifted by that number:
  BPE only compares ranks, so the merges are the same and the ids come out final.

Both are told the texts of a batch of lines before their chat templates ask for them one by one (`prepare`), so that
the batch is encoded on every core this process may use: the SentencePiece memo learns the batch's new words in one
call that SentencePiece runs in C++ threads; Tekken's encoder gives each of its threads one contiguous share of the
batch's texts, which tiktoken's Rust BPE encodes without Python's lock (a thread per text, as tiktoken's own batch
call does, gains nothing: each short call takes the lock back).

Each gives a text's ids two ways (`TextEncoder`): as a list, for mistral-common's templates, and `packed`, as the
uint32 bytes the cache stores, which the plain-chat template appends to its sample's array with no int object per
token. The memo keeps its words packed, so a text is one `bytes.join` of its words.
"""

from __future__ import annotations

import copy
import os
import re
from array import array
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from itertools import accumulate, chain, islice
from typing import Any

import tiktoken
from mistral_common.tokens.tokenizers.sentencepiece import SentencePieceTokenizer
from mistral_common.tokens.tokenizers.tekken import Tekkenizer

# A word: spaces, then other characters. SentencePiece's dummy prefix makes a word's first space its '▁', so its ids
# are `encode(word minus one space)`: the group below (the first word of a text has no space to drop).
_WORD = re.compile(r"(?:^| )( *[^ ]+)")
_PROBE = "  Tab\there, NBSP\u00a0x ﬁ Ａ ½ e\u0301 \n\n end  "  # characters an NFKC-style normaliser would change


PACKED = "I"  # the array typecode of packed ids: uint32, as the cache's tokens.bin holds them
assert array(PACKED).itemsize == 4


def pack(ids: Iterable[int]) -> bytes:
    """Ids as PACKED (uint32) bytes."""
    return array(PACKED, ids).tobytes()


class TextEncoder:
    """text -> ids, equal to the tokenizer's `encode(text, bos=False, eos=False)`.

    As a list (for mistral-common's templates) or `packed` (for the plain-chat template, which appends them to the
    sample's array of PACKED ids).
    """

    def prepare(self, texts: list[str]) -> None:
        """Take the texts of a batch of lines, which `__call__` or `packed` will be asked for one by one next."""

    def __call__(self, text: str) -> list[int]:
        raise NotImplementedError

    def packed(self, text: str) -> bytes:
        """The ids of `text` as PACKED bytes."""
        return pack(self(text))


class StockEncoder(TextEncoder):
    """The tokenizer's own `encode`, where no faster encoder is proven exact."""

    def __init__(self, raw: Any):
        self._raw = raw

    def __call__(self, text: str) -> list[int]:
        return self._raw.encode(text, bos=False, eos=False)


class WordMemoSentencePiece(TextEncoder):
    """`encode(text)` of a SentencePiece model, word by word through a bounded memo of each word's packed ids.

    A text's ids are one `bytes.join` of its words' (faster than chaining lists of ints, and no int object per token).

    Args:
        processor: the SentencePiece processor (`SentencePieceTokenizer._model`).
        threads: for `prepare`'s batched calls.
    """

    # About 30 MB per process when full (200,000 words of 3.5 ids on average). Once full, new words
    # are encoded but not remembered: in text, frequent words come early, so the memo then holds the words that matter.
    max_words = 200_000

    def __init__(self, processor: Any, threads: int = 1):
        self._processor = processor
        self.threads = threads  # for `prepare`'s batched calls
        self._memo: dict[str, bytes] = {}
        self._split: dict[str, list[str] | None] = {}
        self._reported = 0  # words in the memo before those `learned` has not returned yet (a dict keeps order)

    @cached_property
    def _starts_word(self) -> list[bool]:
        """Whether each piece starts a word (with '▁'): for `_fill_misses` only, so made on its first miss (32k
        calls into SentencePiece, about 0.01 s, that a build whose words `prepare` learned never needs)."""
        return [self._processor.id_to_piece(i).startswith("▁") for i in range(self._processor.get_piece_size())]

    @staticmethod
    def _words(text: str) -> list[str] | None:
        """The memo keys of a text, or None when it has none or cannot be split safely."""
        if "▁" in text:  # a literal '▁' is a space to SentencePiece: no safe split
            return None
        keys = text.split(" ")  # the words, when no two spaces touch and none starts or ends the text
        if "" in keys:
            keys = _WORD.findall(text)
            if not keys:
                return None
            trailing = len(text) - len(text.rstrip(" "))
            if trailing:
                keys[-1] += " " * trailing
        return keys

    def prepare(self, texts: list[str]) -> None:
        """Learn the words of these texts that the memo does not know yet, in one batched call.

        SentencePiece encodes a list in C++ threads. Each word is encoded alone, as a miss in `packed` would be.
        """
        splits = list(map(self._words, texts))
        # the texts' words, kept for `packed` (this batch's only), which then need not split the texts again
        self._split = dict(zip(texts, splits))
        room = self.max_words - len(self._memo)
        if room <= 0:
            return
        new = list(set().union(*filter(None, splits)).difference(self._memo))  # set operations run in C
        if len(new) > room:  # the bound cuts: keep the words met first, so that every run keeps the same ones
            unknown = set(new)
            in_order = dict.fromkeys(chain.from_iterable(filter(None, splits)))
            new = [word for word in in_order if word in unknown][:room]
        if new:
            id_lists = self._processor.encode(new, num_threads=self.threads)
            flat = pack(chain.from_iterable(id_lists))  # one buffer for all, cut into each word's bytes
            ends = list(accumulate(4 * len(ids) for ids in id_lists))
            self._memo.update(zip(new, map(flat.__getitem__, map(slice, [0, *ends[:-1]], ends))))

    def __call__(self, text: str) -> list[int]:
        return array(PACKED, self.packed(text)).tolist()

    def packed(self, text: str) -> bytes:
        """The ids of `text` as PACKED bytes, from the memo; a word it lacks is encoded, kept while there is room."""
        keys = self._split.pop(text, False)
        if keys is False:
            keys = self._words(text)
        if keys is None:
            return pack(self._processor.encode(text))
        if len(self._memo) < self.max_words:  # `prepare` learned every word of its texts: a miss is rare
            try:
                return b"".join(map(self._memo.__getitem__, keys))
            except KeyError:  # a text `prepare` was not told of
                pass
        found = list(map(self._memo.get, keys))
        if None in found:
            self._fill_misses(keys, found)
        return b"".join(found)

    def _fill_misses(self, keys: list[str], found: list) -> None:
        missing = [found.index(None)]
        try:
            while True:
                missing.append(found.index(None, missing[-1] + 1))
        except ValueError:
            pass
        # Words without a leading space are encoded together, in one call, and told apart by the piece that
        # starts each of them (the only piece of a word that starts with '▁').
        alone = [i for i in missing if keys[i][0] == " " or keys[i][-1] == " "]
        together = [i for i in missing if keys[i][0] != " " and keys[i][-1] != " "]
        ids = self._processor.encode(" ".join(keys[i] for i in together)) if together else []
        starts = [k for k, token in enumerate(ids) if self._starts_word[token]]
        if len(starts) != len(together):
            alone, together = missing, []
        for i, begin, end in zip(together, starts, starts[1:] + [len(ids)]):
            found[i] = pack(ids[begin:end])
        for i in alone:
            found[i] = pack(self._processor.encode(keys[i]))
        if len(self._memo) < self.max_words:
            self._memo.update((keys[i], found[i]) for i in missing)

    def words(self) -> dict[str, bytes]:
        """Every word the memo holds -> its ids, packed."""
        return self._memo

    def learned(self) -> dict[str, bytes]:
        """The words remembered since the last call: what a worker process hands back to the cache's memo file."""
        new = dict(islice(self._memo.items(), self._reported, None))
        self._reported = len(self._memo)
        return new

    def remember(self, words: dict[str, bytes]) -> None:
        """Take words encoded elsewhere (a memo file, a worker), as far as the bound allows."""
        new = list(islice((word for word in words if word not in self._memo), max(self.max_words - len(self._memo), 0)))
        self._memo.update(zip(new, map(words.__getitem__, new)))
        self._reported = len(self._memo)  # known elsewhere already: not for `learned` to hand back


def word_memo_is_exact(tokenizer: SentencePieceTokenizer) -> bool:
    """True when splitting at spaces cannot change SentencePiece's output for this model."""
    if any("▁" in piece.lstrip("▁") for piece in tokenizer._vocab):
        return False
    # Normalisation must be the identity apart from spaces, or words would not encode alone as in context.
    return tokenizer._model.normalize(_PROBE) == "▁" + _PROBE.replace(" ", "▁")


class _FastEncode:
    """The raw tokenizer with a faster `encode`; every other attribute is the original's."""

    def __init__(self, inner: Any, encode_text: TextEncoder):
        self._inner = inner
        self.encode_text = encode_text

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def encode(self, s: str, bos: bool, eos: bool) -> list[int]:
        ids = self.encode_text(s)
        if bos:
            ids = [self._inner.bos_id, *ids]
        if eos:
            ids = [*ids, self._inner.eos_id]
        return ids


class ThreadedTiktoken(TextEncoder):
    """`encode_ordinary(text)` of a tiktoken encoding, with the texts of a batch encoded ahead on `threads` threads."""

    def __init__(self, encode_ordinary, threads: int = 1):
        self._encode = encode_ordinary
        self.threads = threads  # for `prepare`; worker processes sharing the cores set it to their share
        self._ready: dict[str, list[int]] = {}

    def prepare(self, texts: list[str]) -> None:
        """Encode these texts now, one contiguous share per thread, for `__call__` to hand out."""
        self._ready = {}
        unique = list(dict.fromkeys(texts))
        if self.threads < 2 or len(unique) < 2:
            return
        share = -(-len(unique) // self.threads)
        shares = [unique[k : k + share] for k in range(0, len(unique), share)]
        with ThreadPoolExecutor(len(shares) - 1) as pool:
            others = pool.map(self._encode_all, shares[1:])
            first = self._encode_all(shares[0])  # this thread's share, while the pool encodes the others
            self._ready = dict(zip(unique, chain(first, *others)))

    def _encode_all(self, texts: list[str]) -> list[list[int]]:
        return list(map(self._encode, texts))

    def __call__(self, text: str) -> list[int]:
        ids = self._ready.pop(text, None)  # a text the batch holds twice is encoded again: the same ids
        return self._encode(text) if ids is None else ids


def usable_cores() -> int:
    """The cores this process may run on (its affinity, which a container or taskset may narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def fast_text_encoder(raw: Any, threads: int = 1) -> TextEncoder:
    """The fastest TextEncoder of this tokenizer that is exact.

    Args:
        raw: mistral-common's raw tokenizer (SentencePiece or Tekken).
        threads: told a batch's texts first (`prepare`), the encoder encodes them in this many threads
            (SentencePiece: the memo's new words).
    """
    if isinstance(raw, SentencePieceTokenizer) and word_memo_is_exact(raw):
        return WordMemoSentencePiece(raw._model, threads)
    if isinstance(raw, Tekkenizer) and not raw._model._special_tokens:
        bpe, offset = raw._model, raw.num_special_tokens
        ranks = {piece: rank + offset for piece, rank in bpe._mergeable_ranks.items()}
        shifted = tiktoken.Encoding(
            name=f"{bpe.name}+{offset}", pat_str=bpe._pat_str, mergeable_ranks=ranks, special_tokens={}
        )
        return ThreadedTiktoken(shifted.encode_ordinary, threads)
    return StockEncoder(raw)


def with_fast_text_encoder(instruct_tokenizer: Any, threads: int = 1) -> Any:
    """A copy of mistral-common's instruct tokenizer whose chat templates use `fast_text_encoder`."""
    fast = copy.copy(instruct_tokenizer)
    fast.tokenizer = _FastEncode(instruct_tokenizer.tokenizer, fast_text_encoder(instruct_tokenizer.tokenizer, threads))
    return fast
