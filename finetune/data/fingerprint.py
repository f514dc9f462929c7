"""What makes two samples the same: a 64-bit hash of a checked sample's canonical form, and of its conversation.

The canonical form is what the model reads, written one way: the text of a pretrain sample; the messages of a chat
(role, content, tool calls' names and arguments, a tool result's call and name) and its tools. In it, whitespace
(space, tab, newline, carriage return, vertical tab, form feed) is left out of every string, so samples that differ
only in their spacing are one; tool-call arguments and tools are read as JSON and written back with sorted keys;
tool-call ids are replaced by their order in the sample (ids are labels, often generated anew for each copy); loss
weights and keys that are not read are left out. A sample's `conversation` hash is that of the same form without
its system messages, so the same chat under another system prompt has the same conversation.

Whitespace is left out rather than its runs collapsed: one pass of C over the bytes instead of a Python string per
word, for the cost of also taking 'ab' and 'a b' as the same text. The cache stores both hashes for every sample it
keeps (finetune/data/cache_entry.py), so finding repeats (finetune/data/duplicates.py) never reads a file again.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np

# One row per sample the cache keeps: its line in the file and its two hashes.
FINGERPRINT_DTYPE = np.dtype([("line", "<i8"), ("sample", "<u8"), ("conversation", "<u8")])
WHITESPACE = b" \t\n\r\x0b\x0c"  # what bytes.split() splits on


def sample_fingerprint(sample: dict) -> tuple[int, int]:
    """(sample, conversation): the hashes of a checked sample's canonical form, with and without system messages."""
    if "text" in sample:
        digest = _value(_hashed([b"text", _without_whitespace(sample["text"])]))
        return digest, digest
    call_order: dict[str, int] = {}
    messages = [_canonical_message(m, call_order) for m in sample["messages"]]
    # the conversation first; the sample is the conversation and then each system message with its place
    conversation = _hashed([part for m in messages if m[0] != b"system" for part in m])
    _update(conversation, [_canonical_json(sample.get("tools") or [])])
    whole = conversation.copy()
    for place, message in enumerate(messages):
        if message[0] == b"system":
            _update(whole, [str(place).encode(), *message])
    return _value(whole), _value(conversation)


def _canonical_message(message: dict, call_order: dict[str, int]) -> list[bytes]:
    """The parts of one message: its role first, then a fixed number of parts for that role, so that the parts of
    a sample, each prefixed by its length, say one sample only."""
    role = message["role"]
    parts = [role.encode(), _without_whitespace(message.get("content") or "")]
    if role == "assistant":
        calls = message.get("tool_calls") or []
        parts.append(str(len(calls)).encode())
        for call in calls:
            parts += [
                str(call_order.setdefault(call["id"], len(call_order))).encode(),
                _without_whitespace(call["function"]["name"]),
                _canonical_json(json.loads(call["function"]["arguments"])),
            ]
    elif role == "tool":  # a checked tool message answers a call of the sample; its name is not checked
        parts += [str(call_order[message["tool_call_id"]]).encode(), _canonical_json(message.get("name"))]
    return parts


def _canonical_json(value: Any) -> bytes:
    text = json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return _without_whitespace(text)


def _without_whitespace(text: str) -> bytes:
    return text.encode().translate(None, WHITESPACE)


def _hashed(parts: list[bytes]):
    digest = hashlib.blake2b(digest_size=8)
    _update(digest, parts)
    return digest


def _update(digest, parts: list[bytes]) -> None:
    """Each part with its length before it: parts that differ where they meet never give the same bytes."""
    for part in parts:
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)


def _value(digest) -> int:
    return int.from_bytes(digest.digest(), "little")
