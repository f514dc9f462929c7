"""Tokenize each .jsonl file once, into memory-mapped arrays that later runs and every rank reuse.

An entry lives in `<cache_dir>/<key>/`, where the key hashes the file's bytes, the tokenizer file's bytes,
train_on, the mistral-common version and this format's version: edit any of them and the entry is built
anew. Building happens under a file lock, into a folder that is renamed into place when complete, so
ranks that start together (torchrun) tokenize each file once and never read half a cache.
The entry's format is finetune/data/cache_entry.py's, its build finetune/data/cache_build.py's; a damaged entry is
rebuilt, and the run says so.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import re
from collections.abc import Iterator
from pathlib import Path

import mistral_common

from finetune.atomic_files import atomic_write_text
from finetune.data.cache_build import build_entries
from finetune.data.cache_entry import CACHE_FORMAT, TokenizedFile, entry_fault


def open_tokenized_files(
    paths: list[Path], tokenizer, train_on: str, cache_dir: str | Path, num_workers: int = 2
) -> list[TokenizedFile]:
    """Return the cache entry of each file, tokenizing those not cached yet, and again those whose entry is damaged.

    Args:
        paths: the .jsonl files, in the order their entries are returned.
        tokenizer: mistral-common's tokenizer (finetune/data/model_tokenizer.py's `load_tokenizer`).
        train_on: "all" or "last": which assistant messages are trained on (data.train_on).
        num_workers: tokenizer processes asked for; `worker_processes` keeps those that pay.

    Raises:
        OSError: a full disk while caching, naming the cache folder.
    """
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
        to_build = {path: entry for path, entry in entries.items() if entry_fault(entry, n_words) is not None}
        if to_build:  # a run that finds its files cached builds no encoder
            build_entries(to_build, tokenizer, train_on, num_workers, cache_dir, tokenizer_digest)
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
