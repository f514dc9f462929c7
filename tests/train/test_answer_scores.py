"""Scores of generated eval answers, against real tokenizers' tool-call format and the shipped demo data."""

import json
from pathlib import Path

import pytest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from finetune.data import tokenize_sample
from finetune.data.config import DataSource
from finetune.data.model_tokenizer import load_tokenizer
from finetune.training.answer_scores import (
    TOOL_CALL_SCORES,
    Answer,
    Reference,
    read_answer,
    score_answer,
    score_rates,
)
from finetune.training.eval_generations import read_eval_chats
from finetune.training.json_schema import schema_problem
from model.tokenizer_files import TOKENIZER_FILES, tokenizer_path

REPO = Path(__file__).resolve().parents[2]
TOOLS_EVAL = REPO / "data/demo/tools_eval.jsonl"


def tokenizer_folder(tmp_path: Path, version: str) -> MistralTokenizer:
    (tmp_path / version).mkdir()
    (tmp_path / version / TOKENIZER_FILES[version].filename).write_bytes(tokenizer_path(version).read_bytes())
    return load_tokenizer(tmp_path / version)


@pytest.mark.parametrize("version", ["v3", "v7", "tekken"])
def test_the_reference_answer_in_training_tokens_scores_right_and_a_wrong_one_does_not(tmp_path, version):
    tokenizer = tokenizer_folder(tmp_path, version)
    chats, passed_over = read_eval_chats({"eval": [DataSource(str(TOOLS_EVAL))]}, 3, tokenizer)
    assert [c.line for c in chats] == [1, 2, 3] and not passed_over[f"eval:{TOOLS_EVAL}"]
    chat = chats[0]
    sample = json.loads(TOOLS_EVAL.read_text().splitlines()[0])
    trained = tokenize_sample(sample, tokenizer).tokens
    assert trained[: len(chat.prompt_tokens)] == chat.prompt_tokens  # the prompt is training's template
    answer = read_answer(trained[len(chat.prompt_tokens) : -1], tokenizer)  # the trained answer, EOS left out
    assert answer.text.startswith("[TOOL_CALLS]")
    assert score_answer(answer, chat.reference) == dict.fromkeys(TOOL_CALL_SCORES, True)
    raw = tokenizer.instruct_tokenizer.tokenizer
    as_text = read_answer(raw.encode(answer.tool_call_payload, bos=False, eos=False), tokenizer)  # no control token
    assert as_text.tool_call_payload is None and not any(score_answer(as_text, chat.reference).values())


def scores(payload: str | None, reference: Reference) -> dict:
    return score_answer(Answer(f"[TOOL_CALLS]{payload}", payload), reference)


def test_each_tool_call_score_fails_on_its_own_fault():
    functions = json.loads(TOOLS_EVAL.read_text().splitlines()[0])["tools"]
    reference = Reference(
        None,
        [{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}],
        {t["function"]["name"]: t["function"]["parameters"] for t in functions},
    )
    right = '[{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}, "id": "zzzzzzzzz"}]'
    cases = {  # payload: (parses, known function, arguments valid, name match, arguments match)
        right: (True, True, True, True, True),
        right.replace("Oslo", "Lima"): (True, True, True, True, False),
        right.replace("get_weather", "get_time"): (True, True, True, False, False),  # {"city"} fits get_time
        right.replace('"celsius"', '"kelvin"'): (True, True, False, True, False),  # not in the enum
        right.replace(', "unit": "celsius"', ""): (True, True, False, True, False),  # a required key missing
        right.replace('"Oslo"', "7"): (True, True, False, True, False),  # not a string
        right.replace("get_weather", "get_news"): (True, False, False, False, False),
        '[{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\", \\"unit\\": \\"celsius\\"}"}]': (True,) * 5,
        right[:-3]: (False,) * 5,  # cut short
        '{"name": "get_time", "arguments": {"city": "Oslo"}}': (True, True, True, False, False),  # no list around it
        '[{"name": "get_weather"}]': (False,) * 5,  # no arguments
        '[{"arguments": {}}]': (False,) * 5,
    }
    for payload, expected in cases.items():
        assert tuple(scores(payload, reference).values()) == expected, payload


def test_text_answers_match_exactly_or_after_normalising_whitespace_and_case():
    reference = Reference("Good night, Alice!", None, {})
    assert score_answer(Answer("Good night, Alice!", None), reference) == dict(exact_match=True, normalised_match=True)
    assert score_answer(Answer(" good  NIGHT,\nalice! ", None), reference) == dict(
        exact_match=False, normalised_match=True
    )
    assert score_answer(Answer("Good night, Alice", None), reference) == dict(exact_match=False, normalised_match=False)


def test_rates_per_kind_of_answer():
    text = [dict(exact_match=True, normalised_match=True), dict(exact_match=False, normalised_match=True)]
    assert score_rates(text) == dict(answers=2, tool_call_answers=0, exact_match=0.5, normalised_match=1.0)
    call = dict.fromkeys(TOOL_CALL_SCORES, True)
    rates = score_rates(text[:1] + [call] * 3 + [{**call, "tool_call_arguments_match": False}])
    assert rates == dict(
        answers=1,
        tool_call_answers=4,
        exact_match=1.0,
        normalised_match=1.0,
        **dict.fromkeys(TOOL_CALL_SCORES[:-1], 1.0),
        tool_call_arguments_match=0.75,
    )
    assert score_rates([]) == dict(answers=0, tool_call_answers=0)


def test_the_json_schema_subset_of_function_parameters():
    schema = {
        "type": "object",
        "properties": {
            "n": {"type": "integer"},
            "x": {"type": ["number", "null"]},
            "tags": {"type": "array", "items": {"type": "string"}},
            "mode": {"enum": ["a", "b"]},
            "either": {"anyOf": [{"type": "string"}, {"type": "boolean"}]},
        },
        "required": ["n"],
        "additionalProperties": False,
    }
    assert schema_problem({"n": 3, "x": None, "tags": ["a"], "mode": "b", "either": True}, schema) is None
    assert schema_problem({"n": 3.0}, schema) is None  # JSON has one number type
    problems = {
        json.dumps({"n": True}): "arguments.n is a boolean, not integer",
        json.dumps({"n": 1.5}): "arguments.n is a number, not integer",
        json.dumps({}): "arguments lacks the required key 'n'",
        json.dumps({"n": 1, "tags": ["a", 2]}): "arguments.tags[1] is an integer, not string",
        json.dumps({"n": 1, "mode": "c"}): "arguments.mode is 'c', not one of ['a', 'b']",
        json.dumps({"n": 1, "either": 3}): "arguments.either fits none of the anyOf schemas",
        json.dumps({"n": 1, "other": 3}): "arguments has the key 'other', which the schema does not allow",
        json.dumps([1]): "arguments is an array, not object",
    }
    for value, problem in problems.items():
        assert schema_problem(json.loads(value), schema) == problem
    assert schema_problem({"anything": 1}, {}) is None  # no keyword: anything fits


def test_chats_that_cannot_be_answered_are_counted_not_answered(tmp_path):
    tokenizer = tokenizer_folder(tmp_path, "v3")
    lines = [
        {"text": "pretraining text"},
        "{not json",
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"},
            ]
        },
        {"messages": [{"role": "user", "content": "again"}, {"role": "assistant", "content": "hello again"}]},
        {"messages": [{"role": "user", "content": "more"}, {"role": "assistant", "content": "not read"}]},
    ]
    path = tmp_path / "eval.jsonl"
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    chats, passed_over = read_eval_chats({"retain": [DataSource(str(path))]}, 2, tokenizer)
    assert [(c.group, c.line, c.reference.text) for c in chats] == [
        ("retain", 3, "hello"),
        ("retain", 5, "hello again"),
    ]
    assert chats[0].prompt == [{"role": "user", "content": "hi"}]
    assert passed_over[f"retain:{path}"] == {
        "not a chat ending in an assistant answer": 1,  # the text
        "bad line": 2,  # not JSON; a conversation ending with the user (nothing to train)
    }
