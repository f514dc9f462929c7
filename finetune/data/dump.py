"""`tailor tokenize`: what each line of a file becomes, so a user can check the masking before training.

Every line gives `{"line": n, "tokens": [...], "weights": [...]}` (weights[i]: how much predicting tokens[i]
counts), with `"warnings": [...]` when the line has any (finetune/data/errors.py's SampleWarning), or
`{"line": n, "error": "..."}`. `render_sample` shows the decoded text with the trained spans
highlighted: green when fully trained, yellow when weighted below 1, control tokens dimmed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy

from finetune import exit_codes
from finetune.data.config import TRAIN_ON
from finetune.data.errors import SampleFault
from finetune.data.jsonl import read_lines
from finetune.data.model_tokenizer import load_tokenizer
from finetune.data.sources import what_it_is
from finetune.data.tokenize import span_weights, tokenize_line

GREEN, YELLOW, DIM, RESET = "\033[1;32m", "\033[33m", "\033[2m", "\033[0m"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add `tailor tokenize`'s arguments to its parser."""
    p.add_argument("file", type=Path, help="a .jsonl file of samples")
    p.add_argument("--model", type=Path, required=True, metavar="MODEL_DIR", help="the model folder (its tokenizer)")
    p.add_argument(
        "-o",
        "--output",
        type=Path,
        metavar="OUT.jsonl",
        help='write {"line", "tokens", "weights"} or {"line", "error"} per line here (default: stdout)',
    )
    p.add_argument("--show", action="store_true", help="print the decoded text with the trained spans highlighted")
    p.add_argument(
        "--train-on",
        choices=TRAIN_ON,
        default="all",
        help="train every assistant message, or only the last one (data.train_on)",
    )


def run(args: argparse.Namespace) -> int:
    """Run `tailor tokenize`.

    Returns:
        The exit code: 0, 1 when a line could not be tokenized, exit_codes.USAGE for a missing input or an output
        that is the input.
    """
    tokenizer = load_tokenizer(args.model)
    if not args.file.is_file():
        print(f"error: {args.file}: {what_it_is(args.file)}", file=sys.stderr)
        return exit_codes.USAGE
    if args.output is not None and args.output.exists() and args.output.samefile(args.file):
        print(
            f"error: -o {args.output} is the input file, which writing would empty before it is read; choose another "
            "output file",
            file=sys.stderr,
        )
        return exit_codes.USAGE
    records = tokenize_file(args.file, tokenizer, args.train_on)
    if args.show:
        records = _shown(records, tokenizer, args.file)
        if args.output is None:  # the rendering is the output
            return 1 if sum("error" in r for r in records) else 0
    if args.output is None:
        return 1 if write_records(records, sys.stdout) else 0
    with open(args.output, "w", encoding="utf-8") as out:
        errors = write_records(records, out)
    failed = f'; {errors} line(s) could not be tokenized: their records hold "error"' if errors else ""
    print(f"wrote {args.output}{failed}")
    return 1 if errors else 0


def _shown(records, tokenizer, path: Path):
    """Print each record as a person reads it, and pass it on."""
    color = sys.stdout.isatty()
    for record in records:
        if "error" in record:
            print(f"{path}:{record['line']}: {record['error']}\n")
        else:
            trained = sum(w > 0 for w in record["weights"])
            print(f"── {path}:{record['line']}: {len(record['tokens'])} tokens, {trained} trained")
            for warning in record.get("warnings", []):
                print(f"{path}:{record['line']}: warning: {warning}")
            print(render_sample(record["tokens"], record["weights"], tokenizer, color) + "\n")
        yield record


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
    """The decoded sample; trained spans in colour, or between « » with their weight when not 1.

    Args:
        weights: each token's loss weight.
        color: ANSI colours (for a terminal) rather than « » marks.
    """
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
