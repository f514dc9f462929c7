"""`tailor tokenize`: what each line of a file becomes, so a user can check the masking before training.

Every line gives `{"line": n, "tokens": [...], "weights": [...]}` (weights[i]: how much predicting tokens[i]
counts), with `"warnings": [...]` when the line has any (finetune/data/errors.py's SampleWarning), or
`{"line": n, "error": "..."}`. `render_sample` shows the decoded text with the trained spans
highlighted: green when fully trained, yellow when weighted below 1, control tokens dimmed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy

from finetune.data.errors import SampleFault
from finetune.data.jsonl import read_lines
from finetune.data.tokenize import span_weights, tokenize_line

GREEN, YELLOW, DIM, RESET = "\033[1;32m", "\033[33m", "\033[2m", "\033[0m"


def tokenize_file(path: str | Path, tokenizer, train_on: str = "all") -> Iterator[dict]:
    """One record per line of the file, in order."""
    for n, raw in enumerate(read_lines(path), 1):
        try:
            tokens, spans, warnings = tokenize_line(raw, tokenizer, train_on)
        except SampleFault as fault:
            yield {"line": n, "error": fault.message}
            continue
        record = {"line": n, "tokens": tokens.tolist(), "weights": span_weights(len(tokens), spans)}
        if warnings:
            record["warnings"] = [message for _, message in warnings]
        yield record


def write_records(records: Iterator[dict], out: TextIO) -> int:
    """Write records as JSON lines; return how many were errors."""
    errors = 0
    for record in records:
        errors += "error" in record
        out.write(json.dumps(record) + "\n")
    return errors


def render_sample(tokens: list[int], weights: list[float], tokenizer, color: bool) -> str:
    """The decoded sample; trained spans in colour, or between « » with their weight when not 1."""
    raw = tokenizer.instruct_tokenizer.tokenizer
    runs = []  # (text, weight, is_control)
    text_tokens: list[int] = []
    decoded = ""
    i = 0
    while i < len(tokens):
        j, special = i, raw.is_special(tokens[i])
        while j < len(tokens) and weights[j] == weights[i] and raw.is_special(tokens[j]) == special:
            j += 1
        if special:
            text = raw.decode(tokens[i:j], special_token_policy=SpecialTokenPolicy.KEEP)
        else:
            # decode all text so far and keep the new part: decoding a run alone would drop its leading space
            text_tokens += tokens[i:j]
            full = raw.decode(text_tokens, special_token_policy=SpecialTokenPolicy.IGNORE)
            text, decoded = full[len(decoded) :], full
        runs.append((text, weights[i], special))
        i = j
    if color:
        return "".join(_colored(text, weight, special) for text, weight, special in runs)
    marked = []  # without colour, one « » around each trained span, control tokens included
    for text, weight, _ in runs:
        if marked and marked[-1][1] == weight:
            marked[-1][0] += text
        else:
            marked.append([text, weight])
    return "".join(
        f"«{text}»" + ("" if weight == 1 else f"({weight:g})") if weight > 0 else text for text, weight in marked
    )


def _colored(text: str, weight: float, special: bool) -> str:
    style = (GREEN if weight >= 1 else YELLOW) if weight > 0 else (DIM if special else "")
    return f"{style}{text}{RESET}" if style else text
