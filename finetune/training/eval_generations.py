"""Greedy answers to the first chats of each eval (and retain) source at every eval, with the KV-cache generator.

A chat is answerable when its last message is the assistant's and the one before it the user's or a tool's: the
prompt is the conversation before that answer (mistral-common's `encode_chat_completion`, training's template),
the reference is the answer. Each rank answers its share (chats r, r + world_size, ...) and rank 0 gathers them.
A sharded model needs every rank in each forward, so every rank makes the same calls: as many batches, each run
for the whole token budget of the eval (one process stops a batch once all its answers have ended).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode, get_validator
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from torch import nn

from finetune.data.config import DataSource
from finetune.data.errors import SampleFault
from finetune.data.jsonl import parse_line, read_lines
from finetune.data.schema import check_sample
from finetune.data.sources import source_files
from finetune.training.answer_scores import Reference, parse_tool_calls
from finetune.training.distributed import DistInfo, gather_to_main
from model.generate import generate

GENERATIONS_FILE = "eval_generations.jsonl"
ANSWERS_PER_BATCH = 8  # prompts generated together, as `tailor chat --input` does by default
BUDGET_MARGIN = 16  # tokens an answer may run past its reference's length: one longer than that is wrong anyway
PROMPT_KEYS = {"role", "content", "tool_calls", "tool_call_id", "name"}  # what mistral-common reads of a message


@dataclass
class EvalChat:
    """An answerable chat of an eval (or retain) source: where it is, its prompt, and the answer it expects."""

    group: str  # "eval" or "retain"
    source: str  # the source's path as the config names it
    file: str
    line: int
    prompt: list[dict]  # the messages before the answer
    prompt_tokens: list[int]
    reference: Reference
    budget: int  # most tokens generated for it


def read_eval_chats(
    groups: dict[str, list[DataSource]], per_source: int, tokenizer
) -> tuple[list[EvalChat], dict[str, Counter]]:
    """Read the first `per_source` answerable chats of each source.

    Args:
        groups: the sources by group ("eval", "retain").
        tokenizer: the training tokenizer, which encodes each prompt.

    Returns:
        The chats, and per source (`group:path`) the lines passed over before them, counted by why (not a chat
        ending in an answer, a bad line, a prompt the tokenizer refuses).
    """
    chats, passed_over = [], {}
    tokenizer = prompt_tokenizer(tokenizer)
    for group, sources in groups.items():
        for source in sources:
            found, skipped = [], Counter()
            for path in source_files(source):
                for number, raw in enumerate(read_lines(path), start=1):
                    if len(found) == per_source:
                        break
                    if not raw.strip():
                        continue
                    chat = _answerable_chat(raw, tokenizer, skipped)
                    if chat is not None:
                        found.append(EvalChat(group, source.path, str(path), number, *chat))
            chats += found
            passed_over[f"{group}:{source.path}"] = skipped
    return chats, passed_over


def prompt_tokenizer(tokenizer: MistralTokenizer) -> MistralTokenizer:
    """The training tokenizer checking requests as prompts (ending with a user or tool message), not as samples."""
    version = tokenizer.instruct_tokenizer.tokenizer.version
    validator = get_validator(version, mode=ValidationMode.test)
    return MistralTokenizer(tokenizer.instruct_tokenizer, validator, tokenizer._instruct_request_normalizer)


def _answerable_chat(raw: bytes, tokenizer, skipped: Counter) -> tuple | None:
    try:
        sample = parse_line(raw)
        check_sample(sample)
    except SampleFault:
        skipped["bad line"] += 1
        return None
    messages = sample.get("messages") or []
    if len(messages) < 2 or messages[-1]["role"] != "assistant" or messages[-2]["role"] not in ("user", "tool"):
        skipped["not a chat ending in an assistant answer"] += 1
        return None
    answer, tools = messages[-1], sample.get("tools") or None
    calls = None
    if answer.get("tool_calls"):
        calls = parse_tool_calls(json.dumps([c["function"] for c in answer["tool_calls"]]))
        if calls is None:
            skipped["reference tool call with arguments that are not a JSON object"] += 1
            return None
    functions = {t["function"]["name"]: t["function"].get("parameters", {}) for t in tools or []}
    reference = Reference(None if calls else answer.get("content") or "", calls, functions)
    prompt = [{k: v for k, v in m.items() if k in PROMPT_KEYS} for m in messages[:-1]]
    try:
        prompt_tokens = tokenizer.encode_chat_completion(ChatCompletionRequest(messages=prompt, tools=tools)).tokens
    except Exception:  # noqa: BLE001 - mistral-common's validation errors have no common base class
        skipped["prompt the tokenizer cannot encode"] += 1
        return None
    reference_text = reference.text if calls is None else json.dumps(answer["tool_calls"])
    raw_tokenizer = tokenizer.instruct_tokenizer.tokenizer
    budget = len(raw_tokenizer.encode(reference_text, bos=False, eos=False)) + BUDGET_MARGIN
    return prompt, prompt_tokens, reference, budget


def generate_answers(
    loss_model: nn.Module, chats: list[EvalChat], eos_id: int, dist_info: DistInfo
) -> list[list[int]] | None:
    """Generate each chat's answer greedily, each rank its share; a collective.

    Every rank runs the same number of batches and forward calls, which FSDP needs.

    Returns:
        Each chat's answer tokens (EOS left out, at most its budget), in the chats' order, on rank 0; None on the
        other ranks.
    """
    rank, world_size = dist_info.rank, dist_info.world_size
    mine = chats[rank::world_size]
    per_rank = math.ceil(len(chats) / world_size)
    padded = mine + chats[:1] * (per_rank - len(mine))  # a rank short of chats answers the first again, unused
    every_step = world_size > 1
    longest = max(c.budget for c in chats)
    answers = []
    for start in range(0, per_rank, ANSWERS_PER_BATCH):
        batch = padded[start : start + ANSWERS_PER_BATCH]
        replies = generate(
            loss_model.model,
            [c.prompt_tokens for c in batch],
            longest if every_step else max(c.budget for c in batch),
            eos_id,
            forward=loss_model.logits,
            every_step=every_step,
        )
        answers += [reply[: c.budget] for reply, c in zip(replies, batch)]  # the same answer however it was batched
    gathered = gather_to_main(answers[: len(mine)])
    if gathered is None:
        return None
    ordered = [None] * len(chats)
    for r, part in enumerate(gathered):
        ordered[r::world_size] = part
    return ordered


def write_generations(path: Path, step: int, base: bool, chats: list[EvalChat], answers, scores) -> None:
    """Append one line per answer to run_dir/eval_generations.jsonl.

    Each line holds the step, source, file and line, prompt, reference, generated answer, and its scores.

    Args:
        base: the answers are the base model's (adapters off).
    """
    with open(path, "a", encoding="utf-8") as f:
        for chat, answer, score in zip(chats, answers, scores):
            record = dict(step=step, base=base, group=chat.group, source=chat.source, file=chat.file)
            record.update(line=chat.line, prompt=chat.prompt, reference=chat.reference.shown, generated=answer.text)
            f.write(json.dumps(dict(record, scores=score), ensure_ascii=False) + "\n")
