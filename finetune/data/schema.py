"""The sample formats users write, checked before any token is made.

Pretrain `{"text": ...}`; instruct `{"messages": [...]}` with optional `"tools"`: the formats of
Mistral's fine-tuning API and of OpenAI's chat API. `check_sample` raises a SampleFault that says
what is wrong in words a user can act on; message numbers count from 1, as a person reads the file.
`sample_warnings` lists what a checked sample says that its author may not have meant (the sample is used).
"""

from __future__ import annotations

import difflib
import json
import re
from typing import Any

from finetune.data.errors import SampleFault, SampleWarning
from finetune.data.jsonl import MAX_NESTING, nesting

ROLES = ("system", "user", "assistant", "tool")
TOOL_CALL_ID = re.compile(r"^[a-zA-Z0-9]{9}$")  # what Mistral's tokenizers (v3 and later) accept
FUNCTION_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


def check_sample(sample: Any) -> None:
    """Check that `sample` (a parsed JSON line) is a usable pretrain or instruct sample.

    Raises:
        SampleFault: its first fault, in words a user can act on.
    """
    if not isinstance(sample, dict):
        raise SampleFault("not_an_object", f"expected a JSON object per line, got {_json_type(sample)}")
    has_text, has_messages = "text" in sample, "messages" in sample
    if has_text and has_messages:
        raise SampleFault("text_and_messages", 'sample has both "text" and "messages"; keep one of them')
    if has_text:
        if not isinstance(sample["text"], str):
            raise SampleFault("text_not_string", f'"text" must be a string, got {_json_type(sample["text"])}')
        if not sample["text"].strip():
            raise SampleFault("empty_text", '"text" is empty')
        return
    if not has_messages:
        keys = ", ".join(repr(k) for k in sample) or "none"
        raise SampleFault("no_text_or_messages", f'sample has neither "messages" nor "text" (keys: {keys})')
    _check_legacy_openai(sample)
    tool_names = _check_tools(sample.get("tools"))
    _check_messages(sample["messages"], tool_names)


# The keys each part of a sample is read for; any other key is ignored, with a warning (a typo such as "wieght").
SAMPLE_KEYS = {"text", "messages", "tools"}
MESSAGE_KEYS = {
    "system": {"role", "content"},
    "user": {"role", "content"},
    "assistant": {"role", "content", "tool_calls", "weight"},
    "tool": {"role", "content", "tool_call_id", "name"},
}
# Keys that OpenAI's and Mistral's exports carry and that change nothing: no warning for them.
QUIET_KEYS = {"id", "metadata", "name", "prefix", "refusal", "tool_choice", "parallel_tool_calls"}
# The keys that draw no unknown_key warning, per role: one subset test per message when all of them are known.
SILENT_MESSAGE_KEYS = {role: keys | QUIET_KEYS for role, keys in MESSAGE_KEYS.items()}


def _did_you_mean(key: str, known: set[str]) -> str:
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else f" (read here: {', '.join(sorted(known))})"


def sample_warnings(sample: dict) -> list[SampleWarning]:
    """What a checked (usable) sample says that its author may not have meant.

    Each is used as mistral-common reads it, and shown so that a careful user can look before spending GPU hours.
    """
    warnings = []

    def warn(kind: str, message: str) -> None:
        warnings.append(SampleWarning(kind, message))

    for key in sorted(set(sample) - SAMPLE_KEYS - QUIET_KEYS):
        warn("unknown_key", f"key {key!r} is not read{_did_you_mean(key, SAMPLE_KEYS)}")
    if "text" in sample:
        if found := _template_text(sample["text"]):
            warn("template_text", f'"text" holds {found!r}, {TEMPLATE_TEXT_IS}')
        return warnings
    names = [tool["function"]["name"] for tool in sample.get("tools") or []]
    for name in sorted({name for name in names if names.count(name) > 1}):
        warn("duplicate_tool", f"tools declare {name!r} {names.count(name)} times; the model sees each declaration")
    messages = sample["messages"]
    unanswered: dict[str, int] = {}  # tool call id -> the message that made the call
    seen_user = False
    for i, m in enumerate(messages, 1):
        role, previous = m["role"], messages[i - 2]["role"] if i > 1 else None
        for key in sorted(m.keys() - SILENT_MESSAGE_KEYS[role]):
            warn(
                "unknown_key", f"message {i} ({role}): key {key!r} is not read{_did_you_mean(key, MESSAGE_KEYS[role])}"
            )
        if isinstance(m.get("content"), str) and (found := _template_text(m["content"])):
            warn("template_text", f"message {i} ({role}) holds {found!r}, {TEMPLATE_TEXT_IS}")
        if role == previous and role in ("user", "assistant"):
            how = "joined into one message" if role == "user" else "each encoded as an answer to the same prompt"
            warn(f"two_{role}_messages", f"messages {i - 1} and {i} are both from the {role} ({how})")
        if role == "system" and seen_user:
            warn(
                "late_system_message",
                f"message {i} is a system message after a user message; where it goes depends on the tokenizer "
                "(`tailor tokenize --show` shows it)",
            )
        if role != "tool" and unanswered:
            for call_id, caller in unanswered.items():
                warn("unanswered_tool_call", f"tool call {call_id!r} of message {caller} has no tool result")
            unanswered = {}
        if role == "assistant":
            for j, call in enumerate(m.get("tool_calls") or [], 1):
                unanswered[call["id"]] = i
                if call.get("type", "function") != "function":
                    warn(
                        "tool_call_type",
                        f"message {i} tool call {j} has type {call['type']!r}; it is read as a function call",
                    )
        elif role == "tool":
            unanswered.pop(m["tool_call_id"], None)
        seen_user |= role == "user"
    return warnings


# Chat-template markers written out as text: the tokenizer encodes them as plain characters, never as the control
# tokens they look like, so they are almost always data templated twice (or with another model's template).
TEMPLATE_TEXT = ("[INST]", "[/INST]", "<s>", "</s>", "[TOOL_CALLS]", "<|im_start|>", "<|im_end|>", "<|eot_id|>")
TEMPLATE_TEXT_IS = "chat-template text that is trained as plain characters, not as a control token (templated twice?)"


# The characters that every marker starts with: a text without any of them (most texts) is ruled out in two scans
# instead of one per marker.
TEMPLATE_TEXT_STARTS = "".join(sorted({marker[0] for marker in TEMPLATE_TEXT}))


def _template_text(text: str) -> str | None:
    """The first marker of TEMPLATE_TEXT (in its order) that `text` holds, if any."""
    if not any(start in text for start in TEMPLATE_TEXT_STARTS):
        return None
    return next((marker for marker in TEMPLATE_TEXT if marker in text), None)


def _check_legacy_openai(sample: dict) -> None:
    legacy = (
        "uses OpenAI's legacy function-calling form ({}); write tools/tool_calls/tool messages instead "
        "(`tailor validate --fix` converts it)"
    )
    if "functions" in sample:
        raise SampleFault("legacy_functions", "sample " + legacy.format('"functions"'), fixable=True)
    messages = sample["messages"] if isinstance(sample["messages"], list) else []
    for i, m in enumerate(messages, 1):
        if isinstance(m, dict) and ("function_call" in m or m.get("role") == "function"):
            what = '"function_call"' if "function_call" in m else "role 'function'"
            raise SampleFault("legacy_functions", f"message {i} " + legacy.format(what), fixable=True)


def _check_tools(tools: Any) -> set[str] | None:
    """The names of the sample's functions, or None when the sample declares no tools."""
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise SampleFault("bad_tools", f'"tools" must be a list, got {_json_type(tools)}')
    names = set()
    for i, tool in enumerate(tools, 1):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict):
            raise SampleFault(
                "bad_tools",
                f'tool {i} must be {{"type": "function", "function": {{"name", "description", "parameters"}}}}',
            )
        if tool.get("type", "function") != "function":
            raise SampleFault("bad_tools", f"tool {i} has type {tool['type']!r}; only 'function' is supported")
        name = function.get("name")
        if not isinstance(name, str) or not FUNCTION_NAME.match(name):
            raise SampleFault(
                "bad_function_name",
                f"tool {i} has function name {name!r}; a name is 1 to 64 letters, digits, '_' or '-'",
            )
        if "parameters" in function and not isinstance(function["parameters"], dict):
            raise SampleFault(
                "bad_tools",
                f"tool {i} ({name}): parameters must be a JSON Schema object, got {_json_type(function['parameters'])}",
            )
        if not isinstance(function.get("description", ""), str):
            raise SampleFault("bad_tools", f"tool {i} ({name}): description must be a string")
        names.add(name)
    return names


def _check_messages(messages: Any, tool_names: set[str] | None) -> None:
    if not isinstance(messages, list):
        raise SampleFault("messages_not_list", f'"messages" must be a list, got {_json_type(messages)}')
    if not messages:
        raise SampleFault("no_messages", '"messages" is empty')
    open_calls: dict[str, bool] = {}  # ids of the latest tool calls -> answered yet
    seen_user = False
    previous = None
    for i, m in enumerate(messages, 1):
        if not isinstance(m, dict):
            raise SampleFault("message_not_object", f"message {i} is {_json_type(m)}, not a JSON object")
        if "role" not in m:
            raise SampleFault("missing_role", f"message {i} has no role")
        role = m["role"]
        if role not in ROLES:
            raise SampleFault(
                "unknown_role", f"message {i} has role {role!r}; expected system, user, assistant or tool"
            )
        if "weight" in m and role != "assistant":
            raise SampleFault(
                "weight_not_on_assistant", f"message {i} ({role}) has a weight; only assistant messages are weighted"
            )
        if "tool_calls" in m and m["tool_calls"] is not None and role != "assistant":
            raise SampleFault(
                "tool_calls_not_on_assistant",
                f"message {i} ({role}) has tool_calls; only assistant messages call tools",
            )
        if role == "assistant":
            if not seen_user:
                raise SampleFault(
                    "assistant_before_user",
                    f"message {i} is from the assistant before any user "
                    "message; a conversation starts with system or user",
                )
            open_calls = {call_id: False for call_id in _check_assistant(m, i, tool_names)}
        elif role == "tool":
            _check_tool_message(m, i, previous, open_calls)
        else:
            _check_text_content(m, i, role)
            seen_user |= role == "user"
        previous = role
    if previous != "assistant":
        raise SampleFault(
            "last_not_assistant",
            f"the last message (message {len(messages)}) is from the {previous}; "
            "a training sample ends with an assistant message",
        )


def _check_text_content(m: dict, i: int, role: str) -> None:
    content = m.get("content")
    if content is None:
        raise SampleFault("missing_content", f"message {i} ({role}) has no content")
    if not isinstance(content, str):
        raise SampleFault(
            "content_not_string", f"message {i} ({role}) content must be a string, got {_json_type(content)}"
        )
    if not content.strip():
        raise SampleFault("empty_content", f"message {i} ({role}) has empty content")


def _check_assistant(m: dict, i: int, tool_names: set[str] | None) -> list[str]:
    """Check an assistant message; return the ids of its tool calls."""
    if "weight" in m:
        weight = m["weight"]
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight <= 1:
            raise SampleFault("bad_weight", f"message {i} has weight {weight!r}; expected a number from 0 to 1")
    tool_calls = m.get("tool_calls")
    if tool_calls is None or tool_calls == []:
        _check_text_content(m, i, "assistant")
        return []
    if m.get("content") not in (None, "") and not isinstance(m.get("content"), str):
        raise SampleFault(
            "content_not_string", f"message {i} (assistant) content must be a string, got {_json_type(m['content'])}"
        )
    if not isinstance(tool_calls, list):
        raise SampleFault("bad_tool_call", f"message {i}: tool_calls must be a list, got {_json_type(tool_calls)}")
    ids = []
    for j, call in enumerate(tool_calls, 1):
        where = f"message {i} tool call {j}"
        if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
            raise SampleFault(
                "bad_tool_call", f'{where} must be {{"id", "type": "function", "function": {{"name", "arguments"}}}}'
            )
        call_id = call.get("id")
        if call_id is None:
            raise SampleFault(
                "tool_call_without_id", f"{where} has no id (`tailor validate --fix` generates one)", fixable=True
            )
        if not isinstance(call_id, str) or not TOOL_CALL_ID.match(call_id):
            raise SampleFault(
                "bad_tool_call_id",
                f"{where} has id {call_id!r}; an id is 9 letters or digits (`tailor validate --fix` replaces it)",
                fixable=True,
            )
        if call_id in ids:
            raise SampleFault("duplicate_tool_call_id", f"{where} repeats id {call_id!r}")
        name = call["function"].get("name")
        if not isinstance(name, str) or not FUNCTION_NAME.match(name):
            raise SampleFault(
                "bad_function_name", f"{where} calls function {name!r}; a name is 1 to 64 letters, digits, '_' or '-'"
            )
        if tool_names is None:
            raise SampleFault("function_not_in_tools", f'{where} calls {name!r} but the sample has no "tools"')
        if name not in tool_names:
            known = ", ".join(sorted(tool_names)) or "none"
            raise SampleFault(
                "function_not_in_tools", f"{where} calls {name!r}, which is not in the sample's tools ({known})"
            )
        arguments = call["function"].get("arguments")
        if not isinstance(arguments, str):
            raise SampleFault(
                "arguments_not_string",
                f"{where} ({name}): arguments must be a JSON string, got {_json_type(arguments)}",
                fixable=isinstance(arguments, dict),
            )
        try:
            parsed = json.loads(arguments)
        except json.JSONDecodeError as e:
            raise SampleFault(
                "arguments_not_json", f"{where} ({name}): arguments are not valid JSON ({e.msg} at character {e.pos})"
            ) from None
        except (RecursionError, ValueError):  # nested past Python's limit, or a number past its digit limit
            parsed = None
        if parsed is None and arguments.strip() != "null" or nesting(parsed) > MAX_NESTING:
            raise SampleFault(
                "arguments_not_json",
                f"{where} ({name}): arguments are not valid JSON that can be read (nested more than {MAX_NESTING} "
                "levels, or a number of too many digits)",
            )
        ids.append(call_id)
    return ids


def _check_tool_message(m: dict, i: int, previous: str | None, open_calls: dict[str, bool]) -> None:
    if previous not in ("assistant", "tool") or not open_calls:
        raise SampleFault("tool_without_call", f"message {i} is a tool result but no assistant tool call precedes it")
    call_id = m.get("tool_call_id")
    if call_id is None:
        raise SampleFault(
            "tool_message_without_id",
            f"message {i} (tool) has no tool_call_id (`tailor validate --fix` assigns the calls' ids in order)",
            fixable=True,
        )
    if call_id not in open_calls:
        known = ", ".join(repr(c) for c in open_calls)
        raise SampleFault(
            "unknown_tool_call_id",
            f"message {i} (tool) has tool_call_id {call_id!r}, which matches "
            f"no call of the preceding assistant message ({known})",
        )
    if open_calls[call_id]:
        raise SampleFault("duplicate_tool_result", f"message {i} (tool) answers tool call {call_id!r} a second time")
    open_calls[call_id] = True
    content = m.get("content")
    if not isinstance(content, str):
        raise SampleFault(
            "content_not_string", f"message {i} (tool) content must be a string, got {_json_type(content)}"
        )


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__
