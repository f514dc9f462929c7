"""How long a run will take on a kind of GPU: tokens to process / (GPUs x tokens per second per GPU).

Tokens per second per GPU come from MEASURED (tailor's own training throughput on that GPU, filled in from
benchmarks/RESULTS.md as model sizes get measured) and, for a model not measured yet, from its parameter count:
LoRA training with activation checkpointing costs about 6 N FLOPs per token (forward, recomputed forward, backward
through the frozen weights; no weight gradients), and we assume 40% of the GPU's dense bf16 peak (fp16's on a T4).
Such an estimate is printed as one. A CPU gets no estimate: it is for trying the path, not for training real models.
"""

from __future__ import annotations

from pathlib import Path

from model.args import active_parameters, load_model_args, num_parameters

# Dense 16-bit peak (no sparsity) of the GPUs an estimate can be made for, from NVIDIA's data sheets (SXM parts):
# bf16's, and fp16's on a T4, which has no bf16.
GPU_PEAK_FLOPS = {"h100": 989e12, "h200": 989e12, "a100": 312e12, "t4": 65e12}
GPU_NAMES = {"h100": "H100", "h200": "H200", "a100": "A100", "t4": "T4"}
PEAK_PRECISION = {"t4": "fp16"}  # the others': bf16
MEASURED: dict[tuple[str, str], float] = {}  # (model name (see model_name), GPU kind) -> tokens / s / GPU
ASSUMED_UTILISATION = 0.4


def model_name(total_parameters: int, experts: int) -> str:
    """A model's MEASURED key: its size rounded (`7B`, `135M`), and its experts where it has several."""
    size = f"{total_parameters / 1e9:.0f}B" if total_parameters >= 1e9 else f"{total_parameters / 1e6:.0f}M"
    return size + (f" ({experts} experts)" if experts > 1 else "")


def gpu_kind(device_name: str) -> str | None:
    """The GPU_PEAK_FLOPS key of a CUDA device name ("NVIDIA H100 80GB HBM3" -> "h100"), None if unknown."""
    return next((kind for kind in GPU_PEAK_FLOPS if kind in device_name.lower()), None)


def tokens_per_second_per_gpu(model_dir: str | Path, gpu: str) -> tuple[float, str]:
    """Training throughput of the model folder's model on one GPU: measured where MEASURED has it, else estimated.

    Args:
        model_dir: a model folder; only its params.json or config.json is read.
        gpu: a GPU_PEAK_FLOPS key (gpu_kind).

    Returns:
        (tokens / s on one `gpu`, where the number comes from, in words).
    """
    args = load_model_args(model_dir)
    name = model_name(num_parameters(args), args.moe.num_experts if args.moe else 1)
    if (name, gpu) in MEASURED:
        return MEASURED[name, gpu], f"measured for {name} on {GPU_NAMES[gpu]}"
    active = active_parameters(args)
    rate = ASSUMED_UTILISATION * GPU_PEAK_FLOPS[gpu] / (6 * active)
    return rate, (
        f"estimated for a {name} model from its {active:,} active parameters at "
        f"{ASSUMED_UTILISATION:.0%} of {GPU_NAMES[gpu]} {PEAK_PRECISION.get(gpu, 'bf16')} peak; not measured"
    )


def format_eta(seconds: float) -> str:
    """A duration as a plan prints it: minutes (at least 1), hours and minutes, or days from 48 hours on."""
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"{max(minutes, 1)} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours < 48 else f"{hours / 24:.1f} days"
