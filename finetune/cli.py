"""`tailor SUBCOMMAND ...`: one small function per subcommand, registered in COMMANDS.

To add a subcommand, write `add_NAME_arguments(parser)` and `run_NAME(args) -> exit status`, and add a
row to COMMANDS. Heavy imports happen inside the run functions so that `tailor --help` stays instant.
"""

from __future__ import annotations

import argparse
import errno
import gc
import importlib
import os
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from finetune import exit_codes


def add_validate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="the training YAML file")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. seq_len=4096")
    p.add_argument(
        "--gpus",
        type=int,
        default=1,
        metavar="N",
        help="GPUs of the planned run, for epochs, ETA, memory and the trace",
    )
    p.add_argument(
        "--device",
        choices=("h100", "h200", "a100", "cpu"),
        help="the device of the ETA (default: this machine's GPU, else the CPU, which gets no estimate)",
    )
    p.add_argument(
        "--fix",
        type=Path,
        metavar="OUT_DIR",
        help="write OUT_DIR/train/<k>-<name> and OUT_DIR/eval/<k>-<name> with safe repairs applied and the other bad "
        "lines removed, and OUT_DIR/config.yaml, the config reading them",
    )
    p.add_argument("--max-per-kind", type=int, default=10, metavar="N", help="faults shown per kind (default 10)")
    p.add_argument(
        "--trace",
        action="store_true",
        help="then trace one training step of the config's model at full size on tensors that hold no memory, as on "
        "--device (default h100), on rank 0 of --gpus under FSDP2: weights, LoRA state and peak memory per GPU, FLOPs "
        "per token, attention, host syncs (docs/gpu-trace.md)",
    )
    p.add_argument(
        "--gpu-memory",
        type=float,
        metavar="GB",
        help="GiB of each GPU of the planned run, to check the memory estimate fits (default: this machine's GPU)",
    )
    p.add_argument(
        "--price",
        type=float,
        metavar="PER_GPU_HOUR",
        help="the price of one GPU for an hour, in any currency: the ETA's cost is added",
    )


def run_validate(args: argparse.Namespace) -> int:
    # Paused before the data path's first import: validation keeps what it makes to its end, so the cyclic collector
    # would only walk those objects again and again (the cache's build collects its own little garbage).
    from finetune.data.collector import cycle_collector_paused

    with cycle_collector_paused():
        return _validate(args)


def _validate(args: argparse.Namespace) -> int:
    import dataclasses
    import functools

    from finetune.config import load_config, save_config
    from finetune.data.config import resolve_cache_dir
    from finetune.data.validate import fixed_layout
    from finetune.planning.eta import tokens_per_second_per_gpu
    from finetune.planning.validate import validate
    from finetune.training.model_hub import resolve_hub_model
    from finetune.training.preflight import PreflightError, check_model_folder
    from model.settings import OUTPUT_HEAD_SERVING_NOTE

    if args.gpus < 1:
        print(f"error: --gpus must be at least 1, got {args.gpus}", file=sys.stderr)
        return exit_codes.USAGE
    if args.gpu_memory is not None and not args.gpu_memory > 0:
        print(f"error: --gpu-memory must be a number of GiB above 0, got {args.gpu_memory}", file=sys.stderr)
        return exit_codes.USAGE
    if args.price is not None and not 0 <= args.price < float("inf"):
        print(f"error: --price must be a price per GPU-hour of 0 or more, got {args.price}", file=sys.stderr)
        return exit_codes.USAGE
    if args.fix is not None and args.fix.exists() and (not args.fix.is_dir() or any(args.fix.iterdir())):
        print(f"error: --fix {args.fix} already exists and is not empty; choose a new output folder", file=sys.stderr)
        return exit_codes.USAGE
    cfg = load_config(args.config, args.overrides)
    try:
        cfg = resolve_hub_model(cfg)
        check_model_folder(Path(cfg.model.path))
    except PreflightError as error:
        print(f"error: {error}", file=sys.stderr)
        return exit_codes.USAGE
    if "output" in cfg.lora.targets:
        print(f"warning: {args.config}: {OUTPUT_HEAD_SERVING_NOTE}\n")
    gpu, device = _eta_device(args.device)
    status = validate(
        cfg,
        cache_dir=resolve_cache_dir(cfg.data, cfg.run_dir),
        throughput=None if gpu is None else functools.partial(tokens_per_second_per_gpu, gpu=gpu),
        device=device,
        gpus=args.gpus,
        fix_dir=args.fix,
        max_per_kind=args.max_per_kind,
        price=args.price,
    )
    if args.fix is not None and status != exit_codes.USAGE:
        train, eval_ = (
            [source for source, _ in fixed_layout(sources, split, args.fix)]
            for split, sources in (("train", cfg.data.train), ("eval", cfg.data.eval))
        )
        fixed = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train=train, eval=eval_))
        save_config(fixed, args.fix / "config.yaml")
        print(f"wrote {args.fix / 'config.yaml'}: {args.config} with data.train and data.eval reading the files above")
    if status != exit_codes.USAGE:
        print(_memory_line(cfg, args.gpus, args.gpu_memory))
    if args.trace and status != exit_codes.USAGE:
        return _trace(cfg, args.device or "h100", args.gpus) or status
    return status


def _trace(cfg, gpu: str, gpus: int) -> int:
    """The traced step's line, rank 0's of `gpus` (finetune/training/trace.py); an exit code when it cannot run."""
    from finetune.config import ConfigError
    from finetune.training.trace import GPU_KINDS, trace_by_layers
    from model.args import load_model_args

    if gpu not in GPU_KINDS:
        print(f"error: --trace traces a GPU's step: --device one of {', '.join(GPU_KINDS)}, not {gpu}", file=sys.stderr)
        return exit_codes.USAGE
    try:
        trace = trace_by_layers(cfg, load_model_args(cfg.model.path), gpu, gpus)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return exit_codes.USAGE
    print(trace.summary())
    return exit_codes.OK


def _memory_line(cfg, gpus: int, gpu_memory: float | None) -> str:
    """The memory estimate per GPU (finetune/planning/memory_estimate.py), and whether it fits --gpu-memory or this
    machine's GPU."""
    from finetune.planning.memory_estimate import GIB, config_estimate, fit_report

    try:
        estimate = config_estimate(cfg, gpus)
    except (ValueError, OSError) as error:
        return f"memory: no estimate ({error})"
    if gpu_memory is not None:
        return fit_report(cfg, estimate, gpu_memory * GIB, f"a {gpu_memory:g} GiB GPU")
    if (gpu := _this_gpu()) is not None:
        name, memory = gpu
        return fit_report(cfg, estimate, memory, f"this {name}")
    return f"memory: {estimate.summary()}; give --gpu-memory GB to check it fits a GPU"


def _eta_device(choice: str | None) -> tuple[str | None, str]:
    """(the GPU kind whose figures the ETA uses, or None for no estimate; the device's name), from --device or else
    this machine: its GPU, or its CPU."""
    from finetune.planning.eta import GPU_NAMES, gpu_kind

    if choice is not None:
        return (None, "CPU") if choice == "cpu" else (choice, GPU_NAMES[choice])
    if (gpu := _this_gpu()) is None:
        return None, "CPU"
    name = gpu[0]
    return gpu_kind(name), name


# The device files a GPU driver makes on Linux: NVIDIA's, ROCm's and WSL's. Without one, torch finds no GPU.
GPU_DEVICE_FILES = ("/dev/nvidiactl", "/dev/kfd", "/dev/dxg")


def _this_gpu() -> tuple[str, int] | None:
    """This machine's first GPU as (name, bytes of memory), or None. torch is imported only where a GPU driver's
    device file is there to answer: on a Linux machine without one, torch.cuda.is_available() is False, and
    importing torch to hear it is over a second of `tailor validate`'s start-up."""
    if sys.platform == "linux" and not any(os.path.exists(path) for path in GPU_DEVICE_FILES):
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0).total_memory


def add_tokenize_arguments(p: argparse.ArgumentParser) -> None:
    from finetune.data.config import TRAIN_ON

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


def run_tokenize(args: argparse.Namespace) -> int:
    from finetune.data.dump import tokenize_file, write_records
    from finetune.data.model_tokenizer import load_tokenizer
    from finetune.data.sources import what_it_is

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
    from finetune.data.dump import render_sample

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
        "finetune.cli:add_validate_arguments",
        "finetune.cli:run_validate",
    ),
    (
        "tokenize",
        "show the tokens and loss weights each line of a .jsonl file becomes",
        "finetune.cli:add_tokenize_arguments",
        "finetune.cli:run_tokenize",
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
    """`tailor` (pyproject.toml's script) and `python -m finetune`: main() on this process's arguments, then exit.
    After `tailor validate`, which only reads (its cache files are closed when main() returns), the process exits
    without the cyclic garbage collector's last walk over every object still alive (gc.freeze), which only finds what
    the exit frees anyway. Commands that write keep that walk: an object it finalises may still hold a file to flush."""
    status = main()
    if sys.argv[1:2] == ["validate"]:
        gc.freeze()
    sys.exit(status)


def main(argv: list[str] | None = None) -> int:
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
    except KeyboardInterrupt:  # Ctrl-C: the user's own stop, not a fault to trace back
        print("interrupted", file=sys.stderr)
        return exit_codes.INTERRUPTED
    except BrokenPipeError:  # `tailor tokenize ... | head` read what it wanted and closed the pipe: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's flush at exit would fail again
        return 0
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            print(f"error: {error}", file=sys.stderr)  # the user's mistake (a bad path or file): named, exit 2
            return exit_codes.USAGE
        where = f"{error.filename}: " if error.filename else ""
        print(f"error: {where}{error.strerror}; free some space, then run the same command", file=sys.stderr)
        return exit_codes.WRITE_FAILED
    except ValueError as error:  # the user's mistake (a bad file, option or config): named, exit 2
        print(f"error: {error}", file=sys.stderr)
        return exit_codes.USAGE
