"""`tailor validate CONFIG`: the command's options and its work around the plan (finetune/planning/validate.py): the
model folder checked as training's pre-flight does, the ETA's device, the memory estimate's line, --fix's config and
--trace's traced step.

Here, at the top of finetune/ beside the command table, rather than in finetune/planning/: the command calls
training's pre-flight, hub resolution and trace (finetune/training/), which the plan must never import. Its imports
of the phases are inside the functions: the data path's first one waits for the paused cyclic collector, and
`tailor validate` never imports torch (only to ask this machine's GPU, where a driver is there to answer).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from finetune import exit_codes


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add `tailor validate`'s arguments: the config, its overrides, and the plan's GPUs, device, memory and price."""
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
        choices=("h100", "h200", "a100", "t4", "cpu"),
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


def run(args: argparse.Namespace) -> int:
    """Run `tailor validate`, with the cyclic garbage collector paused.

    Returns:
        The exit code: validate's (DATA_FAULTS for data training would refuse or skip), USAGE for a wrong option or
        model folder, or the trace's when it cannot run.

    Raises:
        ConfigError: the config cannot be read or is wrong (the command table prints it as `error: ...`).
    """
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
        check_model_folder(Path(cfg.model.path), Path(cfg.run_dir))
    except PreflightError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
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
        return error.exit_code
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
