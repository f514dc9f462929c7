"""Lines of a JSON Lines file, read as bytes so that every fault keeps its line number.

Files are read in byte ranges that start at line starts, so several processes can share one big file
and none of them ever holds more than a line of it.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from finetune.data.errors import SampleFault, SampleWarning

BOM = b"\xef\xbb\xbf"
# A UTF-16 surrogate written as a JSON escape: the only way one gets into a line, since UTF-8 cannot encode it.
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
# Deeper values are refused: no sample needs them, and every reader that recurses (JSON, pydantic, our checks)
# then stays far from Python's recursion limit, whatever the stack depth it is called at.
MAX_NESTING = 100


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


def parse_line(raw: bytes, warnings: list[SampleWarning] | None = None) -> Any:
    """Parse one line's JSON value.

    Args:
        raw: the line's bytes, with or without its newline.
        warnings: where a key repeated in one object (JSON keeps the last) and NaN or Infinity (which the JSON
            standard does not have) are appended.

    Raises:
        SampleFault: the line is not one clean UTF-8 JSON value of text a tokenizer can read.
    """
    line = raw.rstrip(b"\r\n")
    if line.startswith(BOM):
        raise SampleFault(
            "bom",
            "line starts with a UTF-8 byte-order mark (BOM); save the file as UTF-8 without "
            "BOM (`tailor validate --fix` removes it)",
            fixable=True,
        )
    if not line.strip():
        raise SampleFault("blank_line", "blank line (`tailor validate --fix` removes it)")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SampleFault(
            "not_utf8", f"not valid UTF-8: byte 0x{line[e.start]:02x} at column {e.start + 1}; save the file as UTF-8"
        ) from None
    repeated: list[str] = []
    constants: list[str] = []

    def non_standard(name: str) -> float:  # NaN, Infinity, -Infinity: Python's JSON reads them, the standard has none
        constants.append(name)
        return float(name)

    def unique_keys(pairs: list[tuple[str, Any]]) -> dict:
        value = dict(pairs)
        if len(value) != len(pairs):
            repeated.extend(k for i, (k, _) in enumerate(pairs) if any(k == other for other, _ in pairs[:i]))
        return value

    try:
        value = json.loads(text, object_pairs_hook=unique_keys, parse_constant=non_standard)
    except json.JSONDecodeError as e:
        if e.msg.startswith("Invalid control character"):  # a raw NUL, tab or line feed inside a string
            raise SampleFault(
                "invalid_json",
                f"invalid JSON: control character 0x{ord(text[e.pos]):02x} inside a string at column {e.colno} "
                "(JSON writes it as an escape, \\u00XX)",
            ) from None
        nuls = line.count(b"\x00")
        if 0 < nuls < len(line) <= 3 * nuls:  # every other byte NUL, but not all: UTF-16 (or UTF-32) text
            raise SampleFault(
                "not_utf8", "the line is UTF-16, not UTF-8 (NUL bytes between characters); save the file as UTF-8"
            ) from None
        if text.strip() in ("[", "{"):  # the first line of a pretty-printed JSON document
            raise SampleFault(
                "invalid_json",
                f"invalid JSON: a line holding only {text.strip()!r}; is the file one (pretty-printed) JSON document "
                "rather than JSON Lines, one sample per line?",
            ) from None
        raise SampleFault("invalid_json", f"invalid JSON: {e.msg} at column {e.colno}") from None
    except RecursionError:
        raise _too_deep() from None
    except ValueError:  # Python reads integers of at most sys.get_int_max_str_digits() digits
        raise SampleFault(
            "number_too_long", f"invalid JSON: a number has more than {sys.get_int_max_str_digits()} digits"
        ) from None
    if line.count(b"[") + line.count(b"{") > MAX_NESTING and nesting(value) > MAX_NESTING:
        raise _too_deep()
    if SURROGATE_ESCAPE.search(line):  # a pair (\ud83d\ude00) is one character; a lone half is not text
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as e:
            raise SampleFault(
                "lone_surrogate",
                f"holds \\u{ord(e.object[e.start]):04x}, half of a UTF-16 surrogate pair without its other half: "
                "not a character any tokenizer can read",
            ) from None
    if warnings is not None:
        warnings.extend(
            SampleWarning("duplicate_key", f"key {key!r} appears twice in one JSON object; the last one is used")
            for key in dict.fromkeys(repeated)
        )
        warnings.extend(
            SampleWarning("non_standard_json", f"{name} is not standard JSON; other tools may refuse this line")
            for name in dict.fromkeys(constants)
        )
    return value


def _too_deep() -> SampleFault:
    return SampleFault("too_deeply_nested", f"JSON nested more than {MAX_NESTING} levels deep")


def nesting(value: Any) -> int:
    """How many lists and objects deep a JSON value goes, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is not None:
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in children)
    return deepest
