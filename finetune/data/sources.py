"""Data sources: the .jsonl files behind each `{path, weight}`, as one store of documents per source."""

from __future__ import annotations

import bisect
import stat
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from finetune.data.cache import open_tokenized_files
from finetune.data.cache_entry import Fault, TokenizedFile
from finetune.data.config import DataConfig, DataSource
from finetune.data.errors import DataError, DataFaults, TooManyBadLines

if TYPE_CHECKING:  # packing imports torch, which reading sources (`tailor validate`) never needs
    from finetune.data.packing import Piece


def source_files(source: DataSource) -> list[Path]:
    """The .jsonl files of a source: the file itself, or those under the folder (recursively, sorted).

    Raises:
        DataError: the path is neither a file nor a folder, the folder has no .jsonl file, or holds something else
            by a .jsonl name (a FIFO, a device, a broken link), which reading could block on for ever.
    """
    path = Path(source.path).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.jsonl") if not p.is_dir())
        for file in files:
            if not file.is_file():
                raise DataError(f"{file}: {what_it_is(file)}, not a file of data; move it out of {path}")
        if not files:
            raise DataError(f"{path}: folder has no .jsonl files")
        return files
    raise DataError(f"{path}: {what_it_is(path)}")


def what_it_is(path: Path) -> str:
    """What is at a path that is neither a regular file nor a folder, in words."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "a link to nothing" if path.is_symlink() else "no such file or folder"
    except OSError as error:
        return f"cannot be read ({error.strerror or error})"
    kinds = [
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISREG, "a file"),
        (stat.S_ISDIR, "a folder"),
    ]
    return next((name for is_kind, name in kinds if is_kind(mode)), "not a regular file")


def check_holds_none_of(source: DataSource, folders: dict[str, Path]) -> None:
    """Check that a folder source holds none of the folders tailor writes .jsonl files into.

    Else the next run reads them as data (run_dir: metrics.jsonl; data.cache_dir: errors.jsonl, warnings.jsonl).

    Args:
        folders: {config key: folder}, the key named in the error.

    Raises:
        DataError: the source's folder holds one of `folders`.
    """
    path = Path(source.path).expanduser()
    if not path.is_dir():
        return
    data = path.resolve()
    for key, folder in folders.items():
        written = Path(folder).expanduser().resolve()
        if written == data or data in written.parents:
            raise DataError(
                f"{path}: the folder holds {key} {folder}, whose .jsonl files tailor writes and would read back as "
                f"data; choose a {key} outside {path}"
            )


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
        """The bad lines of every file, with their file."""
        return [(f, fault) for f in self.files for fault in f.faults()]

    def fault_counts(self) -> Counter:
        """The bad lines, by kind."""
        return Counter({kind: n for f in self.files for kind, n in f.meta["errors_by_kind"].items()})

    def _locate(self, doc: int) -> tuple[TokenizedFile, int]:
        k = bisect.bisect_right(self.first_doc, doc) - 1
        return self.files[k], doc - self.first_doc[k]

    def predictions(self, docs: int | np.ndarray) -> int | np.ndarray:
        """Tokens - 1 of a document, or of each."""
        return self.lengths[docs] - 1

    def is_trained(self, doc: int, begin: int, end: int) -> bool:
        """Whether any of targets [begin, end) of document `doc` has a weight > 0."""
        file, i = self._locate(doc)
        spans = file.spans[file.span_starts[i] : file.span_starts[i + 1]]
        # target j is token j + 1: targets [begin, end) are tokens [begin + 1, end + 1)
        return bool(np.any((spans["begin"] < end + 1) & (spans["end"] > begin + 1) & (spans["weight"] > 0)))

    def write(self, piece: Piece, tokens: np.ndarray, targets: np.ndarray, weights: np.ndarray) -> None:
        """Write a piece's inputs, targets and loss weights into the given slices of a batch."""
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
    """Tokenize (or find in the cache) every file of every source.

    Raises:
        DataError: a source's path is not a file or a folder of .jsonl files.
    """
    files_per_source = [source_files(s) for s in sources]
    all_files = list(dict.fromkeys(f for files in files_per_source for f in files))
    opened = dict(zip(all_files, open_tokenized_files(all_files, tokenizer, train_on, cache_dir, num_workers)))
    return [
        TokenizedSource(s.path, s.weight, [opened[f] for f in files]) for s, files in zip(sources, files_per_source)
    ]


@dataclass
class RunData:
    """A run's data, opened once from the tokenized cache.

    What its report, its train loader and its eval and retain batches all read.
    """

    config: DataConfig
    train: list[TokenizedSource]
    eval: list[TokenizedSource]
    retain: list[TokenizedSource]


def open_run_data(cfg: DataConfig, tokenizer, *, cache_dir: str | Path, with_eval: bool = True) -> RunData:
    """Open data.train and, `with_eval`, data.eval and data.retain: each file tokenized, or found in the cache.

    Raises:
        DataError: a source's path is not a file or a folder of .jsonl files.
    """

    def opened(sources: list[DataSource]) -> list[TokenizedSource]:
        return open_sources(sources, tokenizer, cfg.train_on, cache_dir, cfg.num_workers)

    evaluated = (cfg.eval, cfg.retain) if with_eval else ([], [])
    return RunData(cfg, opened(cfg.train), *map(opened, evaluated))


def check_bad_samples(sources: list[TokenizedSource], on_bad_sample: str) -> Counter:
    """Count the sources' bad lines by kind.

    Raises:
        DataFaults: `on_bad_sample` is "error" and a line is bad, naming the first.
    """
    counts = sum((s.fault_counts() for s in sources), Counter())
    if on_bad_sample == "error" and counts:
        for source in sources:
            for file, fault in source.faults():
                more = sum(counts.values()) - 1
                also = f" (and {more} more bad lines)" if more else ""
                raise DataFaults(
                    f"{file.source}:{fault.line}: {fault.message}{also}; run `tailor validate` to list "
                    "them all, or set data.on_bad_sample: skip"
                )
    return counts


def bad_shares_above(sources: list[TokenizedSource], max_bad_fraction: float) -> list[str]:
    """A line for each source whose share of bad lines is above max_bad_fraction.

    data.on_bad_sample: skip leaves bad lines out, but a source that is mostly faults is likely not the data its user
    meant.
    """
    refused = []
    for source in sources:
        lines = sum(f.meta["n_lines"] for f in source.files)
        bad = sum(source.fault_counts().values())
        if lines and bad / lines > max_bad_fraction:
            refused.append(
                f"{source.name}: {bad:,} of {lines:,} lines are bad ({bad / lines:.2%}), above data.max_bad_fraction "
                f"{max_bad_fraction:g}"
            )
    return refused


def check_bad_shares(sources: list[TokenizedSource], max_bad_fraction: float) -> None:
    """Raise TooManyBadLines naming the first source whose share of bad lines is above max_bad_fraction."""
    if refused := bad_shares_above(sources, max_bad_fraction):
        raise TooManyBadLines(f"{refused[0]}; `tailor validate` lists the bad lines")
