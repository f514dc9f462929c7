"""`tailor SUBCOMMAND ...`: one small function per subcommand, registered in COMMANDS.

To add a subcommand, write `add_NAME_arguments(parser)` and `run_NAME(args) -> exit status`, and add a
row to COMMANDS. Heavy imports happen inside the run functions so that `tailor --help` stays instant.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_validate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="the training YAML file")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. seq_len=4096")
    p.add_argument("--gpus", type=int, default=1, metavar="N", help="GPUs of the planned run, for epochs and ETA")
    p.add_argument("--fix", type=Path, metavar="OUT_DIR",
                   help="write the files to OUT_DIR with safe repairs applied and the other bad lines removed")
    p.add_argument("--max-per-kind", type=int, default=10, metavar="N", help="faults shown per kind (default 10)")


def run_validate(args: argparse.Namespace) -> int:
    from finetune.config import ConfigError, load_config
    from finetune.data.validate import validate

    if args.gpus < 1:
        print(f"error: --gpus must be at least 1, got {args.gpus}", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return validate(cfg, gpus=args.gpus, fix_dir=args.fix, max_per_kind=args.max_per_kind)


def add_tokenize_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", type=Path, help="a .jsonl file of samples")
    p.add_argument("--model", type=Path, required=True, metavar="MODEL_DIR", help="the model folder (its tokenizer)")
    p.add_argument("-o", "--output", type=Path, metavar="OUT.jsonl",
                   help='write {"line", "tokens", "weights"} or {"line", "error"} per line here (default: stdout)')
    p.add_argument("--show", action="store_true", help="print the decoded text with the trained spans highlighted")
    p.add_argument("--train-on", choices=("all", "last"), default="all",
                   help="train every assistant message, or only the last one (data.train_on)")


def run_tokenize(args: argparse.Namespace) -> int:
    from finetune.data.dump import tokenize_file, write_records
    from finetune.data.tokenize import load_tokenizer

    try:
        tokenizer = load_tokenizer(args.model)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.file.is_file():
        print(f"error: {args.file}: no such file", file=sys.stderr)
        return 2
    records = tokenize_file(args.file, tokenizer, args.train_on)
    if args.show:
        records = _shown(records, tokenizer, args.file)
        if args.output is None:  # the rendering is the output
            return 1 if sum("error" in r for r in records) else 0
    if args.output is None:
        return 1 if write_records(records, sys.stdout) else 0
    with open(args.output, "w", encoding="utf-8") as out:
        return 1 if write_records(records, out) else 0


def _shown(records, tokenizer, path: Path):
    """Print each record as a person reads it, and pass it on."""
    from finetune.data.dump import render_sample

    color = sys.stdout.isatty()
    for record in records:
        if "error" in record:
            print(f"{path}:{record['line']}: {record['error']}\n")
        else:
            trained = sum(w > 0 for w in record["weights"])
            print(f"── {path}:{record['line']}: {len(record['tokens'])} tokens, {trained} trained")
            print(render_sample(record["tokens"], record["weights"], tokenizer, color) + "\n")
        yield record


COMMANDS = [
    ("validate", "check every train and eval file of a config: faults, statistics, epochs, ETA",
     add_validate_arguments, run_validate),
    ("tokenize", "show the tokens and loss weights each line of a .jsonl file becomes",
     add_tokenize_arguments, run_tokenize),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tailor", description="LoRA fine-tuning for Mistral models")
    subparsers = parser.add_subparsers(metavar="COMMAND")
    for name, help_text, add_arguments, run in COMMANDS:
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        add_arguments(sub)
        sub.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    return args.run(args)
