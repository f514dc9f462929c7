"""The plain-chat template gives what mistral-common's request objects and templates give: the same tokens, spans,
faults and warnings, on every bundled tokenizer, for generated conversations of hostile text."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import mistral_common
import pytest
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.instruct import InstructTokenizerV3
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from finetune.data import SampleFault
from finetune.data.model_tokenizer import load_tokenizer
from finetune.data.plain_chat import PlainChatTemplate, is_plain_chat
from finetune.data.tokenize import _sample_encoder, tokenize_line

BUNDLED = {
    "tokenizer.model.v1": "v1",
    "mistral_instruct_tokenizer_240216.model.v2": "v2",
    "mistral_instruct_tokenizer_240323.model.v3": "v3",
    "mistral_instruct_tokenizer_241114.model.v7": "v7",
    "mistral_instruct_tokenizer_241114.model.v7m1": "v7",
    "tekken_240718.json": "v3",
    "tekken_240911.json": "v3",
}


def load_bundled(name: str, folder: Path) -> MistralTokenizer:
    """The bundled file as a model folder's tokenizer, loaded as a run loads it (load_tokenizer: Tekken files through
    tekken_loading)."""
    folder.mkdir(exist_ok=True)
    shutil.copy(Path(mistral_common.__file__).parent / "data" / name, folder / name)
    return load_tokenizer(folder)


@pytest.fixture(scope="module", params=list(BUNDLED))
def bundled(request, tmp_path_factory):
    """(file name, tokenizer with the plain-chat template, tokenizer of the same file with mistral-common's path)"""
    folder = tmp_path_factory.mktemp("tokenizer")
    fast, slow = load_bundled(request.param, folder), load_bundled(request.param, folder)
    _sample_encoder(slow).plain_chat = None
    return request.param, fast, slow


HOSTILE_TEXTS = [
    " ",
    "  ",
    "\t",
    "\n",
    "\n\n",
    " lead",
    "trail ",
    "  both  ",
    "a  b   c",
    "tab\there",
    "line\nbreak",
    "nbsp\u00a0x",
    "ideographic\u3000space",
    "line\u2028separator",
    "next\u0085line",
    "e\u0301 combining",
    "😀 emoji 👩‍👩‍👧",
    "▁",
    "▁▁a ▁b",
    "[INST]",
    "[/INST] </s> <s>",
    "[SYSTEM_PROMPT]",
    "x" * 3000,
    "中文 text",
    "1 2 3",
    ".,!?",
    "Hello",
    "the",
    "",
]


def random_text(rng: random.Random) -> str:
    """Text made of hostile pieces, not blank (blank content is a fault of check_sample, before any template)."""
    text = "".join(rng.choice(HOSTILE_TEXTS) for _ in range(rng.randint(1, 5)))
    return text if text.strip() else text + rng.choice(["x", "▁", "😀", "[INST]"])


def random_plain_chat(rng: random.Random) -> dict:
    """A usable conversation: system prompts anywhere, runs of user or assistant messages, weights absent, 0, 0.5,
    1 or 1.0, ending with an assistant message."""
    messages = [{"role": "system", "content": random_text(rng)} for _ in range(rng.choice([0, 0, 1, 2]))]
    messages.append({"role": "user", "content": random_text(rng)})
    for _ in range(rng.randint(0, 8)):
        messages.append({"role": rng.choice(["user", "assistant", "assistant", "system"]), "content": random_text(rng)})
    messages.append({"role": "assistant", "content": random_text(rng)})
    for m in messages:
        if m["role"] == "assistant" and rng.random() < 0.5:
            m["weight"] = rng.choice([0, 0.5, 1, 1.0])
    return {"messages": messages}


def test_every_bundled_tokenizer_uses_its_written_out_template(bundled):
    name, fast, _ = bundled
    template = _sample_encoder(fast).plain_chat
    assert isinstance(template, PlainChatTemplate) and template.version == BUNDLED[name]


def test_generated_conversations_equal_mistral_common(bundled):
    """tokenize_line with and without the plain-chat template: same tokens, spans and warnings, for train_on "all"
    and "last"; and the same faults for lines that are not usable."""
    _, fast, slow = bundled
    rng = random.Random(7)
    samples = [random_plain_chat(rng) for _ in range(300)]
    samples += [  # faults: the checks before any template
        {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
        {"messages": [{"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": " \u3000 "}]},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 2}]},
        {"messages": [{"role": "system", "content": "s"}]},
    ]
    samples.append({**samples[0], "wieght": 1})  # an unknown key: a warning
    samples.append({**samples[1], "tools": []})  # no tools declared: a plain chat too
    results = {"tokens": 0, "faults": 0, "merged": 0}
    for sample in samples:
        line = json.dumps(sample, ensure_ascii=False).encode()
        for train_on in ("all", "last"):
            try:
                expected = tokenize_line(line, slow, train_on)
            except SampleFault as fault:
                with pytest.raises(SampleFault) as raised:
                    tokenize_line(line, fast, train_on)
                assert (raised.value.kind, raised.value.message) == (fault.kind, fault.message)
                results["faults"] += 1
                continue
            assert tokenize_line(line, fast, train_on) == expected, sample
            results["tokens"] += 1
        roles = [m["role"] for m in sample["messages"]]
        results["merged"] += any(a == b for a, b in zip(roles, roles[1:]))
    assert results["faults"] == 2 * 5
    assert results["tokens"] == 2 * 302
    assert results["merged"] > 100  # consecutive messages of one role were common


def reference_messages(sample: dict) -> list:
    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    return [kinds[m["role"]](content=m["content"]) for m in sample["messages"]]


def test_generated_conversations_equal_encode_chat_completion(bundled):
    """Tokens equal MistralTokenizer.encode_chat_completion where it applies: it knows no weights (it would merge
    consecutive assistant messages of different weights), and its validator refuses a system message after an
    assistant message (which tailor takes, with a warning), so the conversations here have neither."""
    _, fast, _ = bundled
    rng = random.Random(8)
    compared = 0
    for _ in range(200):
        sample = random_plain_chat(rng)
        roles = [m["role"] for m in sample["messages"]]
        sample["messages"] = [
            {"role": m["role"], "content": m["content"]}
            for i, m in enumerate(sample["messages"])
            if m["role"] != "system" or "assistant" not in roles[:i]
        ]
        tokens, spans, _ = tokenize_line(json.dumps(sample).encode(), fast)
        request = ChatCompletionRequest(messages=reference_messages(sample))
        assert tokens.tolist() == fast.encode_chat_completion(request).tokens, sample
        assert spans and all(weight == 1.0 for _, _, weight in spans)
        compared += 1
    assert compared == 200


def test_plain_chat_spans_of_a_known_conversation(tokenizers):
    """Merged assistant messages of one weight make one span; a change of weight starts another; "last" keeps the
    last merged turn."""
    sample = {
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "a", "weight": 0.5},
            {"role": "assistant", "content": "b", "weight": 0.5},
            {"role": "assistant", "content": "c"},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "d", "weight": 0},
            {"role": "assistant", "content": "e", "weight": 0.0},
        ]
    }
    template = _sample_encoder(tokenizers["v3"]).plain_chat
    turns, system_prompt = template.merge(sample["messages"])
    assert system_prompt is None
    assert turns == [
        ("user", "Hi", None),
        ("assistant", "a\n\nb", 0.5),
        ("assistant", "c", None),
        ("user", "Bye", None),
        ("assistant", "d\n\ne", 0),
    ]
    tokens, spans = template.encode(sample["messages"], "all")
    # <s> [INST] ▁Hi [/INST] ▁a <0x0A> <0x0A> b </s> ▁c </s> [INST] ▁By e [/INST] ▁d <0x0A> <0x0A> e </s>
    assert tokens.tolist() == [
        1,
        3,
        16127,
        4,
        1032,
        781,
        781,
        29494,
        2,
        1045,
        2,
        3,
        3231,
        29474,
        4,
        1049,
        781,
        781,
        29474,
        2,
    ]
    assert spans == [(4, 9, 0.5), (9, 11, 1.0)]
    assert template.encode(sample["messages"], "last") == (tokens, [])


def test_system_prompt_placement(tokenizers):
    """v1 puts the system prompts before the first user message, v3 before the last, v7 where they are; a system
    message between two user messages keeps them apart (two [INST] blocks), as mistral-common's normaliser does."""
    messages = [
        {"role": "system", "content": "S1"},
        {"role": "user", "content": "u1"},
        {"role": "system", "content": "S2"},
        {"role": "user", "content": "u2"},
        {"role": "assistant", "content": "a"},
    ]
    for version in ("v1", "v3", "v7", "tekken"):
        template = _sample_encoder(tokenizers[version]).plain_chat
        turns, system_prompt = template.merge(messages)
        if version == "v7":
            assert system_prompt is None
            assert [role for role, _, _ in turns] == ["system", "user", "system", "user", "assistant"]
        else:
            assert system_prompt == "S1\n\nS2"
            assert [role for role, _, _ in turns] == ["user", "user", "assistant"]
        request = ChatCompletionRequest(messages=reference_messages({"messages": messages}))
        assert (
            template.encode(messages, "all")[0].tolist() == tokenizers[version].encode_chat_completion(request).tokens
        )


def test_other_conversations_take_mistral_common_path(tokenizers):
    tool_call = {"id": "call00001", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    tools = [{"type": "function", "function": {"name": "f", "description": "", "parameters": {}}}]
    plain = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    assert is_plain_chat(plain)
    assert is_plain_chat({**plain, "tools": []})
    assert not is_plain_chat({**plain, "tools": tools})
    calling = {"messages": [plain["messages"][0], {"role": "assistant", "tool_calls": [tool_call]}]}
    assert not is_plain_chat(calling)
    answered = {"messages": calling["messages"] + [{"role": "tool", "tool_call_id": "call00001", "content": "1"}]}
    assert not is_plain_chat(answered)


def test_template_that_fails_a_probe_is_not_used(monkeypatch, tmp_path):
    """The probes run at load time: a template that differs from mistral-common on one of them is left unused."""
    right = PlainChatTemplate.encode

    def wrong_on_weights(self, messages, train_on):
        tokens, spans = right(self, messages, train_on)
        return tokens, [(begin, end, 1.0) for begin, end, _ in spans]

    monkeypatch.setattr(PlainChatTemplate, "encode", wrong_on_weights)
    v3 = "mistral_instruct_tokenizer_240323.model.v3"
    assert _sample_encoder(load_bundled(v3, tmp_path)).plain_chat is None
    monkeypatch.setattr(PlainChatTemplate, "encode", right)
    assert _sample_encoder(load_bundled(v3, tmp_path)).plain_chat is not None


def test_no_template_for_a_subclass_of_a_written_out_version(tokenizers):
    """A subclass may change the template: only the exact classes written out get one."""
    instruct = tokenizers["v3"].instruct_tokenizer
    normalizer = tokenizers["v3"]._instruct_request_normalizer
    subclassed = type("InstructTokenizerV3Variant", (InstructTokenizerV3,), {})
    variant = object.__new__(subclassed)
    variant.__dict__.update(instruct.__dict__)
    assert PlainChatTemplate.for_tokenizer(variant, normalizer) is None
