"""Lines of a JSON Lines file, read as bytes so that every fault keeps its line number.

Files are read in byte ranges that start at line starts, so several processes can share one big file
and none of them ever holds more than a line of it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from finetune.data.errors import SampleFault

BOM = b"\xef\xbb\xbf"


def line_aligned_ranges(path: str | Path, chunk_bytes: int) -> list[tuple[int, int]]:
    """Split a file into byte ranges of about chunk_bytes, each starting at the start of a line."""
    size = os.path.getsize(path)
    starts = [0]
    with open(path, "rb") as f:
        for nominal in range(chunk_bytes, size, chunk_bytes):
            if nominal <= starts[-1]:
                continue
            f.seek(nominal - 1)
            f.readline()  # to the end of the line that holds byte nominal - 1
            if f.tell() < size:
                starts.append(f.tell())
    return list(zip(starts, starts[1:] + [size]))


def read_lines(path: str | Path, start: int = 0, end: int | None = None) -> Iterator[bytes]:
    """The raw lines (with their newline) of the byte range [start, end); start must begin a line."""
    with open(path, "rb") as f:
        f.seek(start)
        position = start
        for line in f:
            if end is not None and position >= end:
                return
            position += len(line)
            yield line


def parse_line(raw: bytes) -> Any:
    """The JSON value of one line; SampleFault if the line is not one clean UTF-8 JSON value."""
    line = raw.rstrip(b"\r\n")
    if line.startswith(BOM):
        raise SampleFault(
            "bom",
            "line starts with a UTF-8 byte-order mark (BOM); save the file as UTF-8 without "
            "BOM (`tailor validate --fix` removes it)",
            fixable=True,
        )
    if not line.strip():
        raise SampleFault("blank_line", "blank line (`tailor validate --fix` removes it)", fixable=True)
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SampleFault(
            "not_utf8", f"not valid UTF-8: byte 0x{line[e.start]:02x} at column {e.start + 1}; save the file as UTF-8"
        ) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise SampleFault("invalid_json", f"invalid JSON: {e.msg} at column {e.colno}") from None
