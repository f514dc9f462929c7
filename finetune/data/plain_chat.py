"""Plain chats templated directly: system, user and assistant messages of text, no tools, for the v1, v2, v3
(SentencePiece or Tekken) and v7 instruct tokenizers.

mistral-common's path (finetune/data/tokenize.py's `_SampleEncoder`) builds pydantic message and request objects,
normalises the request and calls each message's template: about a fifth of a build. `PlainChatTemplate` merges the
messages as mistral-common's request normaliser does and encodes the same strings in the same order, from the control
tokens' ids and the fast text encoder. What it copies of mistral-common (1.13, pinned): the normaliser's merging
rules and join string (`_msg_join_str`), the "\\n\\n" between a system prompt and its user message, the trailing
spaces an assistant message loses from v2 on, and where each version puts the system prompt. It is used for a
tokenizer only when `PROBE_CHATS` give the same tokens and spans both ways at load time (so a change in
mistral-common makes it fall back, slower, never wrong); the tests compare both paths on every bundled tokenizer with
many generated conversations of hostile text.
"""

from __future__ import annotations

from array import array

from mistral_common.protocol.instruct.normalize import InstructRequestNormalizer, InstructRequestNormalizerV7
from mistral_common.tokens.tokenizers.instruct import (
    InstructTokenizerV1,
    InstructTokenizerV2,
    InstructTokenizerV3,
    InstructTokenizerV7,
)

from finetune.data.text_encoders import PACKED

WeightSpan = tuple[int, int, float]  # tokens[begin:end] have this loss weight; tokens outside every span have 0


def is_plain_chat(sample: dict) -> bool:
    """Whether a checked conversation is system, user and assistant text only: no tools, tool calls or tool messages.

    (check_sample has checked that every content of such a conversation is a string that is not blank.)
    """
    return not sample.get("tools") and all(m["role"] != "tool" and not m.get("tool_calls") for m in sample["messages"])


# The plain-chat template of each instruct tokenizer class written out below, and the request normaliser it copies.
_PLAIN_CHAT_VERSIONS = {
    InstructTokenizerV1: ("v1", InstructRequestNormalizer),
    InstructTokenizerV2: ("v2", InstructRequestNormalizer),
    InstructTokenizerV3: ("v3", InstructRequestNormalizer),
    InstructTokenizerV7: ("v7", InstructRequestNormalizerV7),
}


class PlainChatTemplate:
    """mistral-common's chat template of plain chats for v1, v2, v3 (SentencePiece or Tekken) and v7, written out.

    v1: `[INST] text [/INST]` as text, the system prompt before the first user message; v2 and v3: [INST] and
    [/INST] control tokens, the system prompt before the last user message; v7: each system message in place,
    between [SYSTEM_PROMPT] and [/SYSTEM_PROMPT]. An assistant message is its text (from v2 with trailing spaces
    removed), then EOS.

    Args:
        version: "v1", "v2", "v3" or "v7".
        instruct: mistral-common's instruct tokenizer.
        normalizer: its request normaliser, whose join string is copied.
    """

    def __init__(self, version: str, instruct, normalizer):
        raw = instruct.tokenizer
        self.version = version
        self.encode_text = raw.encode_text
        self.bos, self.eos = raw.bos_id, raw.eos_id
        self.join = normalizer._msg_join_str  # what merged messages and system prompts are joined with
        if version != "v1":
            self.begin_inst, self.end_inst = instruct.BEGIN_INST, instruct.END_INST
        if version == "v7":
            self.begin_system, self.end_system = instruct.BEGIN_SYSTEM, instruct.END_SYSTEM

    @classmethod
    def for_tokenizer(cls, instruct, normalizer) -> PlainChatTemplate | None:
        """The template for this instruct tokenizer, or None when it has none written out here.

        None when its class or its normaliser is not exactly one written out here (a subclass may change the
        template).
        """
        version, normalizer_class = _PLAIN_CHAT_VERSIONS.get(type(instruct), (None, None))
        if version is None or type(normalizer) is not normalizer_class or normalizer._model_settings_builder:
            return None
        return cls(version, instruct, normalizer)

    def merge(self, messages: list[dict]) -> tuple[list[tuple[str, str, float | None]], str | None]:
        """Merge messages into turns as mistral-common's normaliser does.

        Consecutive messages of one role (for the assistant, of one weight too) join into one turn; system messages
        stay in place (v7) or join into one system prompt, still ending the run of turns they interrupt.

        Returns:
            The (role, text, weight) turns, and the system prompt (None when there is none).
        """
        turns: list[tuple[str, list[str], float | None]] = []
        system_texts: list[str] = []
        previous = None
        for m in messages:
            role, text = m["role"], m["content"]
            weight = m.get("weight") if role == "assistant" else None
            if role == "system":
                if self.version == "v7":
                    turns.append((role, [text], None))
                else:
                    system_texts.append(text)
            elif (role, weight) == previous:
                turns[-1][1].append(text)
            else:
                turns.append((role, [text], weight))
            previous = role, weight
        system_prompt = self.join.join(system_texts) if system_texts else None
        return [(role, self.join.join(texts), weight) for role, texts, weight in turns], system_prompt

    def _turn_texts(self, messages: list[dict]) -> list[tuple[str, str, float | None]]:
        """The (role, text, weight) turns with each text as the template encodes it: the system prompt before its
        user message, v1's [INST] markers as text, an assistant's trailing spaces removed (v2 on)."""
        turns, system_prompt = self.merge(messages)
        users = [i for i, (role, _, _) in enumerate(turns) if role == "user"]
        system_prompt_turn = users[0] if self.version == "v1" else users[-1]
        for i, (role, text, weight) in enumerate(turns):
            if role == "user":
                if system_prompt and i == system_prompt_turn:
                    text = system_prompt + "\n\n" + text
                if self.version == "v1":
                    text = f"[INST] {text} [/INST]"
            elif role == "assistant" and self.version != "v1":
                text = text.rstrip(" ")
            turns[i] = role, text, weight
        return turns

    def texts(self, messages: list[dict]) -> list[str]:
        """The texts `encode` asks the text encoder for, in order (for its `prepare`)."""
        return [text for _, text, _ in self._turn_texts(messages)]

    def encode(self, messages: list[dict], train_on: str) -> tuple[array, list[WeightSpan]]:
        """Tokens (PACKED ids) and trained spans of a plain chat (`is_plain_chat`), as mistral-common gives them.

        The same as `encode_chat_with_mistral_common`'s.
        """
        turns = self._turn_texts(messages)
        last_assistant = max(i for i, (role, _, _) in enumerate(turns) if role == "assistant")
        text_ids = self.encode_text.packed
        tokens = array(PACKED, [self.bos])
        spans = []
        for i, (role, text, weight) in enumerate(turns):
            if role == "user":  # v1's [INST] markers are in its text
                if self.version != "v1":
                    tokens.append(self.begin_inst)
                tokens.frombytes(text_ids(text))
                if self.version != "v1":
                    tokens.append(self.end_inst)
            elif role == "assistant":
                begin = len(tokens)
                tokens.frombytes(text_ids(text))
                tokens.append(self.eos)
                weight = 1.0 if weight is None else float(weight)
                if weight and (train_on == "all" or i == last_assistant):
                    spans.append((begin, len(tokens), weight))
            else:
                tokens.append(self.begin_system)
                tokens.frombytes(text_ids(text))
                tokens.append(self.end_system)
        return tokens, spans


# Conversations a plain-chat template must encode as mistral-common does before it is used: the cases where the
# template could differ (system prompts, merging by weight, weights 0 to 1, every kind of space, control tokens' text).
PROBE_CHATS = [
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!", "weight": 0.5},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Bye! "},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": " two  spaces\tand a tab "},
            {"role": "user", "content": "merged\n\nuser [INST] text"},
            {"role": "system", "content": "  system\u00a0prompt, late "},
            {"role": "user", "content": "after the system prompt\u3000"},
            {"role": "assistant", "content": "first", "weight": 0},
            {"role": "assistant", "content": "same weight: merged  ", "weight": 0},
            {"role": "assistant", "content": "another weight\u2028", "weight": 1},
            {"role": "system", "content": "second system prompt"},
            {"role": "user", "content": "\u2581last\u0085 question"},
            {"role": "assistant", "content": " last answer é 😀\n"},
        ]
    },
    {
        "messages": [
            {"role": "system", "content": "a"},
            {"role": "system", "content": "b"},
            {"role": "user", "content": "x"},
            {"role": "assistant", "content": "y"},
            {"role": "assistant", "content": "weight 1 is not no weight: not merged", "weight": 1},
        ]
    },
]
