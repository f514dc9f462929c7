"""load_tekken makes what MistralTokenizer.from_file makes of a Tekken file, token for token, vocabulary included."""

from __future__ import annotations

import json
from pathlib import Path

import mistral_common
import pytest
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.base import SpecialTokens
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from mistral_common.tokens.tokenizers.tekken import Tekkenizer

import finetune.data.tekken_loading as tekken_loading
from finetune.data.tekken_loading import TekkenizerVocabOnUse, load_tekken

DATA = Path(mistral_common.__file__).parent / "data"
HOSTILE = [
    "",
    "   ",
    "\t\tx\n\n y ",
    " lead and trail ",
    "a\u00a0b\u3000c\u2028d\u0085e",
    "e\u0301 n\u0303",
    "emoji 😀👍🏽 and ▁ marks ▁▁",
    "[INST] not a control token [/INST] </s> <s>",
    "w" * 3000,
    "Ordinary words, numbers 12345 and punctuation!?",
]


def conversations() -> list[ChatCompletionRequest]:
    requests = []
    for i, text in enumerate(HOSTILE):
        messages = [SystemMessage(content="Be brief " + text)] if i % 2 else []
        messages += [UserMessage(content=text or "q"), AssistantMessage(content=text or "a")]
        messages += [UserMessage(content="again" + text), AssistantMessage(content=text + "!")]
        requests.append(ChatCompletionRequest(messages=messages))
    return requests


def tekken_file(tmp_path: Path, name: str, version: str) -> Path:
    """A bundled Tekken file declaring `version` (with the special tokens the versions after v7 must list)."""
    data = json.loads((DATA / name).read_text())
    data["config"]["version"] = version
    if version not in ("v3", "v7"):
        tokens = [
            {**token, "token_str": str(getattr(token["token_str"], "value", token["token_str"]))}
            for token in Tekkenizer.DEPRECATED_SPECIAL_TOKENS
        ]
        named = {token["token_str"] for token in tokens}
        for special in SpecialTokens:  # the control tokens of later versions ([ARGS], [THINK], ...) after those
            if special.value not in named:
                tokens.append({"rank": len(tokens), "token_str": special.value, "is_control": True})
        data["special_tokens"] = tokens
        data.pop("image", None)  # the deprecated image key is refused after v11; image support is tested on v3
    path = tmp_path / f"tekken_{version}.json"
    path.write_text(json.dumps(data))
    return path


def assert_same(ours: MistralTokenizer, stock: MistralTokenizer) -> None:
    for part in ("instruct_tokenizer", "_chat_completion_request_validator", "_instruct_request_normalizer"):
        assert type(getattr(ours, part)) is type(getattr(stock, part))
    assert ours.mode == stock.mode == ValidationMode.finetuning
    ours_raw, stock_raw = ours.instruct_tokenizer.tokenizer, stock.instruct_tokenizer.tokenizer
    assert (ours_raw.version, ours_raw.n_words, ours_raw.file_path) == (
        stock_raw.version,
        stock_raw.n_words,
        stock_raw.file_path,
    )
    for encoder in ("image_encoder", "audio_encoder"):
        assert (getattr(ours.instruct_tokenizer, encoder, None) is None) == (
            getattr(stock.instruct_tokenizer, encoder, None) is None
        )
    for request in conversations():
        assert ours.encode_chat_completion(request).tokens == stock.encode_chat_completion(request).tokens
    for text in HOSTILE:
        assert ours_raw.encode(text, bos=True, eos=True) == stock_raw.encode(text, bos=True, eos=True)


@pytest.mark.parametrize("name", ["tekken_240718.json", "tekken_240911.json"])
def test_bundled_tekken_files_load_as_from_file_loads_them_vocabulary_included(name):
    ours = load_tekken(DATA / name, ValidationMode.finetuning)
    stock = MistralTokenizer.from_file(str(DATA / name), mode=ValidationMode.finetuning)
    assert isinstance(ours.instruct_tokenizer.tokenizer, TekkenizerVocabOnUse)
    assert "_vocab" not in vars(ours.instruct_tokenizer.tokenizer)  # not made at load
    assert_same(ours, stock)
    ours_raw, stock_raw = ours.instruct_tokenizer.tokenizer, stock.instruct_tokenizer.tokenizer
    assert ours_raw.vocab() == stock_raw.vocab() and len(ours_raw.vocab()) == 131072
    assert [ours_raw.id_to_piece(i) for i in (0, 1, 2, 999, 1000, 1234, 131071)] == [
        stock_raw.id_to_piece(i) for i in (0, 1, 2, 999, 1000, 1234, 131071)
    ]


@pytest.mark.parametrize("version", ["v7", "v11", "v13"])
def test_later_tekken_versions_get_the_instruct_tokenizer_from_file_gives_them(tmp_path, version):
    path = tekken_file(tmp_path, "tekken_240718.json", version)
    ours = load_tekken(path, ValidationMode.finetuning)
    assert isinstance(ours.instruct_tokenizer.tokenizer, TekkenizerVocabOnUse)
    assert_same(ours, MistralTokenizer.from_file(str(path), mode=ValidationMode.finetuning))


def test_a_version_missing_from_the_table_is_loaded_by_from_file(tmp_path, monkeypatch):
    monkeypatch.setattr(tekken_loading, "INSTRUCT_TOKENIZERS", {})
    ours = load_tekken(DATA / "tekken_240911.json", ValidationMode.finetuning)
    assert type(ours.instruct_tokenizer.tokenizer) is Tekkenizer
    assert_same(ours, MistralTokenizer.from_file(str(DATA / "tekken_240911.json"), mode=ValidationMode.finetuning))
