"""Data sources: the .jsonl files behind each `{path, weight}`, as one store of documents per source."""

from __future__ import annotations

import bisect
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from finetune.data.cache import Fault, TokenizedFile, open_tokenized_files
from finetune.data.config import DataSource
from finetune.data.errors import DataError

if TYPE_CHECKING:  # packing imports torch, which reading sources (`tailor validate`) never needs
    from finetune.data.packing import Piece


def source_files(source: DataSource) -> list[Path]:
    """The .jsonl files of a source: the file itself, or those under the folder (recursively, sorted)."""
    path = Path(source.path).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.jsonl") if p.is_file())
        if not files:
            raise DataError(f"{path}: folder has no .jsonl files")
        return files
    raise DataError(f"{path}: no such file or folder")


class TokenizedSource:
    """The good samples of a source's files, numbered 0..n-1 in file order: a DocumentStore for packing."""

    def __init__(self, name: str, weight: float, files: list[TokenizedFile]):
        self.name = name
        self.weight = weight
        self.files = files
        self.first_doc = np.cumsum([0] + [len(f) for f in files]).tolist()  # a list: bisect beats numpy here
        self.lengths = np.concatenate([f.lengths for f in files]) if files else np.zeros(0, np.int64)

    def __len__(self) -> int:
        return len(self.lengths)

    def faults(self) -> list[tuple[TokenizedFile, Fault]]:
        return [(f, fault) for f in self.files for fault in f.faults()]

    def fault_counts(self) -> Counter:
        return Counter({kind: n for f in self.files for kind, n in f.meta["errors_by_kind"].items()})

    def _locate(self, doc: int) -> tuple[TokenizedFile, int]:
        k = bisect.bisect_right(self.first_doc, doc) - 1
        return self.files[k], doc - self.first_doc[k]

    def predictions(self, docs: int | np.ndarray) -> int | np.ndarray:
        return self.lengths[docs] - 1

    def is_trained(self, doc: int, begin: int, end: int) -> bool:
        file, i = self._locate(doc)
        spans = file.spans[file.span_starts[i] : file.span_starts[i + 1]]
        # target j is token j + 1: targets [begin, end) are tokens [begin + 1, end + 1)
        return bool(np.any((spans["begin"] < end + 1) & (spans["end"] > begin + 1) & (spans["weight"] > 0)))

    def write(self, piece: Piece, tokens: np.ndarray, targets: np.ndarray, weights: np.ndarray) -> None:
        file, i = self._locate(piece.doc)
        start = int(file.sample_starts[i])
        window = file.tokens[start + piece.begin : start + piece.end + 1]
        tokens[:] = window[:-1]
        targets[:] = window[1:]
        for begin, end, weight in file.spans[file.span_starts[i] : file.span_starts[i + 1]].tolist():
            # token k of the document is target k - 1; clip the span to this piece's targets
            lo, hi = max(begin - 1, piece.begin), min(end - 1, piece.end)
            if lo < hi:
                weights[lo - piece.begin : hi - piece.begin] = weight


def open_sources(
    sources: list[DataSource], tokenizer, train_on: str, cache_dir: str | Path, num_workers: int
) -> list[TokenizedSource]:
    """Tokenize (or find in the cache) every file of every source."""
    files_per_source = [source_files(s) for s in sources]
    all_files = list(dict.fromkeys(f for files in files_per_source for f in files))
    opened = dict(zip(all_files, open_tokenized_files(all_files, tokenizer, train_on, cache_dir, num_workers)))
    return [
        TokenizedSource(s.path, s.weight, [opened[f] for f in files]) for s, files in zip(sources, files_per_source)
    ]


def check_bad_samples(sources: list[TokenizedSource], on_bad_sample: str) -> Counter:
    """With on_bad_sample "error", raise DataError naming the first bad line; else count them by kind."""
    counts = sum((s.fault_counts() for s in sources), Counter())
    if on_bad_sample == "error" and counts:
        for source in sources:
            for file, fault in source.faults():
                more = sum(counts.values()) - 1
                also = f" (and {more} more bad lines)" if more else ""
                raise DataError(
                    f"{file.source}:{fault.line}: {fault.message}{also}; run `tailor validate` to list "
                    "them all, or set data.on_bad_sample: skip"
                )
    return counts
