"""vLLM serves what tailor writes, and answers with tailor's tokens: greedy replies token for token equal to
`tailor chat`'s generation, and the chat template (with tools) equal to training's tokens.

Covered, one engine each (file order keeps each engine's tests together):
- dense mistral-7b, v3 tokenizer: the `tailor merge` folder loaded as a native Mistral folder (tokenizer_mode,
  config_format and load_format "mistral"); the `tailor export-hf` folder of its base with the `tailor export-peft`
  adapter (enable_lora, LoRARequest), answering without the adapter (the base) and with it; an adapter on the output
  head refused by vLLM;
- sliding-window mistral-7b-v0.1, Tekken tokenizer: the native base folder, with a prompt longer than the window;
- Mixtral, Tekken: the `tailor export-hf` folder of the merged model (vLLM 0.32 reads no native Mixtral folder:
  its Mistral-format config reader leaves num_local_experts unset).
The chat-template check runs on v3 (SentencePiece) and Tekken.
"""

import copy
import json

import pytest
from conftest import CONVERSATION, MAX_TOKENS, PROJECTIONS

from finetune.cli import main

vllm = pytest.importorskip("vllm")
from vllm.lora.request import LoRARequest  # noqa: E402

MISTRAL_FORMAT = {"tokenizer_mode": "mistral", "config_format": "mistral", "load_format": "mistral"}
WITH_LORA = {"tokenizer_mode": "mistral", "enable_lora": True, "max_lora_rank": 8}
GREEDY = vllm.SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)


def vllm_replies(llm, prompts, lora_request=None) -> list[list[int]]:
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, lora_request=lora_request)
    return [list(o.outputs[0].token_ids) for o in outputs]


def without_eos(tokens: list[int], eos_id: int = 2) -> list[int]:
    """vLLM's reply includes the EOS that ended it; tailor's does not."""
    return tokens[:-1] if tokens and tokens[-1] == eos_id else tokens


CONVERSATIONS = [CONVERSATION, [{"role": "user", "content": "Hello"}]]

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TOOL_CHAT = {
    "tools": [WEATHER_TOOL],
    "messages": [
        {"role": "system", "content": "Be helpful."},
        {"role": "user", "content": "What is the weather in Paris?"},
        {
            "role": "assistant",
            "tool_calls": [
                {
                    "id": "a1b2c3d4e",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "a1b2c3d4e", "content": json.dumps({"celsius": 21})},
        {"role": "assistant", "content": "It is 21 degrees in Paris."},
        {"role": "user", "content": "And tomorrow?"},
        {"role": "assistant", "content": "I cannot tell."},
    ],
}


def assert_vllm_chat_tokens_equal_tailor_tokenize(llm, model_dir, tmp_path):
    """vLLM's tokens of a chat with tools (its `mistral` tokenizer mode) up to the last assistant turn are the tokens
    `tailor tokenize` trains on, up to where that turn's trained tokens begin."""
    sample = tmp_path / "chat.jsonl"
    sample.write_text(json.dumps(TOOL_CHAT) + "\n")
    tokens_file = tmp_path / "tokens.jsonl"
    status = main(["tokenize", str(sample), "--model", str(model_dir), "--train-on", "last", "-o", str(tokens_file)])
    record = json.loads(tokens_file.read_text())
    assert status == 0, record
    last_turn = next(i for i, weight in enumerate(record["weights"]) if weight > 0)
    # a copy: vLLM's chat parses the tool calls' JSON arguments in the messages it is given, in place
    messages, tools = copy.deepcopy(TOOL_CHAT["messages"][:-1]), copy.deepcopy(TOOL_CHAT["tools"])
    served = llm.chat(messages, vllm.SamplingParams(max_tokens=1), tools=tools)[0]
    assert served.prompt_token_ids == record["tokens"][:last_turn]
    assert record["tokens"][last_turn:] == [*served_tokens(llm, "I cannot tell."), 2]


def served_tokens(llm, text: str) -> list[int]:
    return llm.get_tokenizer().encode(text, add_special_tokens=False)


def test_native_merged_folder(trained, vllm_engine, tailor_replies):
    root = trained("mistral-7b", "v3")
    prompts, expected = tailor_replies(root / "base", root / "checkpoint", CONVERSATIONS)
    llm = vllm_engine(root / "merged", **MISTRAL_FORMAT)
    assert [without_eos(r) for r in vllm_replies(llm, prompts)] == expected
    # and through vLLM's own chat template: the same prompt, the same reply
    chat = llm.chat(CONVERSATION, GREEDY)[0]
    assert chat.prompt_token_ids == prompts[0]
    assert without_eos(list(chat.outputs[0].token_ids)) == expected[0]


def test_chat_template_with_tools_v3(trained, vllm_engine, tmp_path):
    root = trained("mistral-7b", "v3")
    assert_vllm_chat_tokens_equal_tailor_tokenize(
        vllm_engine(root / "merged", **MISTRAL_FORMAT), root / "base", tmp_path
    )


def test_hf_base_folder_with_peft_adapter(trained, vllm_engine, tailor_replies):
    root = trained("mistral-7b", "v3")
    llm = vllm_engine(root / "hf_base", **WITH_LORA)
    prompts, base_replies = tailor_replies(root / "base", None, CONVERSATIONS)
    _, adapted_replies = tailor_replies(root / "base", root / "checkpoint", CONVERSATIONS)
    assert base_replies != adapted_replies  # the adapter changes the answers, so the comparison below means something
    assert [without_eos(r) for r in vllm_replies(llm, prompts)] == base_replies
    adapter = LoRARequest("tailor", 1, str(root / "peft"))
    assert [without_eos(r) for r in vllm_replies(llm, prompts, adapter)] == adapted_replies


def test_vllm_refuses_an_adapter_of_the_output_head(trained, vllm_engine, capsys):
    """Why `tailor export-peft` warns about `output` (tests/after/test_peft_format.py checks that it does)."""
    root = trained("mistral-7b", "v3", targets=(*PROJECTIONS, "output"))
    assert "lm_head" in json.loads((root / "peft" / "adapter_config.json").read_text())["target_modules"]
    llm = vllm_engine(
        trained("mistral-7b", "v3") / "hf_base", tokenizer_mode="mistral", enable_lora=True, max_lora_rank=8
    )
    with pytest.raises(Exception, match="lm_head"):
        vllm_replies(llm, [[1, 3, 1000, 4]], LoRARequest("with-head", 2, str(root / "peft")))


def test_sliding_window_native_folder(trained, vllm_engine, tailor_replies):
    root = trained("mistral-7b-v0.1", "tekken")
    long_question = [{"role": "user", "content": "Count the waves of the sea, one by one, until the wind stops."}]
    prompts, expected = tailor_replies(root / "base", None, [long_question, *CONVERSATIONS])
    assert len(prompts[0]) > 8  # longer than the tiny model's window of 8
    llm = vllm_engine(root / "base", **MISTRAL_FORMAT)
    assert [without_eos(r) for r in vllm_replies(llm, prompts)] == expected


def test_chat_template_with_tools_tekken(trained, vllm_engine, tmp_path):
    root = trained("mistral-7b-v0.1", "tekken")
    llm = vllm_engine(root / "base", **MISTRAL_FORMAT)
    assert_vllm_chat_tokens_equal_tailor_tokenize(llm, root / "base", tmp_path)


def test_mixtral_hf_merged_folder(trained, vllm_engine, tailor_replies):
    root = trained("mixtral-8x7b", "tekken")
    prompts, expected = tailor_replies(root / "merged", None, CONVERSATIONS)
    llm = vllm_engine(root / "hf_merged", tokenizer_mode="mistral")
    assert [without_eos(r) for r in vllm_replies(llm, prompts)] == expected
