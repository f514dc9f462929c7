"""The word memo's file: the words SentencePiece encoded in earlier builds and their ids, kept per tokenizer file in
`<cache_dir>/word_memo/` so that a build starts with them rather than with none. Flat numpy arrays (no pickle),
checked when read (a memo that is not one is rebuilt, and the run says so); writing one removes the files of an older
layout, which no build reads (the run says so).
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import BinaryIO

import numpy as np

from finetune.atomic_files import atomic_write
from finetune.data.text_encoders import WordMemoSentencePiece

WORD_MEMO_FORMAT = 2  # write_words' layout: a file of another layout is not even looked at
MEMO_PREFIX = f"v{WORD_MEMO_FORMAT}-"  # memo file names start with their layout (from layout 2 on; before, none did)


def load_word_memo(path: Path, memo: WordMemoSentencePiece, n_words: int) -> int:
    """Teach `memo` the words -> ids saved by earlier builds, if the file is one (checked: ids in the vocabulary).

    Returns:
        How many words the file holds (0 when there is none, or none usable).
    """
    if not path.exists():
        return 0
    words = read_words(path, n_words)
    if words is None:
        print(f"{path}: not a word memo this tokenizer wrote; it is rebuilt", flush=True)
        return 0
    memo.remember(words)
    return len(words)


def save_word_memo(path: Path, memo: WordMemoSentencePiece) -> None:
    """Write the memo's words to `path`, and remove the memo files of older layouts beside it."""
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
    """Write words and their packed ids as four flat arrays in one .npz (no pickle).

    Made by C loops (join, map, fromiter): numpy writes and reads them many times faster than JSON would a dict.
    `text` is the words' UTF-8, one after the other; `text_ends` where each word ends in it, in code points (what
    slicing the decoded text takes); `ids` the words' ids one after the other (int32: the packed uint32 bytes of ids
    below 2**31) and `id_ends` where each word's end.
    """
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
