"""One sample dict -> (tokens, loss weights), with the model folder's mistral-common tokenizer.

Tokens equal `MistralTokenizer.encode_chat_completion` for the same conversation. Two paths make them:

- Plain chats (system, user and assistant messages of text; no tools) with a v1, v2, v3 (SentencePiece or
  Tekken) or v7 tokenizer: the template written out in finetune/data/plain_chat.py, without mistral-common's
  pydantic request objects (about a fifth of a build), used for a tokenizer only when its probe conversations give
  the same tokens and spans both ways at load time.
- Everything else (tools, other versions, a tokenizer whose probes differ): the sample goes through
  mistral-common's own request normaliser and per-message chat templates, in the order `encode_instruct`
  uses them, so the template of every tokenizer version (v1 ... v13, Tekken) is mistral-common's, not a copy.

Walking the messages ourselves tells which tokens each message made, hence the loss weights: an assistant
message's tokens (content or tool-call payload, and its closing EOS) carry its weight; BOS, system, user,
tool results and prompt control tokens carry 0.
"""

from __future__ import annotations

import copy
import weakref
from array import array
from dataclasses import dataclass
from itertools import product

from mistral_common.protocol.instruct.messages import (
    AssistantMessage,
    FinetuningAssistantMessage,
    SystemMessage,
    ToolMessage,
    UserMessage,
)
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.tool_calls import Function, FunctionCall, Tool, ToolCall
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from finetune.data.errors import NOTHING_TO_TRAIN, SampleFault, SampleWarning, first_line
from finetune.data.fingerprint import sample_fingerprint
from finetune.data.jsonl import parse_line
from finetune.data.plain_chat import PROBE_CHATS, PlainChatTemplate, WeightSpan, is_plain_chat
from finetune.data.schema import check_sample, sample_warnings
from finetune.data.text_encoders import PACKED, WordMemoSentencePiece, usable_cores, with_fast_text_encoder


@dataclass
class TokenizedSample:
    """A sample's tokens and the loss weight of each."""

    tokens: list[int]
    weights: list[float]  # weights[i]: how much predicting tokens[i] from tokens[:i] counts; weights[0] == 0


Tokens = array  # of PACKED (uint32) ids, as the cache stores them; .tolist() gives a list of ints
Tokenized = tuple[Tokens, list[WeightSpan], list[SampleWarning]]


def tokenize_line(raw: bytes, tokenizer: MistralTokenizer, train_on: str = "all") -> Tokenized:
    """One line of a .jsonl file -> its tokens, trained spans and warnings.

    No spans means nothing to train: the NOTHING_TO_TRAIN warning says so, and the sample is left out.

    Args:
        train_on: "all" trains every assistant message (times its "weight"), "last" only the last one.

    Raises:
        SampleFault: the line is unusable.
    """
    warnings: list[SampleWarning] = []
    sample = parse_line(raw, warnings)
    check_sample(sample)
    return _tokenize_checked(sample, warnings, _sample_encoder(tokenizer), train_on)


def _tokenize_checked(sample: dict, warnings: list[SampleWarning], encoder: _SampleEncoder, train_on: str) -> Tokenized:
    tokens, spans = encoder.encode(sample, train_on)
    warnings += sample_warnings(sample)
    if not spans:
        warnings.append(NOTHING_TO_TRAIN)
    return tokens, spans, warnings


def tokenize_lines(
    raws: list[bytes],
    tokenizer: MistralTokenizer,
    train_on: str = "all",
    fingerprints: list[tuple[int, int] | None] | None = None,
) -> list[Tokenized | SampleFault]:
    """`tokenize_line` of each line, the same results, with the texts of all the lines encoded in one batched call.

    The text encoder is first told every text that the lines' chat templates will encode, so that it encodes them
    in one call, on every core.

    Args:
        fingerprints: gets each line's sample_fingerprint (None for a fault), from the sample parsed here: the
            cache finds repeated samples without parsing a line twice.

    Returns:
        Each line's result, or its SampleFault in its place when it is unusable.
    """
    encoder = _sample_encoder(tokenizer)
    checked: list = []
    for raw in raws:
        warnings: list[SampleWarning] = []
        try:
            sample = parse_line(raw, warnings)
            check_sample(sample)
            checked.append((sample, warnings))
        except SampleFault as fault:
            checked.append(fault.kept())
    encoder.text_encoder.prepare(
        [text for item in checked if not isinstance(item, SampleFault) for text in encoder.texts(item[0])]
    )
    results: list = []
    for item in checked:
        if isinstance(item, SampleFault):
            results.append(item)
            continue
        try:
            results.append(_tokenize_checked(*item, encoder, train_on))
        except SampleFault as fault:
            results.append(fault.kept())
    if fingerprints is not None:
        fingerprints += [
            None if isinstance(result, SampleFault) else sample_fingerprint(item[0])
            for item, result in zip(checked, results)
        ]
    return results


def tokenize_sample(sample: dict, tokenizer: MistralTokenizer, train_on: str = "all") -> TokenizedSample:
    """Tokens and per-token loss weights of one sample.

    Args:
        train_on: "all" trains every assistant message (times its "weight"), "last" only the last one.

    Raises:
        SampleFault: the sample is unusable.
    """
    tokens, spans = tokenize_sample_spans(sample, tokenizer, train_on)
    return TokenizedSample(tokens.tolist(), span_weights(len(tokens), spans))


def span_weights(n_tokens: int, spans: list[WeightSpan]) -> list[float]:
    """The per-token loss weights that spans describe."""
    weights = [0.0] * n_tokens
    for begin, end, weight in spans:
        weights[begin:end] = [weight] * (end - begin)
    return weights


def tokenize_sample_spans(
    sample: dict, tokenizer: MistralTokenizer, train_on: str = "all"
) -> tuple[Tokens, list[WeightSpan]]:
    """`tokenize_sample` with the weights as spans, which is what the cache stores (no per-token work).

    Raises:
        SampleFault: the sample is unusable.
    """
    check_sample(sample)
    return _sample_encoder(tokenizer).encode(sample, train_on)


class _SampleEncoder:
    """The chat templates of one tokenizer, with the fast text encoder: the plain-chat template where it is proven,
    mistral-common's normaliser and templates for everything else."""

    def __init__(self, tokenizer: MistralTokenizer):
        self.instruct = with_fast_text_encoder(tokenizer.instruct_tokenizer, usable_cores())
        self.raw = self.instruct.tokenizer
        self.text_encoder = self.raw.encode_text
        # The stock normaliser rebuilds assistant messages without their weight; asking it for
        # FinetuningAssistantMessage keeps the weight on each (merged) assistant message.
        self.normalizer = copy.copy(tokenizer._instruct_request_normalizer)
        self.normalizer._assistant_message_class = FinetuningAssistantMessage
        self.version = tokenizer.instruct_tokenizer.tokenizer.version.value
        # v1 has no tool-calling format; before v7 an assistant message holds text or tool calls, not both.
        self.supports_tools = self.version != "v1"
        self.content_with_tool_calls = self.normalizer._allow_tool_call_and_content
        self.plain_chat = PlainChatTemplate.for_tokenizer(self.instruct, self.normalizer)
        if self.plain_chat is not None and not self._plain_chat_matches_mistral_common():
            self.plain_chat = None

    def encode(self, sample: dict, train_on: str) -> tuple[Tokens, list[WeightSpan]]:
        """The tokens and trained spans of a checked sample."""
        try:
            if "text" in sample:
                tokens = array(PACKED, [self.raw.bos_id])
                tokens.frombytes(self.text_encoder.packed(sample["text"]))
                tokens.append(self.raw.eos_id)
                return tokens, [(1, len(tokens), 1.0)]
            if self.plain_chat is not None and is_plain_chat(sample):
                return self.plain_chat.encode(sample["messages"], train_on)
            tokens, spans = self.encode_chat_with_mistral_common(sample, train_on)
            return array(PACKED, tokens), spans
        except SampleFault:
            raise
        # Whatever a library raises on one line's outside bytes (a template's ValueError, the C++ core's RuntimeError)
        # is one bad line, named and counted, never a crash of the whole file.
        except Exception as e:  # noqa: BLE001
            raise SampleFault(
                "tokenizer_rejected", f"the {self.version} tokenizer cannot encode this sample: {first_line(e)}"
            ) from None

    def texts(self, sample: dict) -> list[str]:
        """The texts that `encode` will ask the text encoder for, as far as it can tell them ahead.

        mistral-common's templates may change a text: those are encoded when asked for.
        """
        if "text" in sample:
            return [sample["text"]]
        if self.plain_chat is not None and is_plain_chat(sample):
            return self.plain_chat.texts(sample["messages"])
        return [m["content"] for m in sample["messages"] if isinstance(m.get("content"), str)]

    def _plain_chat_matches_mistral_common(self) -> bool:
        """Whether the plain-chat template gives mistral-common's tokens and spans for every probe conversation."""
        try:
            for sample, train_on in product(PROBE_CHATS, ("all", "last")):
                tokens, spans = self.plain_chat.encode(sample["messages"], train_on)
                if (tokens.tolist(), spans) != self.encode_chat_with_mistral_common(sample, train_on):
                    return False
            return True
        except Exception:  # noqa: BLE001 - a template that fails on a probe is simply not used
            return False

    def encode_chat_with_mistral_common(self, sample: dict, train_on: str) -> tuple[list[int], list[WeightSpan]]:
        """The tokens and trained spans of a checked chat, through mistral-common's normaliser and templates.

        Raises:
            SampleFault: a tool call the tokenizer has no format for. Whatever mistral-common raises comes through
                as it is (`encode` makes it a SampleFault).
        """
        request = ChatCompletionRequest(messages=self._messages(sample), tools=self._tools(sample))
        instruct_request = self.normalizer.from_chat_completion_request(request)
        messages = instruct_request.messages
        # the checks encode_instruct makes before encoding (v2 also refuses several results for one tool call)
        self.instruct.validate_messages(messages)
        if hasattr(self.instruct, "_validate_tool_results"):
            self.instruct._validate_tool_results(instruct_request)
        first_user, last_user = self.instruct.find_first_last_user(instruct_request)
        last_assistant = max(i for i, m in enumerate(messages) if isinstance(m, AssistantMessage))

        tokens = self.instruct.start()
        spans = []
        for i, message in enumerate(messages):
            if isinstance(message, UserMessage):
                new, _, _ = self.instruct.encode_user_message(
                    message,
                    instruct_request.available_tools,
                    i == last_user,
                    i == first_user,
                    system_prompt=instruct_request.system_prompt,
                    force_img_first=True,
                    settings=instruct_request.settings,
                )
            elif isinstance(message, ToolMessage):
                new, _, _ = self.instruct.encode_tool_message(message, i < last_user)
            elif isinstance(message, AssistantMessage):
                new = self.instruct.encode_assistant_message(message, is_before_last_user_message=i < last_user)
                weight = 1.0 if message.weight is None else float(message.weight)
                if weight and (train_on == "all" or i == last_assistant):
                    spans.append((len(tokens), len(tokens) + len(new), weight))
            else:
                new, _ = self.instruct.encode_system_message(message)
            tokens += new
        return tokens, spans

    def _messages(self, sample: dict) -> list:
        messages = []
        for i, m in enumerate(sample["messages"], 1):
            role = m["role"]
            if role == "user":
                messages.append(UserMessage(content=m["content"]))
            elif role == "system":
                messages.append(SystemMessage(content=m["content"]))
            elif role == "tool":
                messages.append(ToolMessage(content=m["content"], tool_call_id=m["tool_call_id"], name=m.get("name")))
            else:
                calls = [
                    ToolCall(
                        id=c["id"],
                        function=FunctionCall(name=c["function"]["name"], arguments=c["function"]["arguments"]),
                    )
                    for c in m.get("tool_calls") or []
                ]
                if calls and not self.supports_tools:
                    raise SampleFault(
                        "tools_unsupported",
                        f"message {i} calls a tool but the {self.version} tokenizer has no tool-calling format",
                    )
                content = m.get("content") or None
                if calls and content and not self.content_with_tool_calls:
                    raise SampleFault(
                        "content_and_tool_calls",
                        f"message {i} has both content and tool_calls; "
                        f"the {self.version} tokenizer takes one or the "
                        "other (v7 and later take both)",
                    )
                messages.append(
                    FinetuningAssistantMessage(content=content, tool_calls=calls or None, weight=m.get("weight"))
                )
        return messages

    def _tools(self, sample: dict) -> list[Tool] | None:
        tools = sample.get("tools")
        if not tools:
            return None
        return [
            Tool(
                function=Function(
                    name=t["function"]["name"],
                    description=t["function"].get("description", ""),
                    parameters=t["function"].get("parameters", {}),
                )
            )
            for t in tools
        ]


_ENCODERS: weakref.WeakKeyDictionary[MistralTokenizer, _SampleEncoder] = weakref.WeakKeyDictionary()


def word_memo(tokenizer: MistralTokenizer) -> WordMemoSentencePiece | None:
    """The word memo that encodes this tokenizer's text, when it has one (SentencePiece; Tekken has none)."""
    text_encoder = _sample_encoder(tokenizer).text_encoder
    return text_encoder if isinstance(text_encoder, WordMemoSentencePiece) else None


def set_encoder_threads(tokenizer: MistralTokenizer, threads: int) -> None:
    """Set how many threads this process's text encoder uses for a batch of lines (worker processes share the cores)."""
    text_encoder = _sample_encoder(tokenizer).text_encoder
    if hasattr(text_encoder, "threads"):
        text_encoder.threads = threads


def _sample_encoder(tokenizer: MistralTokenizer) -> _SampleEncoder:
    encoder = _ENCODERS.get(tokenizer)
    if encoder is None:
        encoder = _ENCODERS[tokenizer] = _SampleEncoder(tokenizer)
    return encoder
