"""Building a cache entry: a .jsonl file tokenized, under a file lock, into a folder renamed into place when complete,
so ranks that start together (torchrun) tokenize each file once and never read half an entry.

A file worth splitting is cut at line starts into parts that the worker processes share (several parts each, so
one slow part cannot leave a worker idle for long); a small one is tokenized in-process, where starting workers
would cost more than they save, and so is every file where worker processes cannot pay (worker_processes: fewer
than 2 usable cores, or than 4 with the SentencePiece memo, whose batched calls use every core already).
Lines are tokenized in batches, whose texts the text encoder sees first (finetune/data/tokenize.py's
tokenize_lines). SentencePiece tokenizers encode text word by word through a memo
(finetune/data/text_encoders.py), whose file (finetune/data/word_memo_file.py) a build starts from and adds to.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import gc
import hashlib
import json
import math
import multiprocessing
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path

import numpy as np
import sentencepiece
from tqdm import tqdm

from finetune.atomic_files import atomic_folder, clear_leftovers
from finetune.data.cache_entry import CACHE_FORMAT, SPAN_DTYPE, entry_fault, mapped_arrays
from finetune.data.collector import cycle_collector_paused
from finetune.data.errors import LEFT_OUT, SampleFault
from finetune.data.fingerprint import FINGERPRINT_DTYPE
from finetune.data.jsonl import line_aligned_ranges, read_lines
from finetune.data.text_encoders import PACKED, WordMemoSentencePiece, usable_cores
from finetune.data.tokenize import set_encoder_threads, tokenize_lines, word_memo
from finetune.data.word_memo_file import (
    MEMO_PREFIX,
    WORD_MEMO_FORMAT,
    load_word_memo,
    read_words,
    save_word_memo,
    write_words,
)

PART_BYTES = 8 << 20  # the most of a file one worker task takes
PARTS_PER_WORKER = 4
# Smaller files are tokenized in-process: starting and stopping workers would cost more than they save.
MIN_SPLIT_BYTES = 2 << 20
# Lines tokenized together: enough text per batched encoder call to keep every core busy, little memory.
BATCH_LINES = 256
BATCH_BYTES = 4 << 20
# Tokenizing runs with Python's cyclic garbage collector paused (finetune/data/collector.py says why); what a
# library's error may still leave is collected once per this many bytes read, so memory stays bounded.
COLLECT_BYTES = 64 << 20


def build_entries(
    entries: dict[Path, Path], tokenizer, train_on: str, num_workers: int, cache_dir: Path, tokenizer_digest: str
) -> None:
    """Build the entry of each file, sharing the work with other ranks that build the same entries.

    Args:
        entries: each .jsonl file -> its entry folder.
        num_workers: tokenizer processes asked for (`worker_processes` keeps those that pay).
        tokenizer_digest: the tokenizer file's sha256; with SentencePiece, it names the word memo file the build
            starts from and adds its new words to.
    """
    n_words = tokenizer.instruct_tokenizer.tokenizer.n_words
    memo = word_memo(tokenizer)
    # per tokenizer file and SentencePiece version: the ids are what that pair makes of each word
    memo_key = f"{WORD_MEMO_FORMAT}|{tokenizer_digest}|{sentencepiece.__version__}"
    memo_file = cache_dir / "word_memo" / f"{MEMO_PREFIX}{hashlib.sha256(memo_key.encode()).hexdigest()[:32]}.npz"
    if memo is not None:
        in_file = load_word_memo(memo_file, memo, n_words)
    with _WorkerPool(tokenizer, train_on, num_workers) as pool:
        # First build what no other process is building, then wait for the rest: ranks share the work.
        built: set[Path] = set()
        for blocking in (False, True):
            for path, entry in entries.items():
                if path not in built and _build_locked(path, entry, pool, blocking, n_words):
                    built.add(path)
    if memo is not None and len(memo.words()) > in_file:  # it learned words
        save_word_memo(memo_file, memo)


def worker_processes(num_workers: int, cores: int, threaded: bool) -> int:
    """How many of the `num_workers` processes asked for can pay (0: tokenize in this process).

    No more than the `cores` this process may use, or half of them when the encoder is `threaded` (the SentencePiece
    memo: each process encodes a batch's new words on every core), and none unless two or more, as a worker alone
    only adds its start.
    """
    workers = min(num_workers, cores // (2 if threaded else 1))
    return workers if workers >= 2 else 0


def part_ranges(path: Path, num_workers: int) -> list[tuple[int, int]]:
    """The byte ranges of a file's worker tasks, each starting at a line.

    The whole file when it is small or there are no workers, else at least PARTS_PER_WORKER parts per worker of at
    most PART_BYTES.
    """
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
            mapped_arrays.cache_clear()  # no map of the damaged files is read again
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        clear_leftovers(entry)  # of a build killed halfway
        with atomic_folder(entry) as staging:
            _build(path, staging, pool)
        return True


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
        """The worker processes to use (`worker_processes`), decided when a file is first built.

        Decided then because a run that finds its files cached builds no encoder.
        """
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
        """Tokenize each (path, start, end, prefix) range into part files; on a terminal, a bar over the file's bytes.

        Returns:
            The number of lines in each range.
        """
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
