"""What a generated answer is worth against the eval chat's reference: exact and normalised match for text answers;
for tool calls, whether the call parses, names a function of the sample's tools, has arguments its schema accepts,
and equals the reference's name and arguments. Rates are per eval source, over the chats of each kind.

A tool call is read in mistral-common's format for the tokenizers it ships (v2 to v7, Tekken): the `[TOOL_CALLS]`
control token, then a JSON list of `{"name", "arguments", "id"}` objects; the id is not scored (ids are random).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from finetune.training.json_schema import schema_problem

TEXT_SCORES = ("exact_match", "normalised_match")
TOOL_CALL_SCORES = (
    "tool_call_parses",  # [TOOL_CALLS] then a JSON list of {"name": string, "arguments": object}
    "tool_call_known_function",  # ... and every call names a function of the sample's tools
    "tool_call_arguments_valid",  # ... and its arguments satisfy that function's parameters schema
    "tool_call_name_match",  # parses, and the called names equal the reference's, in order
    "tool_call_arguments_match",  # parses, and names and arguments equal the reference's, in order
)


@dataclass
class Reference:
    """The final assistant message of an eval chat, and the functions its sample declares."""

    text: str | None  # its content, when it answers in text
    calls: list[dict] | None  # its tool calls as {"name", "arguments": the decoded JSON}, when it calls tools
    functions: dict[str, Any]  # the sample's tools: name -> parameters schema

    @property
    def shown(self) -> str | list:
        """The reference as logs show it: its text, or its tool calls."""
        return self.text if self.calls is None else self.calls


@dataclass
class Answer:
    """A generated answer, decoded."""

    text: str  # the decoded answer, `[TOOL_CALLS]` written out when it starts with that token
    tool_call_payload: str | None  # what follows `[TOOL_CALLS]`, when the answer starts with it


TOOL_CALLS_TEXT = "[TOOL_CALLS]"


def read_answer(tokens: list[int], tokenizer) -> Answer:
    """The answer in `tokens` (EOS not included) with the model's mistral-common tokenizer."""
    raw = tokenizer.instruct_tokenizer.tokenizer
    if tokens and raw.version.value != "v1" and tokens[0] == raw.get_special_token(TOOL_CALLS_TEXT):
        payload = tokenizer.decode(tokens[1:])
        return Answer(TOOL_CALLS_TEXT + payload, payload)
    return Answer(tokenizer.decode(tokens), None)


def normalise(text: str) -> str:
    """Runs of whitespace as one space, none at the ends, case folded."""
    return " ".join(text.split()).casefold()


def parse_tool_calls(payload: str) -> list[dict] | None:
    """The calls of a `[TOOL_CALLS]` payload as {"name", "arguments"}.

    Returns:
        The calls, or None when the payload is not a list of calls (or one call), each with a string `name` and an
        `arguments` object (or a JSON string of one).
    """
    try:
        calls = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    if isinstance(calls, dict):  # one call without the list around it
        calls = [calls]
    if not isinstance(calls, list) or not calls:
        return None
    parsed = []
    for call in calls:
        if not isinstance(call, dict) or not isinstance(call.get("name"), str) or "arguments" not in call:
            return None
        arguments = call["arguments"]
        if isinstance(arguments, str):  # OpenAI writes arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except (ValueError, RecursionError):
                return None
        if not isinstance(arguments, dict):
            return None
        parsed.append({"name": call["name"], "arguments": arguments})
    return parsed


def score_answer(answer: Answer, reference: Reference) -> dict[str, bool]:
    """The scores of one answer: TEXT_SCORES for a text reference, TOOL_CALL_SCORES for a tool-call one."""
    if reference.calls is None:
        text = answer.text
        return dict(exact_match=text == reference.text, normalised_match=normalise(text) == normalise(reference.text))
    calls = parse_tool_calls(answer.tool_call_payload) if answer.tool_call_payload is not None else None
    known = calls is not None and all(c["name"] in reference.functions for c in calls)
    return dict(
        tool_call_parses=calls is not None,
        tool_call_known_function=known,
        tool_call_arguments_valid=known
        and all(schema_problem(c["arguments"], reference.functions[c["name"]]) is None for c in calls),
        tool_call_name_match=calls is not None and [c["name"] for c in calls] == [c["name"] for c in reference.calls],
        tool_call_arguments_match=calls is not None and calls == reference.calls,
    )


def score_rates(scores: list[dict[str, bool]]) -> dict[str, float | int]:
    """Each score as a rate over the answers that have it.

    Returns:
        The rates, with `answers` (text references) and `tool_call_answers` (tool-call references) counted; a kind
        without answers has no rates.
    """
    text = [s for s in scores if "exact_match" in s]
    calls = [s for s in scores if "tool_call_parses" in s]
    rates: dict[str, float | int] = dict(answers=len(text), tool_call_answers=len(calls))
    for names, group in ((TEXT_SCORES, text), (TOOL_CALL_SCORES, calls)):
        if group:
            rates.update({name: sum(s[name] for s in group) / len(group) for name in names})
    return rates
