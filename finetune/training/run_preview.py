"""What a run is about to do, printed by rank 0 before its first step: the devices, the model and what LoRA trains
of it, and what `max_steps` makes of the data (whose own report, per source, finetune/data/data_report.py printed). A
user reads what was understood before waiting for it.

    devices: 1 process on the CPU (world size 1); frozen weights fp32, LoRA weights fp32
    model: artifacts/tiny-mistral: Mistral, 2 layers, dim 64, 4 heads (2 KV), vocab 32,768: 4.27M parameters
    LoRA: rank 16, alpha 32 on wq wk wv wo w1 w2 w3 output: 558,080 trainable parameters (11.56% of 4.83M)
    step: seq_len 256 x batch_size 2 x grad_accumulation 1 x 1 rank = 512 tokens; 200 steps = 102,400 tokens,
        12.15 epochs of data/demo/train.jsonl
    eval: 2 batches of 2 sequences per rank, every 50 steps and at the end

(`python train.py configs/demo.yaml`, the step line wrapped here.) A config with `epochs: N` has one more line
before the step line, `epochs: N = S steps (...)`: how its epochs became max_steps (finetune/planning/epochs.py).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from finetune.config import TrainConfig
from finetune.data.loader import TrainLoader
from finetune.planning.epochs import describe_epochs, tokens_per_step
from finetune.planning.memory_estimate import estimate_memory, fit_report
from finetune.training.distributed import DistInfo
from finetune.training.parallel import compile_note
from finetune.training.precision import compute_dtype
from model.args import ModelArgs, num_parameters


def describe_run(
    cfg: TrainConfig,
    args: ModelArgs,
    dist_info: DistInfo,
    model: nn.Module,
    train_batches: TrainLoader,
    eval_batches: list,
) -> str:
    """What the run is about to do, in the lines the module docstring shows: devices, model, LoRA, step, memory, eval.

    Args:
        args: the model's shape, as its params.json or config.json describes it.
        model: the model as built (its loss wrapper), whose trainable parameters are counted.
        train_batches: the train loader, whose sources' tokens give the epochs.
    """
    lines = [
        f"devices: {describe_devices(dist_info)}; frozen weights {cfg.model.dtype}, LoRA weights fp32",
        *([describe_cpu_threads(dist_info.world_size)] if dist_info.device.type == "cpu" else []),
        f"model: {cfg.model.path}: {describe_architecture(args)}: {count(num_parameters(args))} parameters",
        describe_lora(cfg, model),
    ]
    # each source's files, samples, tokens and losses were printed with the data (finetune/data/data_report.py)
    if cfg.epochs is not None:
        lines.append(describe_epochs(cfg, train_data_tokens(train_batches), dist_info.world_size))
    lines.append(describe_step(cfg, dist_info.world_size, train_batches))
    lines.append(describe_memory(cfg, args, dist_info.world_size, dist_info.device))
    if note := compile_note(cfg.model, args):
        lines.append(note)
    if eval_batches:
        when = f"every {cfg.eval.freq} steps and at the end" if cfg.eval.freq else "at the end"
        lines.append(f"eval: {len(eval_batches)} batches of {cfg.batch_size} sequences per rank, {when}")
    else:
        lines.append("eval: off")
    return "\n".join(lines)


def describe_memory(cfg: TrainConfig, args: ModelArgs, world_size: int, device: torch.device) -> str:
    """The line a run shows before step 1: the estimate, and on a GPU whether it fits and what to change first."""
    dtype = compute_dtype(cfg.model.dtype, device)
    estimate = estimate_memory(args, cfg, world_size, dtype.itemsize)
    if device.type != "cuda":
        return f"memory: {estimate.summary()} (as on a GPU; this run is on the CPU)"
    name = torch.cuda.get_device_name(device)
    return fit_report(cfg, estimate, torch.cuda.get_device_properties(device).total_memory, f"the {name}")


def describe_devices(dist_info: DistInfo) -> str:
    """The processes and the devices they run on: `1 process on the CPU (world size 1)`."""
    processes = f"{dist_info.world_size} process{'es' if dist_info.world_size > 1 else ''}"
    if dist_info.device.type == "cuda":
        name = torch.cuda.get_device_name(dist_info.device)
        where = f"a {name}" if dist_info.world_size == 1 else f"one GPU each (rank 0: {name})"
    else:
        where = "the CPU"
    return f"{processes} on {where} (world size {dist_info.world_size})"


def describe_cpu_threads(world_size: int) -> str:
    """The threads each process computes with on a CPU, and why.

    torchrun sets OMP_NUM_THREADS=1 for several ranks and leaves one process torch's default (one per core), the
    fastest on a machine of its own; on one shared with other work, that many threads can be several times slower
    than one, which only the user can know.
    """
    threads = torch.get_num_threads()
    if "OMP_NUM_THREADS" in os.environ:
        return f"threads: {threads} per process (OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']})"
    return (
        f"threads: {threads} per process, torch's default of one per core, as torchrun leaves a single process; on a "
        "machine busy with other work, OMP_NUM_THREADS=1 before the command can be several times faster"
        + ("" if world_size == 1 else " (torchrun sets it to 1 unless told otherwise)")
    )


def describe_architecture(args: ModelArgs) -> str:
    """`Mistral, 2 layers, dim 64, 4 heads (2 KV), vocab 32,768`, experts named for Mixtral."""
    kind = (
        f"Mixtral ({args.moe.num_experts} experts, {args.moe.num_experts_per_tok} per token)" if args.moe else "Mistral"
    )
    return (
        f"{kind}, {args.n_layers} layers, dim {args.dim}, {args.n_heads} heads ({args.n_kv_heads} KV), "
        f"vocab {args.vocab_size:,}"
    )


def describe_lora(cfg: TrainConfig, model: nn.Module) -> str:
    """The LoRA line: rank, alpha, variants and targets, and the trainable parameters.

    Counted on the model as built (DTensor shards count their whole tensor), so what is trained is what is shown.
    """
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    lora = cfg.lora
    variants = [name for name, on in (("rsLoRA", lora.rslora), ("DoRA", lora.dora)) if on]
    variants += [f"LoRA+ (B's learning rate x {lora.plus_ratio:g})"] if lora.plus_ratio != 1 else []
    return (
        f"LoRA: rank {lora.rank}, alpha {lora.alpha:g}{''.join(', ' + v for v in variants)} on "
        f"{' '.join(lora.targets)}: "
        f"{count(trainable)} trainable parameters ({trainable / total:.2%} of {count(total)})"
    )


def describe_step(cfg: TrainConfig, world_size: int, train_batches: TrainLoader) -> str:
    """Tokens per optimizer step, and the epochs of each source that max_steps makes (weights are shares of tokens)."""
    per_step = tokens_per_step(cfg, world_size)
    total = per_step * cfg.max_steps
    weight_sum = sum(s.weight for s in train_batches.sources)
    epochs = []
    for source in train_batches.sources:
        tokens = int(source.lengths.sum())
        share = source.weight / weight_sum
        epochs.append(f"{total * share / tokens:.2f} epochs of {source.name}" if tokens else f"{source.name}: empty")
    ranks = f"{world_size} rank{'s' if world_size > 1 else ''}"
    return (
        f"step: seq_len {cfg.seq_len} x batch_size {cfg.batch_size} x grad_accumulation {cfg.grad_accumulation} x "
        f"{ranks} = {per_step:,} tokens; {cfg.max_steps} steps = {total:,} tokens, {', '.join(epochs)}"
    )


def train_data_tokens(train_batches: TrainLoader) -> int:
    """Tokens of one pass over every train source: the unit of the epoch the progress bar shows."""
    return sum(int(source.lengths.sum()) for source in train_batches.sources)


def count(n: int) -> str:
    """A count as the preview shows it: `4.27M`, `1.20B`, or `558,080` below a million."""
    for unit, size in (("B", 1e9), ("M", 1e6)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:,}"
