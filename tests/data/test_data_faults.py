"""The catalogue of bad lines: each fault gives its own message, with file and line when read from a file."""

from __future__ import annotations

import json

import pytest

from finetune.data import DataError, SampleFault, build_eval_batches, build_train_loader, tokenize_sample
from finetune.data.config import DataConfig, DataSource
from finetune.data.errors import SampleWarning
from finetune.data.jsonl import parse_line
from finetune.data.schema import TEMPLATE_TEXT_IS
from finetune.data.sources import open_run_data
from finetune.data.tokenize import tokenize_line

TOOL = {"type": "function", "function": {"name": "lookup", "description": "", "parameters": {"type": "object"}}}
USER = {"role": "user", "content": "Hi"}
ANSWER = {"role": "assistant", "content": "Hello"}
TOOL_RESULT = {"role": "tool", "tool_call_id": "abcDEF123", "content": "42"}


def call(id="abcDEF123", name="lookup", arguments="{}"):
    return {"id": id, "type": "function", "function": {"name": name, "arguments": arguments}}


def calling(*calls, tools=(TOOL,), after=(ANSWER,)):
    """user -> assistant calling tools -> the given messages; tools=None leaves "tools" out."""
    sample = {"messages": [USER, {"role": "assistant", "tool_calls": list(calls)}, *after]}
    return sample if tools is None else {"tools": list(tools), **sample}


# (kind, sample, words the message must hold)
SAMPLE_FAULTS = [
    ("not_an_object", [1, 2], "expected a JSON object per line, got a list"),
    ("text_and_messages", {"text": "a", "messages": []}, 'both "text" and "messages"'),
    ("text_not_string", {"text": 3}, '"text" must be a string, got a number'),
    ("empty_text", {"text": "  "}, '"text" is empty'),
    ("no_text_or_messages", {"prompt": "x"}, 'neither "messages" nor "text" (keys: \'prompt\')'),
    ("messages_not_list", {"messages": {"role": "user"}}, '"messages" must be a list, got an object'),
    ("no_messages", {"messages": []}, '"messages" is empty'),
    ("message_not_object", {"messages": [USER, "hello"]}, "message 2 is a string, not a JSON object"),
    ("missing_role", {"messages": [{"content": "x"}, ANSWER]}, "message 1 has no role"),
    (
        "unknown_role",
        {"messages": [USER, ANSWER, {"role": "bot", "content": "x"}]},
        "message 3 has role 'bot'; expected system, user, assistant or tool",
    ),
    ("missing_content", {"messages": [{"role": "user"}, ANSWER]}, "message 1 (user) has no content"),
    (
        "content_not_string",
        {"messages": [{"role": "user", "content": ["hi"]}, ANSWER]},
        "message 1 (user) content must be a string, got a list",
    ),
    (
        "empty_content",
        {"messages": [USER, {"role": "assistant", "content": ""}]},
        "message 2 (assistant) has empty content",
    ),
    (
        "last_not_assistant",
        {"messages": [USER, ANSWER, USER]},
        "the last message (message 3) is from the user; a training sample ends with an assistant message",
    ),
    ("assistant_before_user", {"messages": [ANSWER, USER, ANSWER]}, "message 1 is from the assistant before any user"),
    (
        "bad_weight",
        {"messages": [USER, {**ANSWER, "weight": 1.5}]},
        "message 2 has weight 1.5; expected a number from 0 to 1",
    ),
    ("bad_weight", {"messages": [USER, {**ANSWER, "weight": "1"}]}, "message 2 has weight '1'"),
    ("weight_not_on_assistant", {"messages": [{**USER, "weight": 1}, ANSWER]}, "message 1 (user) has a weight"),
    (
        "tool_calls_not_on_assistant",
        {"messages": [{**USER, "tool_calls": [call()]}, ANSWER]},
        "message 1 (user) has tool_calls",
    ),
    (
        "tool_call_without_id",
        calling({"type": "function", "function": {"name": "lookup", "arguments": "{}"}}),
        "message 2 tool call 1 has no id",
    ),
    (
        "bad_tool_call_id",
        calling(call(id="call_1")),
        "message 2 tool call 1 has id 'call_1'; an id is 9 letters or digits",
    ),
    ("duplicate_tool_call_id", calling(call(), call()), "message 2 tool call 2 repeats id 'abcDEF123'"),
    ("bad_tool_call", calling({"id": "abcDEF123", "function": "lookup"}), "message 2 tool call 1 must be"),
    (
        "arguments_not_string",
        calling(call(arguments={"q": 1})),
        "message 2 tool call 1 (lookup): arguments must be a JSON string, got an object",
    ),
    (
        "arguments_not_json",
        calling(call(arguments="{q: 1}")),
        "message 2 tool call 1 (lookup): arguments are not valid JSON",
    ),
    (
        "function_not_in_tools",
        calling(call(name="search")),
        "message 2 tool call 1 calls 'search', which is not in the sample's tools (lookup)",
    ),
    ("function_not_in_tools", calling(call(), tools=None), "calls 'lookup' but the sample has no \"tools\""),
    ("bad_function_name", calling(call(name="look up")), "calls function 'look up'; a name is 1 to 64"),
    ("bad_tools", {"tools": {"lookup": 1}, "messages": [USER, ANSWER]}, '"tools" must be a list, got an object'),
    (
        "bad_tools",
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}], "messages": [USER, ANSWER]},
        "tool 1 (f): parameters must be a JSON Schema object",
    ),
    (
        "tool_without_call",
        {"messages": [USER, {"role": "tool", "tool_call_id": "abcDEF123", "content": "1"}, ANSWER]},
        "message 2 is a tool result but no assistant tool call precedes it",
    ),
    (
        "tool_message_without_id",
        calling(call(), after=[{"role": "tool", "content": "1"}, ANSWER]),
        "message 3 (tool) has no tool_call_id",
    ),
    (
        "unknown_tool_call_id",
        calling(call(), after=[{"role": "tool", "tool_call_id": "zzzzzzzzz", "content": "1"}, ANSWER]),
        "message 3 (tool) has tool_call_id 'zzzzzzzzz', which matches no call of the preceding assistant message",
    ),
    (
        "duplicate_tool_result",
        calling(
            call(),
            after=[
                {"role": "tool", "tool_call_id": "abcDEF123", "content": "1"},
                {"role": "tool", "tool_call_id": "abcDEF123", "content": "2"},
                ANSWER,
            ],
        ),
        "message 4 (tool) answers tool call 'abcDEF123' a second time",
    ),
    (
        "legacy_functions",
        {"functions": [TOOL["function"]], "messages": [USER, ANSWER]},
        'sample uses OpenAI\'s legacy function-calling form ("functions")',
    ),
    (
        "legacy_functions",
        {"messages": [USER, {"role": "assistant", "function_call": {"name": "lookup", "arguments": "{}"}}]},
        'message 2 uses OpenAI\'s legacy function-calling form ("function_call")',
    ),
]


@pytest.mark.parametrize(
    "kind,sample,words", SAMPLE_FAULTS, ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(SAMPLE_FAULTS)]
)
def test_sample_fault(tokenizers, kind, sample, words):
    with pytest.raises(SampleFault) as caught:
        tokenize_sample(sample, tokenizers["v3"])
    assert caught.value.kind == kind
    assert words in caught.value.message


LINE_FAULTS = [
    ("bom", b'\xef\xbb\xbf{"text": "a"}\n', "line starts with a UTF-8 byte-order mark (BOM)"),
    ("blank_line", b"  \r\n", "blank line"),
    ("not_utf8", b'{"text": "caf\xe9"}\n', "not valid UTF-8: byte 0xe9 at column 14"),
    (
        "invalid_json",
        b'{"text": "a",}\n',
        "invalid JSON: Expecting property name enclosed in double quotes at column 14",
    ),
    ("invalid_json", b'{"text": "a"} {"text": "b"}\n', "invalid JSON: Extra data at column 15"),
    ("invalid_json", b"[\n", "a line holding only '['; is the file one (pretty-printed) JSON document"),
    ("invalid_json", b'{"text": "a\x00b"}\n', "invalid JSON: control character 0x00 inside a string at column 12"),
    ("lone_surrogate", b'{"text": "a \\ud800 b"}\n', "holds \\ud800, half of a UTF-16 surrogate pair"),
    ("lone_surrogate", b'{"text": "a", "\\udfff": 1}\n', "holds \\udfff"),
    ("too_deeply_nested", b'{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n", "nested more than 100 levels"),
    ("too_deeply_nested", b'{"text": "a", "x": ' + b"[" * 101 + b"]" * 101 + b"}\n", "nested more than 100 levels"),
    ("number_too_long", b'{"text": "a", "n": ' + b"9" * 5000 + b"}\n", "a number has more than 4300 digits"),
]


@pytest.mark.parametrize("kind,raw,words", LINE_FAULTS)
def test_line_fault(kind, raw, words):
    with pytest.raises(SampleFault) as caught:
        parse_line(raw)
    assert caught.value.kind == kind
    assert words in caught.value.message


def test_a_surrogate_pair_and_a_nesting_of_100_are_read():
    assert parse_line(b'{"text": "\\ud83d\\ude00"}') == {"text": "\U0001f600"}
    deep = parse_line(b'{"x": ' + b"[" * 99 + b"]" * 99 + b"}")["x"]
    for _ in range(98):
        (deep,) = deep
    assert deep == []


def test_catalogue_has_more_than_twenty_kinds():
    assert len({kind for kind, _, _ in SAMPLE_FAULTS} | {kind for kind, _, _ in LINE_FAULTS}) >= 30


def test_bad_line_stops_training_with_file_and_line(tmp_path, tokenizers, write_jsonl, chat):
    data = write_jsonl(
        tmp_path / "train.jsonl",
        [chat(0), chat(1), "{oops", chat(3), {"messages": [USER, ANSWER, {"role": "bot", "content": "x"}]}],
    )
    cfg = DataConfig(train=[DataSource(str(data))])
    with pytest.raises(DataError) as caught:
        build_train_loader(
            open_run_data(cfg, tokenizers["v3"], cache_dir=tmp_path / "cache"),
            seq_len=256,
            batch_size=1,
            rank=0,
            world_size=1,
            seed=0,
        )
    assert str(caught.value).startswith(
        f"{data}:3: invalid JSON: Expecting property name enclosed in double quotes at column 2 (and 1 more bad lines)"
    )


def test_skipped_bad_samples_are_counted(tmp_path, tokenizers, write_jsonl, chat):
    data = write_jsonl(tmp_path / "train.jsonl", [chat(0), "", chat(1), "{oops", chat(2), json.dumps([1])])
    cfg = DataConfig(train=[DataSource(str(data))], eval=[DataSource(str(data))], on_bad_sample="skip")
    loader = build_train_loader(
        open_run_data(cfg, tokenizers["v3"], cache_dir=tmp_path / "cache"),
        seq_len=256,
        batch_size=1,
        rank=0,
        world_size=1,
        seed=0,
    )
    assert loader.report()["skipped_bad_samples"] == {"blank_line": 1, "invalid_json": 1, "not_an_object": 1}
    assert len(loader.sources[0]) == 3
    assert (
        len(
            build_eval_batches(
                open_run_data(cfg, tokenizers["v3"], cache_dir=tmp_path / "cache"),
                seq_len=256,
                batch_size=1,
                rank=0,
                world_size=1,
            )
        )
        == 1
    )


# (kind, sample, words the warning must hold): usable lines that a careful user wants to hear about
SAMPLE_WARNINGS = [
    ("unknown_key", {"text": "a", "lang": "en"}, "key 'lang' is not read (read here: messages, text, tools)"),
    (
        "unknown_key",
        {"messages": [USER, {**ANSWER, "wieght": 0}]},
        "message 2 (assistant): key 'wieght' is not read; did you mean 'weight'?",
    ),
    ("two_user_messages", {"messages": [USER, USER, ANSWER]}, "messages 1 and 2 are both from the user"),
    ("two_assistant_messages", {"messages": [USER, ANSWER, ANSWER]}, "messages 2 and 3 are both from the assistant"),
    (
        "late_system_message",
        {"messages": [USER, ANSWER, {"role": "system", "content": "Be brief"}, USER, ANSWER]},
        "message 3 is a system message after a user message",
    ),
    ("unanswered_tool_call", calling(call(), after=(USER, ANSWER)), "tool call 'abcDEF123' of message 2 has no tool"),
    (
        "tool_call_type",
        calling({**call(), "type": "retrieval"}, after=()),
        "message 2 tool call 1 has type 'retrieval'; it is read as a function call",
    ),
    ("nothing_to_train", {"messages": [USER, {**ANSWER, "weight": 0}]}, "no assistant message is trained"),
    ("non_standard_json", {"text": "a", "metadata": {"score": float("nan")}}, "NaN is not standard JSON"),
    ("template_text", {"text": "<s>[INST] Hi [/INST] Yo</s>"}, "\"text\" holds '[INST]', chat-template text"),
    (
        "template_text",
        {"messages": [USER, {"role": "assistant", "content": "Yo<|im_end|>"}]},
        "message 2 (assistant) holds '<|im_end|>'",
    ),
    ("duplicate_tool", calling(call(), tools=(TOOL, TOOL), after=()), "tools declare 'lookup' 2 times"),
]


@pytest.mark.parametrize(
    "kind,sample,words", SAMPLE_WARNINGS, ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(SAMPLE_WARNINGS)]
)
def test_sample_warning(tokenizers, kind, sample, words):
    _, _, warnings = tokenize_line(json.dumps(sample).encode(), tokenizers["v7"])
    assert [w.kind for w in warnings] == [kind]
    assert words in warnings[0].message


def test_a_repeated_key_is_a_warning_and_the_last_value_is_used(tokenizers):
    tokens, _, warnings = tokenize_line(b'{"text": "first", "text": "second"}', tokenizers["v3"])
    assert warnings == [
        SampleWarning("duplicate_key", "key 'text' appears twice in one JSON object; the last one is used")
    ]
    assert tokens.tolist() == tokenize_sample({"text": "second"}, tokenizers["v3"]).tokens


def test_a_clean_sample_has_no_warning(tokenizers):
    for sample in ({"text": "a"}, {"messages": [USER, ANSWER]}, calling(call(), after=(TOOL_RESULT, ANSWER))):
        assert tokenize_line(json.dumps(sample).encode(), tokenizers["v7"])[2] == []


@pytest.mark.parametrize(
    "content,marker",
    [
        ("a [link] and <b>bold</b>, no marker", None),
        ("x" * 5000 + "</s>", "</s>"),
        ("<|eot_id|> then [/INST]", "[/INST]"),  # TEMPLATE_TEXT's order, not the text's
        ("[TOOL_CALLS][", "[TOOL_CALLS]"),
        ("\u3000<|im_start|>\u00a0", "<|im_start|>"),
        ("[ INST] < s>", None),
    ],
)
def test_template_text_names_the_first_marker_of_the_list_that_the_text_holds(tokenizers, content, marker):
    sample = {"messages": [USER, {"role": "assistant", "content": content}]}
    _, _, warnings = tokenize_line(json.dumps(sample).encode(), tokenizers["v7"])
    assert [w.message for w in warnings if w.kind == "template_text"] == (
        [] if marker is None else [f"message 2 (assistant) holds {marker!r}, {TEMPLATE_TEXT_IS}"]
    )
