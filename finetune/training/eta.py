"""How long a run will take: tokens to process / (GPUs x tokens per second per GPU).

Tokens per second per GPU come from MEASURED (tailor's own training throughput, filled in from
benchmarks/RESULTS.md as model sizes get measured) and, for a model not measured yet, from its parameter
count: LoRA training with activation checkpointing costs about 6 N FLOPs per token (forward, recomputed
forward, backward through the frozen weights; no weight gradients), and we assume 40% of an H100's
dense bf16 peak. Such an estimate is printed as one.
"""

from __future__ import annotations

from pathlib import Path

from model.args import active_parameters, load_model_args, num_parameters

MEASURED: dict[str, float] = {}  # model name (see model_name) -> tokens / s / GPU measured with tailor
H100_BF16_PEAK_FLOPS = 989e12
ASSUMED_UTILISATION = 0.4


def model_name(total_parameters: int, experts: int) -> str:
    size = f"{total_parameters / 1e9:.0f}B" if total_parameters >= 1e9 else f"{total_parameters / 1e6:.0f}M"
    return size + (f" ({experts} experts)" if experts > 1 else "")


def tokens_per_second_per_gpu(model_dir: str | Path) -> tuple[float, str]:
    """(tokens / s / GPU, where the number comes from), for the model in params.json or config.json."""
    args = load_model_args(model_dir)
    name = model_name(num_parameters(args), args.moe.num_experts if args.moe else 1)
    if name in MEASURED:
        return MEASURED[name], f"measured for {name}"
    active = active_parameters(args)
    rate = ASSUMED_UTILISATION * H100_BF16_PEAK_FLOPS / (6 * active)
    return rate, (
        f"estimated for a {name} model from its {active:,} active parameters at "
        f"{ASSUMED_UTILISATION:.0%} of H100 bf16 peak; not measured"
    )
