"""Safe repairs for `tailor validate --fix`: changes that keep what a sample means.

- OpenAI's legacy function calling (`functions`, `function_call`, role `function`) becomes tools,
  tool_calls and tool messages;
- tool calls without a valid id get a generated 9-character id, and the tool messages that answer them
  follow (tool messages without tool_call_id are matched to the unanswered calls in order);
- tool-call arguments given as a JSON object become the JSON string the format asks for.
Ids are derived from the line's text, so running --fix twice writes the same file.
"""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

from finetune.data.schema import TOOL_CALL_ID

_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def repair_sample(sample: Any, salt: str) -> tuple[Any, list[str]]:
    """Repair a sample without changing what it means.

    Args:
        salt: what the generated ids derive from (the line's text, so that --fix twice writes the same file).

    Returns:
        The repaired copy and a list of what was changed (empty: nothing to repair).
    """
    if not isinstance(sample, dict) or not isinstance(sample.get("messages"), list):
        return sample, []
    sample = copy.deepcopy(sample)
    ids = _IdMaker(salt)
    done = _convert_legacy_functions(sample, ids)
    done += _repair_tool_calls(sample, ids)
    return sample, done


class _IdMaker:
    def __init__(self, salt: str):
        self.salt, self.count = salt, 0

    def __call__(self) -> str:
        self.count += 1
        digest = hashlib.sha256(f"{self.salt}#{self.count}".encode()).digest()
        return "".join(_ALPHABET[b % len(_ALPHABET)] for b in digest[:9])


def _convert_legacy_functions(sample: dict, new_id: _IdMaker) -> list[str]:
    done = []
    if isinstance(sample.get("functions"), list) and "tools" not in sample:
        sample["tools"] = [{"type": "function", "function": f} for f in sample.pop("functions")]
        done.append('"functions" -> "tools"')
    last_call_id = None
    for m in sample["messages"]:
        if not isinstance(m, dict):
            continue
        if isinstance(m.get("function_call"), dict):
            last_call_id = new_id()
            m["tool_calls"] = [{"id": last_call_id, "type": "function", "function": m.pop("function_call")}]
            if not m.get("content"):
                m["content"] = None
            done.append('"function_call" -> "tool_calls"')
        elif m.get("role") == "function" and last_call_id is not None:
            m["role"] = "tool"
            m["tool_call_id"] = last_call_id
            m.pop("name", None)
            done.append("role 'function' -> 'tool'")
    return done


def _repair_tool_calls(sample: dict, new_id: _IdMaker) -> list[str]:
    done = []
    renamed: dict[str, str] = {}
    unanswered: list[str] = []
    for m in sample["messages"]:
        if not isinstance(m, dict):
            continue
        if m.get("role") == "assistant" and isinstance(m.get("tool_calls"), list):
            renamed, unanswered = {}, []
            for call in m["tool_calls"]:
                if not isinstance(call, dict):
                    continue
                old = call.get("id")
                if not isinstance(old, str) or not TOOL_CALL_ID.match(old):
                    call["id"] = new_id()
                    if isinstance(old, str):
                        renamed[old] = call["id"]
                    done.append(f"tool call id {old!r} -> {call['id']!r}")
                function = call.get("function")
                if isinstance(function, dict) and isinstance(function.get("arguments"), dict):
                    function["arguments"] = json.dumps(function["arguments"], ensure_ascii=False)
                    done.append("tool call arguments object -> JSON string")
                unanswered.append(call["id"])
        elif m.get("role") == "tool":
            call_id = m.get("tool_call_id")
            if call_id in renamed:
                m["tool_call_id"] = renamed[call_id]
            elif call_id is None and unanswered:
                m["tool_call_id"] = unanswered[0]
                done.append(f"tool message -> tool_call_id {unanswered[0]!r}")
            if m.get("tool_call_id") in unanswered:
                unanswered.remove(m["tool_call_id"])
    return done
