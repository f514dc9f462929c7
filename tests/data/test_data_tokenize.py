"""Tokens equal mistral-common's encode_chat_completion; weights sit on assistant tokens only."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, ToolMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.tool_calls import Function, FunctionCall, Tool, ToolCall

from finetune.data import (
    SampleFault,
    check_tokenizer_vocab,
    load_tokenizer,
    tokenize_sample,
)
from finetune.data.errors import NOTHING_TO_TRAIN
from finetune.data.tokenize import tokenize_line, tokenize_lines, word_memo
from model.args import read_vocab_size

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}

CONVERSATIONS = {
    "chat": {
        "messages": [
            {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello! How can I help?"},
        ]
    },
    "multi_turn_with_system": {
        "messages": [
            {"role": "system", "content": "You answer in one word."},
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris"},
            {"role": "user", "content": "And of Italy?"},
            {"role": "assistant", "content": "Rome"},
            {"role": "user", "content": "Of Spain?"},
            {"role": "assistant", "content": "Madrid"},
        ]
    },
    "tool_calling": {
        "tools": [WEATHER_TOOL],
        "messages": [
            {"role": "system", "content": "Use tools when useful."},
            {"role": "user", "content": "Weather in Paris and Rome?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call00001",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    },
                    {
                        "id": "call00002",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'},
                    },
                ],
            },
            {"role": "tool", "tool_call_id": "call00001", "content": '{"celsius": 21}'},
            {"role": "tool", "tool_call_id": "call00002", "content": '{"celsius": 25}'},
            {"role": "assistant", "content": "Paris 21 °C, Rome 25 °C."},
            {"role": "user", "content": "Thanks! Tomorrow in Oslo?"},
            {
                "role": "assistant",
                "tool_calls": [
                    {
                        "id": "call00003",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                    }
                ],
            },
        ],
    },
}


def reference_tokens(tokenizer, sample: dict) -> list[int]:
    """mistral-common's own encoding of the same conversation."""
    messages = []
    for m in sample["messages"]:
        if m["role"] == "system":
            messages.append(SystemMessage(content=m["content"]))
        elif m["role"] == "user":
            messages.append(UserMessage(content=m["content"]))
        elif m["role"] == "tool":
            messages.append(ToolMessage(content=m["content"], tool_call_id=m["tool_call_id"]))
        else:
            calls = [ToolCall(id=c["id"], function=FunctionCall(**c["function"])) for c in m.get("tool_calls", [])]
            messages.append(AssistantMessage(content=m.get("content"), tool_calls=calls or None))
    tools = [Tool(function=Function(**t["function"])) for t in sample.get("tools", [])] or None
    return tokenizer.encode_chat_completion(ChatCompletionRequest(messages=messages, tools=tools)).tokens


def assistant_message_tokens(tokenizer, sample: dict, k: int) -> list[int]:
    """The tokens mistral-common adds for assistant message k: encode the conversation up to it with the
    message and with a one-token stand-in, and keep what differs."""
    messages = sample["messages"]
    with_it = reference_tokens(tokenizer, {**sample, "messages": messages[: k + 1]})
    stand_in = reference_tokens(
        tokenizer, {**sample, "messages": messages[:k] + [{"role": "assistant", "content": "x"}]}
    )
    start = len(stand_in) - len(tokenizer.instruct_tokenizer.tokenizer.encode("x", bos=False, eos=True))
    assert with_it[:start] == stand_in[:start]
    return with_it[start:]


def weighted_runs(tokens: list[int], weights: list[float]) -> list[list[int]]:
    runs, previous = [], 0.0
    for token, weight in zip(tokens, weights):
        if weight:
            if not previous:
                runs.append([])
            runs[-1].append(token)
        previous = weight
    return runs


@pytest.mark.parametrize("version", ["v3", "v7", "tekken"])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_tokens_equal_mistral_common(tokenizers, version, name):
    sample = CONVERSATIONS[name]
    tokenized = tokenize_sample(sample, tokenizers[version])
    assert tokenized.tokens == reference_tokens(tokenizers[version], sample)
    assert len(tokenized.weights) == len(tokenized.tokens)


def test_v1_plain_chat_equals_mistral_common(tokenizers):
    sample = CONVERSATIONS["multi_turn_with_system"]
    assert tokenize_sample(sample, tokenizers["v1"]).tokens == reference_tokens(tokenizers["v1"], sample)


@pytest.mark.parametrize("version", ["v3", "tekken"])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_weights_cover_exactly_the_assistant_messages(tokenizers, version, name):
    """Trained runs are the assistant messages' tokens (content or tool calls, and EOS), with weight 1."""
    tokenizer, sample = tokenizers[version], CONVERSATIONS[name]
    tokenized = tokenize_sample(sample, tokenizer)
    expected = [
        assistant_message_tokens(tokenizer, sample, k)
        for k, m in enumerate(sample["messages"])
        if m["role"] == "assistant"
    ]
    assert weighted_runs(tokenized.tokens, tokenized.weights) == expected
    assert set(tokenized.weights) == {0.0, 1.0}
    assert tokenized.weights[0] == 0.0  # BOS
    eos = tokenizer.instruct_tokenizer.tokenizer.eos_id
    assert all(w == 1.0 for t, w in zip(tokenized.tokens, tokenized.weights) if t == eos)


GOLDEN_SAMPLE = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!", "weight": 0.5},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Bye!"},
    ]
}


def test_golden_mask_v3(tokenizers):
    # <s> [INST] ▁Hi [/INST] ▁Hello ! </s> [INST] ▁Be ▁brief . \n \n By e [/INST] ▁By e ! </s>
    # (v3 puts the system prompt in the last user message)
    tokenized = tokenize_sample(GOLDEN_SAMPLE, tokenizers["v3"])
    assert tokenized.tokens == [
        1,
        3,
        16127,
        4,
        23325,
        29576,
        2,
        3,
        2507,
        7585,
        29491,
        781,
        781,
        2698,
        29474,
        4,
        3231,
        29474,
        29576,
        2,
    ]
    assert tokenized.weights == [0, 0, 0, 0, 0.5, 0.5, 0.5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1]


def test_golden_mask_tekken(tokenizers):
    # <s> [INST] Hi [/INST] Hello ! </s> [INST] Be ␣brief .\n\n By e [/INST] By e ! </s>
    tokenized = tokenize_sample(GOLDEN_SAMPLE, tokenizers["tekken"])
    assert tokenized.tokens == [
        1,
        3,
        37133,
        4,
        22177,
        1033,
        2,
        3,
        5934,
        13426,
        1338,
        3606,
        1101,
        4,
        3606,
        1101,
        1033,
        2,
    ]
    assert tokenized.weights == [0, 0, 0, 0, 0.5, 0.5, 0.5, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1]


def test_train_on_last_and_weight_zero(tokenizers):
    tokenizer = tokenizers["v3"]
    full = tokenize_sample(GOLDEN_SAMPLE, tokenizer)
    last = tokenize_sample(GOLDEN_SAMPLE, tokenizer, train_on="last")
    assert last.tokens == full.tokens
    assert last.weights == [0.0] * 16 + [1.0] * 4
    unweighted_first = json.loads(json.dumps(GOLDEN_SAMPLE))
    unweighted_first["messages"][2]["weight"] = 0
    assert tokenize_sample(unweighted_first, tokenizer).weights == last.weights


def test_nothing_to_train_is_a_warning_with_every_weight_0(tokenizers):
    sample = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo", "weight": 0}]}
    tokenized = tokenize_sample(sample, tokenizers["v3"])
    assert tokenized.tokens == reference_tokens(tokenizers["v3"], sample)
    assert set(tokenized.weights) == {0.0}
    _, spans, warnings = tokenize_line(json.dumps(sample).encode(), tokenizers["v3"])
    assert spans == [] and warnings == [NOTHING_TO_TRAIN]


def test_pretrain_text_trains_every_token_but_bos(tokenizers):
    tokenizer = tokenizers["tekken"]
    tokenized = tokenize_sample({"text": "Once upon a time"}, tokenizer)
    raw = tokenizer.instruct_tokenizer.tokenizer
    assert tokenized.tokens == raw.encode("Once upon a time", bos=True, eos=True)
    assert tokenized.weights == [0.0] + [1.0] * (len(tokenized.tokens) - 1)


def test_tool_calls_unsupported_by_v1_is_a_fault(tokenizers):
    with pytest.raises(SampleFault, match="v1 tokenizer has no tool-calling format"):
        tokenize_sample(CONVERSATIONS["tool_calling"], tokenizers["v1"])


def test_content_with_tool_calls_needs_v7(tokenizers):
    sample = json.loads(json.dumps(CONVERSATIONS["tool_calling"]))
    sample["messages"][-1]["content"] = "Let me check."
    with pytest.raises(SampleFault, match="both content and tool_calls"):
        tokenize_sample(sample, tokenizers["v3"])
    assert tokenize_sample(sample, tokenizers["v7"]).tokens == reference_tokens(tokenizers["v7"], sample)


# ---------------------------------------------------------------------------------------------------
# The model folder


def test_load_tokenizer_and_vocab(model_dirs):
    tokenizer = load_tokenizer(model_dirs["tekken"])
    check_tokenizer_vocab(tokenizer, read_vocab_size(model_dirs["tekken"]), model_dirs["tekken"])
    with pytest.raises(ValueError, match=r"tekken.json has 131072 tokens but .* vocab_size 32768"):
        check_tokenizer_vocab(tokenizer, 32768, model_dirs["tekken"])


def test_load_tokenizer_errors(tmp_path, model_dirs):
    with pytest.raises(FileNotFoundError, match=r"looked for tekken\*.json, tokenizer.model.v\*"):
        load_tokenizer(tmp_path)
    (tmp_path / "tekken.json").write_bytes((model_dirs["tekken"] / "tekken.json").read_bytes())
    (tmp_path / "tokenizer.model.v3").write_bytes((model_dirs["v3"] / "tokenizer.model.v3").read_bytes())
    with pytest.raises(ValueError, match="several tokenizer files"):
        load_tokenizer(tmp_path)


def test_read_vocab_size_from_hugging_face_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 131072, "hidden_size": 5120}))
    assert read_vocab_size(tmp_path) == 131072


# ---------------------------------------------------------------------------------------------------
# Lines tokenized in batches (the fast text encoders' own tests: test_text_encoders.py)


def _odd_texts(rng: random.Random) -> list[str]:
    """Texts that stress word splitting: space runs, tabs and newlines, unicode, '▁', empty ones, very long words."""
    alphabet = list("ab c  \n\t.,!é中😀1 2") + ["  ", "   ", "\n ", " \n", "\u00a0", "▁", "[INST]", "</s>"]
    words = ["a", "the", "é", "中文", "😀", "1", "22", "\n", "\t", ".", ",!", "ab\nc", "[INST]", "x" * 3000]
    texts = ["", " ", "  ", "x", " x", "x ", "Hello  world  ", "▁▁a", "".join(rng.choices("qzxjk", k=20_000))]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(1500)]
    texts += [" ".join(rng.choices(words, k=rng.randint(1, 12))) for _ in range(1500)]
    return texts


@pytest.mark.parametrize("version", ["v3", "tekken"])
def test_lines_tokenized_in_a_batch_equal_one_by_one(tokenizers, model_dirs, version):
    """tokenize_lines (what the cache uses: the texts of a batch of lines encoded together) gives each line what
    tokenize_line gives it alone, faults and warnings included, with a fresh (cold) encoder on each side."""
    rng = random.Random(2)
    texts = _odd_texts(rng)
    lines = [json.dumps(sample).encode() for sample in CONVERSATIONS.values()]
    for k in range(300):
        user, answer = rng.choice(texts), rng.choice(texts)
        messages = [{"role": "user", "content": user or "?"}, {"role": "assistant", "content": answer or "!"}]
        if k % 3 == 0:
            messages.insert(0, {"role": "system", "content": rng.choice(texts) or "s"})
        lines.append(json.dumps({"messages": messages}, ensure_ascii=k % 2 == 0).encode())
    lines[5:5] = [b"not json", b'{"text": ""}', b'{"text": "a  b\\n c"}', b'{"messages": []}', b"\n"]
    lines.append(
        json.dumps(
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "weight": 0, "content": "b"}]}
        ).encode()
    )
    batched = tokenize_lines(lines, load_tokenizer(model_dirs[version]))
    one_by_one = load_tokenizer(model_dirs[version])
    kinds = Counter()
    for line, result in zip(lines, batched, strict=True):
        try:
            expected = tokenize_line(line, one_by_one)
        except SampleFault as fault:
            kinds[fault.kind] += 1
            assert isinstance(result, SampleFault) and (result.kind, result.message) == (fault.kind, fault.message)
            # kept without the frames it was raised through, which would hold the batch in a reference cycle
            assert result.__traceback__ is None and result.__context__ is None
            continue
        assert result == expected
    # the four bad lines inserted, and whitespace-only contents drawn from the odd texts
    assert kinds["invalid_json"] == kinds["empty_text"] == kinds["no_messages"] == kinds["blank_line"] == 1
    assert set(kinds) == {"invalid_json", "empty_text", "no_messages", "blank_line", "empty_content"}
    assert sum(kinds.values()) < 20


@pytest.mark.parametrize("version", ["v1", "v3"])
def test_a_batch_of_plain_chats_costs_sentencepiece_one_call(model_dirs, version):
    """The texts the plain-chat template encodes (a system prompt joined to its user message, v1's [INST] markers,
    an answer's trailing spaces cut, consecutive messages merged) are the texts the memo is told of first: its one
    batched call learns every word, and no text of the batch needs SentencePiece again."""
    rng = random.Random(5)
    words = ["alpha", "beta", "gamma", "delta", "x1", "naïve", "end.", "(yes)", "multi\nline"]
    lines = []
    for k in range(40):
        messages = [{"role": "system", "content": " ".join(rng.choices(words, k=5))}] if k % 2 else []
        for _ in range(rng.randint(1, 3)):
            messages.append({"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(1, 8)))})
            if k % 3 == 0:  # two user messages in a row: merged into one text
                messages.append({"role": "user", "content": rng.choice(words)})
            messages.append({"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(1, 8))) + "  "})
        lines.append(json.dumps({"messages": messages}).encode())
    tokenizer = load_tokenizer(model_dirs[version])
    memo = word_memo(tokenizer)
    processor, calls = memo._processor, []
    memo._processor = type(
        "Counting",
        (),
        {
            "encode": lambda _, x, **kw: calls.append(x) or processor.encode(x, **kw),
            "__getattr__": lambda _, name: getattr(processor, name),
        },
    )()
    results = tokenize_lines(lines, tokenizer)
    assert len(calls) == 1 and isinstance(calls[0], list)  # the batch's new words, in one call
    one_by_one = load_tokenizer(model_dirs[version])
    assert results == [tokenize_line(line, one_by_one) for line in lines]
