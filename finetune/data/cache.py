"""Tokenize each .jsonl file once, into memory-mapped arrays that later runs and every rank reuse.

An entry lives in `<cache_dir>/<key>/`, where the key hashes the file's bytes, the tokenizer file's bytes,
train_on, the mistral-common version and this format's version: edit any of them and the entry is built
anew. Building happens under a file lock, into a folder that is renamed into place when complete, so
ranks that start together (torchrun) tokenize each file once and never read half a cache.

One entry:
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
the vocabulary, no pickle); a damaged one is rebuilt, and the run says so. Its arrays are memory-mapped when first
read, a bounded number of entries at a time (OPEN_ENTRIES): each map holds a file descriptor, and a run may read
thousands of files.

A file worth splitting is cut at line starts into parts that the worker processes share (several parts each, so
one slow part cannot leave a worker idle for long); a small one is tokenized in-process, where starting workers
would cost more than they save, and so is every file where worker processes cannot pay (worker_processes: fewer
than 2 usable cores, or than 4 with the SentencePiece memo, whose batched calls use every core already).
Lines are tokenized in batches, whose texts the text encoder sees first (finetune/data/tokenize.py's
tokenize_lines). SentencePiece tokenizers encode text word by word through a memo
(finetune/data/text_encoders.py), which `<cache_dir>/word_memo/` keeps between builds and runs, per tokenizer file:
a build starts with the words earlier builds encoded rather than with none. It is flat numpy arrays (no pickle),
checked when read (a memo that is not one is rebuilt, and the run says so), and written only by a build whose memo
learned words; writing one removes the files of an older layout, which no build reads (the run says so).
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import functools
import gc
import hashlib
import json
import math
import multiprocessing
import os
import re
import shutil
import signal
import threading
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import BinaryIO

import mistral_common
import numpy as np
import sentencepiece
from tqdm import tqdm

from finetune.atomic_files import atomic_folder, atomic_write, atomic_write_text, clear_leftovers
from finetune.data.collector import cycle_collector_paused
from finetune.data.errors import LEFT_OUT, SampleFault, first_line
from finetune.data.fingerprint import FINGERPRINT_DTYPE
from finetune.data.jsonl import line_aligned_ranges, read_lines
from finetune.data.text_encoders import PACKED, WordMemoSentencePiece, usable_cores
from finetune.data.tokenize import set_encoder_threads, tokenize_lines, word_memo

CACHE_FORMAT = 3
WORD_MEMO_FORMAT = 2  # write_words' layout: a file of another layout is not even looked at
MEMO_PREFIX = f"v{WORD_MEMO_FORMAT}-"  # memo file names start with their layout (from layout 2 on; before, none did)
PART_BYTES = 8 << 20  # the most of a file one worker task takes
PARTS_PER_WORKER = 4
# Smaller files are tokenized in-process. Measured here: a pool of 2 workers starts and stops in about 0.25 s, about
# what one process takes to tokenize 1.3 MB, so splitting pays from a few MB on.
MIN_SPLIT_BYTES = 2 << 20
# Lines tokenized together: enough text per batched encoder call to keep every core busy, little memory.
BATCH_LINES = 256
BATCH_BYTES = 4 << 20
SPAN_DTYPE = np.dtype([("begin", "<i4"), ("end", "<i4"), ("weight", "<f4")])
# Tokenizing runs with Python's cyclic garbage collector paused: left on, it walks the objects the build makes, again
# and again as they pile up (finetune/data/collector.py says how much that costs).
# A kept SampleFault drops the frames that would tie it to its batch (SampleFault.kept), so a build makes little cyclic
# garbage; what a library's error may still leave is collected once per this many bytes read, so memory stays
# bounded whatever the file.
COLLECT_BYTES = 64 << 20
# Entries whose arrays are mapped at once: 4 descriptors each, well under the usual limit of 1024 open files.
OPEN_ENTRIES = 64


@dataclass(frozen=True)
class Fault:
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
        return _mapped_arrays(self.entry)[0]

    @property
    def sample_starts(self) -> np.ndarray:
        return _mapped_arrays(self.entry)[1]

    @property
    def span_starts(self) -> np.ndarray:
        return _mapped_arrays(self.entry)[2]

    @property
    def spans(self) -> np.ndarray:
        return _mapped_arrays(self.entry)[3]

    @functools.cached_property
    def fingerprints(self) -> np.ndarray:
        """Read whole when repeats are looked for (a few bytes a sample), so no descriptor stays open."""
        return np.load(self.entry / "fingerprints.npy", allow_pickle=False)

    def __len__(self) -> int:
        return len(self.lengths)

    def faults(self) -> list[Fault]:
        return _read_faults(self.entry / "errors.jsonl")

    def warnings(self) -> list[Fault]:
        return _read_faults(self.entry / "warnings.jsonl")


@functools.lru_cache(maxsize=OPEN_ENTRIES)
def _mapped_arrays(entry: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """An entry's tokens, sample_starts, span_starts and spans, mapped; an entry dropped from this cache closes its
    maps (and descriptors) once no array of it is in use. np.asarray drops the np.memmap subclass, whose slicing is
    several times slower."""
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


def _read_faults(path: Path) -> list[Fault]:
    with open(path, encoding="utf-8") as f:
        return [Fault(**json.loads(line)) for line in f]


def entry_fault(entry: Path, n_words: int) -> str | None:
    """What is wrong with a cache entry, in words, or None when it is whole: meta.json's counts, the arrays' types,
    sizes and offsets, every token id below n_words, and the fault records. Arrays are read without pickle."""
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
            if not isinstance(counts, dict) or len(_read_faults(entry / name)) != sum(counts.values()):
                return f"{name} does not hold the records meta.json counts"
    except FileNotFoundError as error:
        return f"{Path(error.filename).name} is missing"
    except (OSError, ValueError, TypeError, KeyError, EOFError) as error:  # ValueError: a pickle refused, not JSON
        return first_line(error)
    return None


def open_tokenized_files(
    paths: list[Path], tokenizer, train_on: str, cache_dir: str | Path, num_workers: int = 2
) -> list[TokenizedFile]:
    """The cache entry of each file, tokenizing (in num_workers processes) those not cached yet, and again those whose
    entry is damaged."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    n_words = tokenizer.instruct_tokenizer.tokenizer.n_words
    with _naming_a_full_disk(cache_dir):
        tokenizer_digest = _digest_of_file(Path(tokenizer.instruct_tokenizer.tokenizer.file_path), cache_dir)
        entries = {}
        for path in paths:
            key = json.dumps(
                [CACHE_FORMAT, _digest_of_file(path, cache_dir), tokenizer_digest, train_on, mistral_common.__version__]
            )
            entries[path] = cache_dir / hashlib.sha256(key.encode()).hexdigest()[:32]
        to_build = [path for path, entry in entries.items() if entry_fault(entry, n_words) is not None]
        memo = word_memo(tokenizer) if to_build else None  # a run that finds its files cached builds no encoder
        # per tokenizer file and SentencePiece version: the ids are what that pair makes of each word
        memo_key = f"{WORD_MEMO_FORMAT}|{tokenizer_digest}|{sentencepiece.__version__}"
        memo_file = cache_dir / "word_memo" / f"{MEMO_PREFIX}{hashlib.sha256(memo_key.encode()).hexdigest()[:32]}.npz"
        if memo is not None:
            in_file = _load_word_memo(memo_file, memo, n_words)
        with _WorkerPool(tokenizer, train_on, num_workers) as pool:
            # First build what no other process is building, then wait for the rest: ranks share the work.
            built: set[Path] = set()
            for blocking in (False, True):
                for path in to_build:
                    if path not in built and _build_locked(path, entries[path], pool, blocking, n_words):
                        built.add(path)
        if memo is not None and len(memo.words()) > in_file:  # it learned words
            _save_word_memo(memo_file, memo)
    return [TokenizedFile(path, entry) for path, entry in entries.items()]


@contextlib.contextmanager
def _naming_a_full_disk(cache_dir: Path) -> Iterator[None]:
    """A full disk while caching names the cache folder: a write's own error names no file."""
    try:
        yield
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT) or error.filename:
            raise
        raise OSError(
            error.errno, f"{error.strerror} (data.cache_dir, writing tokenized data)", str(cache_dir)
        ) from None


def _load_word_memo(path: Path, memo: WordMemoSentencePiece, n_words: int) -> int:
    """Words -> ids saved by earlier builds, if the file is one (checked: ids in the vocabulary); returns how many
    words the file holds (0 when there is none, or none usable)."""
    if not path.exists():
        return 0
    words = read_words(path, n_words)
    if words is None:
        print(f"{path}: not a word memo this tokenizer wrote; it is rebuilt", flush=True)
        return 0
    memo.remember(words)
    return len(words)


def _save_word_memo(path: Path, memo: WordMemoSentencePiece) -> None:
    path.parent.mkdir(exist_ok=True)
    with atomic_write(path) as f:
        write_words(f, memo.words())
    # Files of another layout are never read again (their names hold the layout); a file being written (a temporary,
    # .NAME.tmp-PID) does not end in .npz.
    stale = [p for p in path.parent.glob("*.npz") if not p.name.startswith(MEMO_PREFIX)]
    for old in stale:
        old.unlink(missing_ok=True)
    if stale:
        print(
            f"{path.parent}: removed {len(stale)} word memo file(s) of an older layout, which no build reads",
            flush=True,
        )


def write_words(path: Path | BinaryIO, words: dict[str, bytes]) -> None:
    """Words and their packed ids as four flat arrays in one .npz (no pickle), made by C loops (join, map, fromiter):
    numpy writes and reads them many times faster than JSON would a dict. `text` is the words' UTF-8, one after the
    other; `text_ends` where each word ends in it, in code points (what slicing the decoded text takes); `ids` the
    words' ids one after the other (int32: the packed uint32 bytes of ids below 2**31) and `id_ends` where each
    word's end."""
    packed = words.values()
    np.savez(
        path,
        text=np.frombuffer("".join(words).encode("utf-8"), np.uint8),
        text_ends=np.fromiter(map(len, words), np.int64, len(words)).cumsum(),
        ids=np.frombuffer(b"".join(packed), np.int32),
        id_ends=np.fromiter(map(len, packed), np.int64, len(packed)).cumsum() // 4,
    )


def read_words(path: Path, n_words: int) -> dict[str, bytes] | None:
    """What write_words wrote; None if the file is not that (damaged, or ids outside a vocabulary of n_words)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            raw, text_ends, ids, id_ends = f["text"], f["text_ends"], f["ids"], f["id_ends"]
        text = raw.tobytes().decode("utf-8") if raw.dtype == np.uint8 else None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # UnicodeDecodeError is a ValueError
        return None
    shapes_ok = all(a.ndim == 1 for a in (raw, text_ends, ids, id_ends)) and len(text_ends) == len(id_ends)
    types_ok = text is not None and ids.dtype == np.int32 and text_ends.dtype == id_ends.dtype == np.int64
    if not (shapes_ok and types_ok):
        return None
    if len(ids) and (ids.min() < 0 or ids.max() >= n_words):
        return None
    text_starts, id_starts = np.r_[0, text_ends[:-1]], np.r_[0, id_ends[:-1]]
    ends_ok = (not len(text_ends)) or (text_ends[-1] == len(text) and id_ends[-1] == len(ids))
    if not ends_ok or np.any(text_ends <= text_starts) or np.any(id_ends <= id_starts):
        return None
    packed = ids.tobytes()  # checked above: native int32 ids in [0, n_words), the bytes of PACKED uint32 ids
    keys = map(text.__getitem__, map(slice, text_starts.tolist(), text_ends.tolist()))
    return dict(zip(keys, map(packed.__getitem__, map(slice, (4 * id_starts).tolist(), (4 * id_ends).tolist()))))


def worker_processes(num_workers: int, cores: int, threaded: bool) -> int:
    """How many of the num_workers processes asked for can pay: no more than the cores this process may use, or half
    of them when the encoder is `threaded` (the SentencePiece memo: each process encodes a batch's new words on every
    core), and none unless two or more, as a worker alone only adds its start. Measured on 2 cores
    (benchmarks/RESULTS.md): 2 workers were slower than one process for SentencePiece v3, faster for Tekken."""
    workers = min(num_workers, cores // (2 if threaded else 1))
    return workers if workers >= 2 else 0


def part_ranges(path: Path, num_workers: int) -> list[tuple[int, int]]:
    """The byte ranges of a file's worker tasks, each starting at a line: the whole file when it is small or there
    are no workers, else at least PARTS_PER_WORKER parts per worker of at most PART_BYTES."""
    size = path.stat().st_size
    if num_workers == 0 or size < MIN_SPLIT_BYTES:
        return [(0, size)]
    parts = max(math.ceil(size / PART_BYTES), PARTS_PER_WORKER * num_workers)
    return line_aligned_ranges(path, math.ceil(size / parts))


def _build_locked(path: Path, entry: Path, pool: _WorkerPool, blocking: bool, n_words: int) -> bool:
    """Build the entry of `path` unless another process holds its lock (returns False then, when not `blocking`) or
    has built it while this one waited; a damaged entry is removed first, and the run says so."""
    with open(entry.with_suffix(".lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            return False
        fault = entry_fault(entry, n_words)
        if fault is None:  # built by another process while we waited
            return True
        if entry.exists() or entry.is_symlink():
            print(f"{entry}: damaged cache entry of {path} ({fault}); it is rebuilt", flush=True)
            _mapped_arrays.cache_clear()  # no map of the damaged files is read again
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        clear_leftovers(entry)  # of a build killed halfway
        with atomic_folder(entry) as staging:
            _build(path, staging, pool)
        return True


# ---------------------------------------------------------------------------------------------------
# Building


def _build(path: Path, out: Path, pool: _WorkerPool) -> None:
    ranges = part_ranges(path, pool.num_workers)
    tasks = [(path, start, end, str(out / f"part{k:05d}")) for k, (start, end) in enumerate(ranges)]
    print(
        f"tokenizing {path} ({path.stat().st_size / 2**20:,.1f} MiB) into the cache, {pool.describe(len(tasks))}",
        flush=True,
    )
    lines_per_part = pool.tokenize_ranges(tasks)

    counts_by_kind: dict[str, dict[str, int]] = {"errors": {}, "warnings": {}}
    with (
        open(out / "tokens.bin", "wb") as tokens,
        open(out / "errors.jsonl", "w", encoding="utf-8") as errors,
        open(out / "warnings.jsonl", "w", encoding="utf-8") as warnings,
    ):
        lengths, n_spans, spans, fingerprints = [], [], [], []
        first_line = 1
        for (_, _, _, prefix), n_lines in zip(tasks, lines_per_part):
            with open(f"{prefix}.tokens", "rb") as f:
                shutil.copyfileobj(f, tokens, 16 << 20)
            arrays = np.load(f"{prefix}.npz")
            lengths.append(arrays["lengths"])
            n_spans.append(arrays["n_spans"])
            spans.append(arrays["spans"])
            part_fingerprints = arrays["fingerprints"]
            part_fingerprints["line"] += first_line - 1
            fingerprints.append(part_fingerprints)
            for name, records in (("errors", errors), ("warnings", warnings)):
                counts = counts_by_kind[name]
                with open(f"{prefix}.{name}.jsonl", encoding="utf-8") as f:
                    for record in map(json.loads, f):
                        record["line"] += first_line - 1
                        counts[record["kind"]] = counts.get(record["kind"], 0) + 1
                        records.write(json.dumps(record) + "\n")
            if os.path.exists(f"{prefix}.words.npz"):  # what a worker's word memo learned, for the memo file
                pool.memo.remember(read_words(Path(f"{prefix}.words.npz"), np.iinfo(np.int32).max) or {})
                os.remove(f"{prefix}.words.npz")
            for suffix in (".tokens", ".npz", ".errors.jsonl", ".warnings.jsonl"):
                os.remove(prefix + suffix)
            first_line += n_lines

    lengths = np.concatenate(lengths)
    spans = np.concatenate(spans).astype(SPAN_DTYPE) if spans else np.zeros(0, SPAN_DTYPE)
    np.save(out / "sample_starts.npy", np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
    np.save(out / "span_starts.npy", np.concatenate([[0], np.cumsum(np.concatenate(n_spans))]).astype(np.int64))
    np.save(out / "spans.npy", spans)
    np.save(out / "fingerprints.npy", np.concatenate(fingerprints))
    trained = int(((spans["end"] - spans["begin"]) * (spans["weight"] > 0)).sum())
    meta = {
        "format": CACHE_FORMAT,
        "source": str(path),
        "n_lines": first_line - 1,
        "n_samples": len(lengths),
        "n_tokens": int(lengths.sum()),
        "n_trained_tokens": trained,
        "errors_by_kind": counts_by_kind["errors"],
        "warnings_by_kind": counts_by_kind["warnings"],
        "n_left_out": sum(n for kind, n in counts_by_kind["warnings"].items() if kind in LEFT_OUT),
        "built_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1))


def _tokenize_range(task: tuple[Path, int, int, str], tokenizer, train_on: str) -> int:
    """Tokenize the lines of one byte range into part files; return the number of lines read."""
    path, start, end, prefix = task
    lengths, n_spans, spans, fingerprints = [], [], [], []
    n_lines = 0
    with (
        open(f"{prefix}.tokens", "wb") as tokens_out,
        open(f"{prefix}.errors.jsonl", "w", encoding="utf-8") as errors,
        open(f"{prefix}.warnings.jsonl", "w", encoding="utf-8") as warnings,
        cycle_collector_paused(),  # see COLLECT_BYTES
    ):
        pending = array.array(PACKED)
        bytes_since_collect = 0
        for batch in _batches(path, start, end):
            batch_fingerprints: list = []
            results = tokenize_lines(batch, tokenizer, train_on, batch_fingerprints)
            for result, fingerprint in zip(results, batch_fingerprints):
                n_lines += 1
                if isinstance(result, SampleFault):
                    record = {
                        "line": n_lines, "kind": result.kind, "message": result.message, "fixable": result.fixable
                    }  # fmt: skip
                    errors.write(json.dumps(record) + "\n")
                    continue
                sample_tokens, sample_spans, sample_warnings = result
                for kind, message in sample_warnings:
                    warnings.write(json.dumps({"line": n_lines, "kind": kind, "message": message}) + "\n")
                if any(kind in LEFT_OUT for kind, _ in sample_warnings):
                    continue
                pending += sample_tokens  # both arrays of PACKED ids: one copy of their bytes
                lengths.append(len(sample_tokens))
                n_spans.append(len(sample_spans))
                spans += sample_spans
                fingerprints.append((n_lines, *fingerprint))
            if len(pending) > 1 << 20:
                tokens_out.write(pending)
                pending = array.array(PACKED)
            bytes_since_collect += sum(map(len, batch))
            if bytes_since_collect >= COLLECT_BYTES:
                gc.collect()
                bytes_since_collect = 0
        tokens_out.write(pending)
    np.savez(
        f"{prefix}.npz",
        lengths=np.asarray(lengths, np.int64),
        n_spans=np.asarray(n_spans, np.int64),
        spans=np.asarray(spans, SPAN_DTYPE),
        fingerprints=np.array(fingerprints, FINGERPRINT_DTYPE),
    )
    return n_lines


def _batches(path: Path, start: int, end: int) -> Iterator[list[bytes]]:
    """The lines of a byte range in batches of BATCH_LINES (or BATCH_BYTES, for long lines): the text encoder
    encodes each batch's texts in one call, on every core."""
    batch, size = [], 0
    for raw in read_lines(path, start, end):
        batch.append(raw)
        size += len(raw)
        if len(batch) == BATCH_LINES or size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


_WORKER_ARGS: tuple = ()  # (tokenizer, train_on) in a worker process


def _init_worker(tokenizer, train_on: str, threads: int) -> None:
    global _WORKER_ARGS
    _WORKER_ARGS = (tokenizer, train_on)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to answer (_ctrl_c_deferred)
    set_encoder_threads(tokenizer, threads)  # the workers share the cores


def _tokenize_range_in_worker(task: tuple[Path, int, int, str]) -> int:
    """_tokenize_range, and the words the worker's memo learned on the way, for the main process's memo file."""
    n_lines = _tokenize_range(task, *_WORKER_ARGS)
    memo = word_memo(_WORKER_ARGS[0])
    if memo is not None:
        write_words(Path(f"{task[3]}.words.npz"), memo.learned())
    return n_lines


@contextlib.contextmanager
def _ctrl_c_deferred() -> Iterator[None]:
    """Ctrl-C while worker processes start only noted, and answered (KeyboardInterrupt) once they have: a forked
    worker inherits this handler, which says nothing, until its initializer ignores SIGINT. Ctrl-C reaches the whole
    process group, and the main process alone answers it (it stops the workers) without a traceback from each."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set a handler
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler if previous is None else previous)
    if received:
        raise KeyboardInterrupt


class _WorkerPool:
    """Worker processes, started only when a file is big enough to need them."""

    def __init__(self, tokenizer, train_on: str, num_workers: int):
        self.args = (tokenizer, train_on)
        self.asked = num_workers
        self.pool = None

    @cached_property
    def num_workers(self) -> int:
        """The worker processes to use (worker_processes), decided when a file is first built: a run that finds its
        files cached builds no encoder."""
        return worker_processes(self.asked, usable_cores(), threaded=self.memo is not None)

    def describe(self, tasks: int) -> str:
        """Where a file's tasks run, and why when that is not in the processes asked for."""
        if self.num_workers and tasks > 1:
            cores = usable_cores()
            capped = f" ({self.asked} asked for, {cores} usable cores)" if self.asked != self.num_workers else ""
            return f"in {self.num_workers} worker processes{capped}"
        if not self.asked:
            return "in this process"
        if not self.num_workers:
            if self.memo is not None:
                return (
                    f"in this process ({usable_cores()} usable cores: with this tokenizer, worker processes pay from "
                    "4 cores on, and this process encodes on every core)"
                )
            return f"in this process ({usable_cores()} usable core: a worker process could only wait its turn)"
        return f"in this process (under {MIN_SPLIT_BYTES >> 20} MiB: starting workers would cost more than they save)"

    @property
    def memo(self) -> WordMemoSentencePiece | None:
        """This process's word memo: it gathers what the workers' memos learn."""
        return word_memo(self.args[0])

    def tokenize_ranges(self, tasks: list) -> list[int]:
        """The lines of each (path, start, end, prefix) range, tokenized; on a terminal (disable=None), a bar over
        the file's bytes."""
        if len(tasks) == 1 or self.num_workers == 0:
            results = (_tokenize_range(task, *self.args) for task in tasks)
        else:
            if self.pool is None:
                # fork: workers inherit the loaded tokenizer instead of loading it again (Tekken takes a second)
                method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
                context = multiprocessing.get_context(method)
                threads = max(1, usable_cores() // self.num_workers)
                with _ctrl_c_deferred():
                    self.pool = context.Pool(self.num_workers, initializer=_init_worker, initargs=(*self.args, threads))
            results = self.pool.imap(_tokenize_range_in_worker, tasks, chunksize=1)
        path, _, size, _ = tasks[-1]
        lines = []
        with tqdm(total=size, desc=f"tokenizing {path.name}", unit="B", unit_scale=True, disable=None) as bar:
            for (_, start, end, _), n in zip(tasks, results):
                lines.append(n)
                bar.update(end - start)
        return lines

    def __enter__(self) -> _WorkerPool:
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


def _digest_of_file(path: Path, cache_dir: Path) -> str:
    """sha256 of a file's bytes, remembered per (path, inode, size, mtime, ctime) so a big file is hashed once. The
    ctime is what no user tool sets: an edit in place that keeps the size and puts the mtime back still changes it
    (hashing at every launch would read all of the data again)."""
    stat = path.stat()
    stamp = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ctime_ns}|{stat.st_ino}"
    memo = cache_dir / "digests" / hashlib.sha256(stamp.encode()).hexdigest()[:32]
    remembered = memo.read_text(errors="replace") if memo.is_file() else ""
    if re.fullmatch("[0-9a-f]{64}", remembered):
        return remembered
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(16 << 20):
            digest.update(block)
    digest = digest.hexdigest()
    memo.parent.mkdir(exist_ok=True)
    atomic_write_text(memo, digest)
    return digest
