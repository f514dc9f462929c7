"""`tailor SUBCOMMAND ...`: the table of subcommands, COMMANDS; each one's work lives in its phase's module.

To add a subcommand, write `add_arguments(parser)` and `run(args) -> exit status` in the module of its phase, and add
a row to COMMANDS. A command's module is imported only when that command runs, so that `tailor --help` stays instant.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import sys
from importlib.metadata import PackageNotFoundError, version

from finetune import exit_codes

COMMANDS = [  # name, help, "module:add_arguments", "module:run"; modules are imported only when their command runs
    (
        "train",
        "fine-tune LoRA adapters as a config says, on one device or, with --gpus N, under torchrun",
        "finetune.training.launch:add_arguments",
        "finetune.training.launch:run",
    ),
    (
        "runs",
        "list the runs under a folder (default runs/) with status, step, losses, ETA; or show one run in detail",
        "finetune.training.jobs:add_runs_arguments",
        "finetune.training.jobs:run_runs",
    ),
    (
        "stop",
        "stop a run as Ctrl-C does (it checkpoints and exits 0), and wait until it has",
        "finetune.training.jobs:add_stop_arguments",
        "finetune.training.jobs:run_stop",
    ),
    (
        "validate",
        "check every train and eval file of a config: faults, statistics, epochs, ETA",
        "finetune.validate_command:add_arguments",
        "finetune.validate_command:run",
    ),
    (
        "tokenize",
        "show the tokens and loss weights each line of a .jsonl file becomes",
        "finetune.data.dump:add_arguments",
        "finetune.data.dump:run",
    ),
    (
        "demo",
        "make a tiny model, fine-tune it on the shipped data, and show what it learned (CPU, a few minutes)",
        "finetune.after.demo:add_arguments",
        "finetune.after.demo:run",
    ),
    (
        "merge",
        "merge a LoRA checkpoint into its base model, one tensor at a time",
        "finetune.after.merge:add_arguments",
        "finetune.after.merge:run",
    ),
    (
        "export-peft",
        "write a LoRA checkpoint as a Hugging Face PEFT adapter (transformers, vLLM)",
        "finetune.after.peft_format:add_export_arguments",
        "finetune.after.peft_format:run_export",
    ),
    (
        "import-peft",
        "turn a Hugging Face PEFT LoRA adapter into a tailor checkpoint",
        "finetune.after.peft_format:add_import_arguments",
        "finetune.after.peft_format:run_import",
    ),
    (
        "export-hf",
        "write a base or merged model in Hugging Face format",
        "finetune.after.export_hf:add_arguments",
        "finetune.after.export_hf:run",
    ),
    (
        "export-gguf",
        "write a base or merged model (an adapter merged on the way) as GGUF for llama.cpp, with an Ollama Modelfile",
        "finetune.after.export_gguf:add_arguments",
        "finetune.after.export_gguf:run",
    ),
    (
        "chat",
        "chat with a model, with or without a LoRA checkpoint",
        "finetune.after.chat:add_arguments",
        "finetune.after.chat:run",
    ),
    (
        "plot",
        "draw a run's train and eval loss, learning rate and tokens/s against step into one PNG",
        "finetune.after.plot:add_arguments",
        "finetune.after.plot:run",
    ),
    (
        "extend-vocab",
        "extend a 32000-token model (Mistral 7B v0.1, Mixtral 8x7B v1) to the v3 tokenizer's 32768",
        "finetune.after.extend_vocab:add_arguments",
        "finetune.after.extend_vocab:run",
    ),
]


def _resolve(reference: str):
    module, _, name = reference.partition(":")
    return getattr(importlib.import_module(module), name)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """All commands for `--help`; with `only`, the arguments of that one command (importing just its module)."""
    parser = argparse.ArgumentParser(
        prog="tailor",
        description="LoRA fine-tuning for Mistral models",
        epilog="Training: `tailor train CONFIG [KEY=VALUE ...] [--gpus N]`; from a checkout, the same as "
        "`python train.py CONFIG [KEY=VALUE ...]` on one device, `torchrun --nproc-per-node N train.py CONFIG` on N "
        "GPUs.",
    )
    parser.add_argument("--version", action="version", version=f"tailor {_version()}")
    subparsers = parser.add_subparsers(metavar="COMMAND")
    for name, help_text, add_arguments, run in COMMANDS:
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if name == only:
            _resolve(add_arguments)(sub)
            sub.set_defaults(run=run)
    return parser


def _version() -> str:
    try:
        return version("tailor")
    except PackageNotFoundError:  # a checkout on PYTHONPATH that was never pip-installed
        return "(not installed: run pip install -e . in the repository)"


def command_line() -> None:
    """Run main() on this process's arguments, then exit: `tailor` (pyproject.toml's script) and `python -m finetune`.

    After `tailor validate`, which only reads (its cache files are closed when main() returns), the process exits
    without the cyclic garbage collector's last walk over every object still alive (gc.freeze), which only finds what
    the exit frees anyway. Commands that write keep that walk: an object it finalises may still hold a file to flush.
    """
    status = main()
    if sys.argv[1:2] == ["validate"]:
        gc.freeze()
    sys.exit(status)


def main(argv: list[str] | None = None) -> int:
    """Run one `tailor` command, with the errors a user can cause ending in `error: ...`.

    Args:
        argv: the words after `tailor` (default: this process's).

    Returns:
        The command's exit code, or exit_codes.command_exit_code's for the error that ended it; 2 with no command.
    """
    argv = sys.argv[1:] if argv is None else argv
    command = next((name for name, *_ in COMMANDS if argv and argv[0] == name), None)
    parser = build_parser(only=command)
    args, extra = parser.parse_known_args(argv)
    if extra and isinstance(getattr(args, "overrides", None), list) and not any(a.startswith("-") for a in extra):
        args.overrides += extra  # KEY=VALUE after an option (`tailor train c.yaml --gpus 2 max_steps=50`)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        return _resolve(args.run)(args)
    except BrokenPipeError:  # `tailor tokenize ... | head` read what it wanted and closed the pipe: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's flush at exit would fail again
        return 0
    except BaseException as error:
        if (code := exit_codes.command_exit_code(error)) is None:  # a bug in tailor: its traceback
            raise
        print(_message(error, code), file=sys.stderr)
        return code


def _message(error: BaseException, code: int) -> str:
    if code == exit_codes.INTERRUPTED:  # Ctrl-C: the user's own stop, not a fault to trace back
        return "interrupted"
    if code == exit_codes.WRITE_FAILED and isinstance(error, OSError):
        where = f"{error.filename}: " if error.filename else ""
        return f"error: {where}{error.strerror}; free some space, then run the same command"
    return f"error: {error}"
