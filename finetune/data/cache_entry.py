"""One cache entry: the tokens of one .jsonl file as a folder of flat arrays, what reads it, and the check that it
is whole before it is used.

    tokens.bin        uint32, the tokens of all good samples, one after the other
    sample_starts.npy int64 [n+1], sample i is tokens[starts[i]:starts[i+1]]
    span_starts.npy   int64 [n+1], sample i's trained spans are spans[span_starts[i]:span_starts[i+1]]
    spans.npy         (begin, end, weight): tokens[begin:end] of the sample have this loss weight
    fingerprints.npy  (line, sample, conversation) per sample: its line in the file and the hashes that tell
                      repeated samples (finetune/data/fingerprint.py), so finding them reads no file again
    errors.jsonl      {"line", "kind", "message", "fixable"} for each bad line (left out)
    warnings.jsonl    {"line", "kind", "message"} for each warning of a usable line (finetune/data/errors.py's
                      SampleWarning); a line whose warning is in LEFT_OUT is left out too
    meta.json         counts; written last
Weights are stored as spans because they are constant over whole messages: 12 bytes per assistant
message instead of 4 per token. An entry is checked before it is used (entry_fault: counts, sizes, offsets, ids in
the vocabulary, no pickle). Its arrays are memory-mapped when first read, a bounded number of entries at a time
(OPEN_ENTRIES): each map holds a file descriptor, and a run may read thousands of files.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from finetune.data.errors import first_line
from finetune.data.fingerprint import FINGERPRINT_DTYPE

CACHE_FORMAT = 3
SPAN_DTYPE = np.dtype([("begin", "<i4"), ("end", "<i4"), ("weight", "<f4")])
# Entries whose arrays are mapped at once: 4 descriptors each, well under the usual limit of 1024 open files.
OPEN_ENTRIES = 64


@dataclass(frozen=True)
class Fault:
    """A bad line (errors.jsonl) or a usable line's warning (warnings.jsonl) of a cached file."""

    line: int
    kind: str
    message: str
    fixable: bool = False


class TokenizedFile:
    """The cached tokens of one .jsonl file: good samples in file order, plus the faults of the bad lines."""

    def __init__(self, source: Path, entry: Path):
        self.source = source
        self.entry = entry
        self.meta = json.loads((entry / "meta.json").read_text())
        self.lengths = np.diff(self.sample_starts)

    # Memory-mapped: every rank shares the same pages, and opening costs nothing however big the file.
    @property
    def tokens(self) -> np.ndarray:
        """uint32, the tokens of all good samples, one after the other."""
        return mapped_arrays(self.entry)[0]

    @property
    def sample_starts(self) -> np.ndarray:
        """int64 [n+1]: sample i is tokens[starts[i]:starts[i+1]]."""
        return mapped_arrays(self.entry)[1]

    @property
    def span_starts(self) -> np.ndarray:
        """int64 [n+1]: sample i's trained spans are spans[span_starts[i]:span_starts[i+1]]."""
        return mapped_arrays(self.entry)[2]

    @property
    def spans(self) -> np.ndarray:
        """(begin, end, weight) records: tokens[begin:end] of their sample have this loss weight."""
        return mapped_arrays(self.entry)[3]

    @functools.cached_property
    def fingerprints(self) -> np.ndarray:
        """Read whole when repeats are looked for (a few bytes a sample), so no descriptor stays open."""
        return np.load(self.entry / "fingerprints.npy", allow_pickle=False)

    def __len__(self) -> int:
        return len(self.lengths)

    def faults(self) -> list[Fault]:
        """The bad lines, left out of the samples."""
        return read_faults(self.entry / "errors.jsonl")

    def warnings(self) -> list[Fault]:
        """The warnings of usable lines."""
        return read_faults(self.entry / "warnings.jsonl")


@functools.lru_cache(maxsize=OPEN_ENTRIES)
def mapped_arrays(entry: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Map an entry's tokens, sample_starts, span_starts and spans.

    An entry dropped from this cache closes its maps (and descriptors) once no array of it is in use. np.asarray
    drops the np.memmap subclass, whose slicing is several times slower.
    """
    tokens_file = entry / "tokens.bin"
    tokens = (
        np.asarray(np.memmap(tokens_file, dtype=np.uint32, mode="r"))
        if tokens_file.stat().st_size
        else np.zeros(0, np.uint32)
    )
    arrays = (np.asarray(np.load(entry / name, mmap_mode="r")) for name in ARRAY_FILES)
    return (tokens, *arrays)


ARRAY_FILES = ("sample_starts.npy", "span_starts.npy", "spans.npy")
META_COUNTS = ("n_lines", "n_samples", "n_tokens", "n_trained_tokens", "n_left_out")


def read_faults(path: Path) -> list[Fault]:
    """The records of an errors.jsonl or warnings.jsonl file."""
    with open(path, encoding="utf-8") as f:
        return [Fault(**json.loads(line)) for line in f]


def entry_fault(entry: Path, n_words: int) -> str | None:
    """Say what is wrong with a cache entry, in words; None when it is whole.

    Checks meta.json's counts, the arrays' types, sizes and offsets, every token id below `n_words`, and the fault
    records. Arrays are read without pickle; a missing or unreadable file is a fault, not an error.
    """
    try:
        meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
        if not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT:
            return "meta.json is not this format's"
        if not all(type(meta.get(key)) is int and meta[key] >= 0 for key in META_COUNTS):
            return "meta.json's counts are not counts"
        fingerprints = np.load(entry / "fingerprints.npy", mmap_mode="r", allow_pickle=False)
        if fingerprints.dtype != FINGERPRINT_DTYPE or fingerprints.shape != (meta["n_samples"],):
            return "fingerprints.npy does not hold one row per sample"
        n_samples, n_tokens = meta["n_samples"], meta["n_tokens"]
        if (entry / "tokens.bin").stat().st_size != 4 * n_tokens:
            return f"tokens.bin does not hold the {n_tokens:,} tokens meta.json counts"
        starts, span_starts, spans = (np.load(entry / name, mmap_mode="r", allow_pickle=False) for name in ARRAY_FILES)
        if not (starts.dtype == span_starts.dtype == np.int64 and spans.dtype == SPAN_DTYPE):
            return "an array of another type"
        if starts.shape != (n_samples + 1,) or span_starts.shape != (n_samples + 1,) or spans.ndim != 1:
            return "arrays of other lengths than meta.json counts"
        lengths, n_spans = np.diff(starts), np.diff(span_starts)
        if starts[0] != 0 or starts[-1] != n_tokens or np.any(lengths < 1):
            return "sample_starts.npy does not cut tokens.bin into samples"
        if span_starts[0] != 0 or span_starts[-1] != len(spans) or np.any(n_spans < 0):
            return "span_starts.npy does not cut spans.npy into samples"
        span_lengths = np.repeat(lengths, n_spans)
        if np.any((spans["begin"] < 0) | (spans["begin"] > spans["end"]) | (spans["end"] > span_lengths)):
            return "spans.npy holds spans outside their samples"
        if not np.all((spans["weight"] >= 0) & (spans["weight"] <= 1)):
            return "spans.npy holds weights outside [0, 1]"
        if n_tokens and int(np.memmap(entry / "tokens.bin", dtype=np.uint32, mode="r").max()) >= n_words:
            return f"tokens.bin holds ids beyond the tokenizer's {n_words:,}"
        for name, key in (("errors.jsonl", "errors_by_kind"), ("warnings.jsonl", "warnings_by_kind")):
            counts = meta.get(key)
            if not isinstance(counts, dict) or len(read_faults(entry / name)) != sum(counts.values()):
                return f"{name} does not hold the records meta.json counts"
    except FileNotFoundError as error:
        return f"{Path(error.filename).name} is missing"
    except (OSError, ValueError, TypeError, KeyError, EOFError) as error:  # ValueError: a pickle refused, not JSON
        return first_line(error)
    return None
